"""Fused Triton kernels for GPT-2-style models, with autograd, and drop-in modules.

Ops (kernel + autograd): ``layer_norm``, ``add_layer_norm``, ``attention``, ``decode_attention``.
Modules: ``LayerNorm`` (a drop-in ``torch.nn.LayerNorm``) and ``swap_layer_norms``.
CUDA tensors run compiled kernels; CPU tensors run in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before import.
"""

from kernels.attention import attention
from kernels.decode_attention import decode_attention
from kernels.layer_norm import add_layer_norm, layer_norm
from kernels.nn import LayerNorm, swap_layer_norms

__all__ = ["LayerNorm", "add_layer_norm", "attention", "decode_attention", "layer_norm",
           "swap_layer_norms"]
