"""Drop-in nn.Module for the fused LayerNorm kernel, and a swap for existing models.

``LayerNorm`` subclasses ``torch.nn.LayerNorm``: same constructor, parameters (weight, bias),
state_dict and repr; only ``forward`` runs the Triton kernel. A multi-dimensional
``normalized_shape`` is handled by flattening the normalized trailing dims into one (the same
statistics over the same elements, so mathematically identical). Under CUDA autocast it
computes in and returns fp32, as autocast runs ``nn.LayerNorm`` (CPU autocast keeps the input
dtype, and so does this module there).
"""

import math

import torch
from torch import Tensor, nn

from gptfast.kernels.layer_norm import layer_norm
from gptfast.kernels.linear_cross_entropy import linear_cross_entropy


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm computed by ``gptfast.kernels.layer_norm.layer_norm`` (CUDA, or the interpreter)."""

    def forward(self, x: Tensor) -> Tensor:
        dims = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - dims:]) != tuple(self.normalized_shape):
            raise ValueError(
                f"LayerNorm: expected input with trailing dims {tuple(self.normalized_shape)}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.is_cuda and torch.is_autocast_enabled("cuda"):  # autocast's fp32 policy for layer_norm
            x = x.float()
        if dims == 1:
            return layer_norm(x, self.weight, self.bias, self.eps)
        n = math.prod(self.normalized_shape)
        weight = None if self.weight is None else self.weight.reshape(n)
        bias = None if self.bias is None else self.bias.reshape(n)
        y = layer_norm(x.reshape(*x.shape[: x.dim() - dims], n), weight, bias, self.eps)
        return y.view(x.shape)


def swap_layer_norms(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.LayerNorm`` in ``module`` (itself included) a kernel ``LayerNorm``.

    In place: each module object stays the same, with the very same Parameter objects, buffers,
    hooks and training flag; only its class changes (``LayerNorm`` adds no state). Subclasses
    of nn.LayerNorm are left alone, as their forward may differ. Returns ``module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"swap_layer_norms: module must be a torch.nn.Module, got {type(module).__name__}")
    for sub in module.modules():
        if type(sub) is nn.LayerNorm:
            sub.__class__ = LayerNorm
    return module


# ---- fused output projection + cross-entropy -------------------------------------------------


class LinearCrossEntropyLoss(nn.Module):
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` without the logits.

    Options are those of ``nn.CrossEntropyLoss`` (``ignore_index``, ``reduction``,
    ``label_smoothing``) and ``check_targets`` (False: targets known to be in range, no host
    read of the range check); ``forward(hidden, weight, targets, bias=None)`` takes the
    projection's weight (e.g. a model's output head, tied or not) rather than owning one. See
    ``gptfast.kernels.linear_cross_entropy`` for dtypes, memory and autocast.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 check_targets: bool = True):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.check_targets = check_targets

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor,
                bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(hidden, weight, targets, bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, check_targets=self.check_targets)

    def extra_repr(self) -> str:
        checked = "" if self.check_targets is True else f", check_targets={self.check_targets}"
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}{checked}")
