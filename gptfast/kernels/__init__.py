"""Fused Triton kernels for GPT-2-style models, with autograd, and drop-in modules.

Ops (kernel + autograd): ``layer_norm``, ``add_layer_norm``, ``attention``, ``decode_attention``,
``linear_cross_entropy`` (the output projection fused with the cross-entropy loss); and
``linear`` (a decode step's few rows through a linear layer, its bias and GELU in one kernel;
``F.linear`` elsewhere, under torch.compile too).
Modules: ``LayerNorm`` (a drop-in ``torch.nn.LayerNorm``), ``swap_layer_norms`` and
``LinearCrossEntropyLoss``.
CUDA tensors run compiled kernels; CPU tensors run in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before import.

torch.compile
-------------
Each entry point is also a ``torch.library`` op, so ``torch.compile(model, fullgraph=True)``
traces the model without graph breaks: ``gptfast::layer_norm``, ``gptfast::add_layer_norm``,
``gptfast::attention`` (differentiable, through ``gptfast::layer_norm_backward`` and
``gptfast::attention_backward``) and ``gptfast::decode_attention`` (inference only). Each has a
fake implementation (output shapes and dtypes from input metadata, symbolic under dynamic
shapes) and its autograd registered with ``register_autograd``. The forward ops also return
the fp32 statistics their backward needs (mean/rstd, the log-sum-exp), which the public
functions drop. The public functions validate their input first, under compile too, and then
call the op; in eager mode they run the same implementation, setup_context and backward
functions as an autograd.Function instead, skipping the custom op's Python dispatch (~6 µs a
call, ~28 µs with gradients, measured on a 2-core CPU machine: as much as a small kernel takes).

``torch.library.custom_op`` (an opaque op), not ``triton_op`` + ``wrap_triton``, because:

- Under ``TRITON_INTERPRET`` (every CPU run: CI) ``wrap_triton`` returns the bare interpreted
  kernel, which cannot run on fake tensors: a ``triton_op`` body cannot be traced there, so
  the CPU path would need its own opaque registration and fake, and CI would test a different
  compile path from the CUDA one. One custom op serves CUDA and the interpreter alike.
- The launch plans are host Python over concrete sizes (rows packed per tile, the backward's
  persistent grid sized by the SM count, flash-decoding splits). Opaque, they run at call time
  as in eager mode, also inside a graph with dynamic shapes; traced, they would become shape
  guards and specializations.
- What ``triton_op`` would add (Inductor launching the kernel from its own wrapper, AOTInductor
  packaging) does not change the kernels' work: Inductor does not fuse into user kernels either
  way, and it still fuses everything around an opaque op. The ops launch on the current stream
  without host syncs, so ``mode="reduce-overhead"`` can capture them in CUDA graphs (attention's
  dropout too: its seed is drawn on the GPU and read there, see ``gptfast.kernels.attention``).

Shapes: a compiled model specializes on the first shapes it sees; a second sequence length
recompiles once with a dynamic length, and that graph serves every later length (dynamo's
automatic dynamic shapes); ``torch._dynamo.mark_dynamic(ids, 1)`` or ``dynamic=True`` makes the
first graph dynamic. Repeated calls with the same shapes never recompile.
"""

from gptfast.kernels.attention import attention
from gptfast.kernels.decode_attention import decode_attention
from gptfast.kernels.layer_norm import add_layer_norm, layer_norm
from gptfast.kernels.linear import linear
from gptfast.kernels.linear_cross_entropy import linear_cross_entropy
from gptfast.kernels.nn import LayerNorm, LinearCrossEntropyLoss, swap_layer_norms

__all__ = ["LayerNorm", "LinearCrossEntropyLoss", "add_layer_norm", "attention", "decode_attention",
           "layer_norm", "linear", "linear_cross_entropy", "swap_layer_norms"]
