"""Shared by every kernel entry point: input checks, and the registration of its torch.library op.

Each check raises an error that names the op and the problem, so that bad input never reaches
Triton (whose own errors are tracebacks through generated code). ``library_op`` registers an
entry point as a ``gptfast::`` op for torch.compile (see the kernels package docstring).
"""

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

# triton.jit picks the interpreter when it decorates a kernel, i.e. when this package is
# imported; read the variable at the same moment so the check below agrees with the kernels.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Launch:
    """One kernel's tile sizes and launch options."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def on_device(device: torch.device):
    """Launch on the tensors' own GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device where the kernels can run; returns that device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op}: tensors must be on one device, got {where}")
    (device,) = devices
    if device.type == "cuda":
        return device
    if device.type == "cpu" and INTERPRETING:
        return device
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (got CPU tensors). On a machine without "
            "a GPU, set TRITON_INTERPRET=1 before importing kernels to run them in Triton's "
            "interpreter, or use the eager PyTorch path (GPTModel(..., kernels='torch'))."
        )
    raise RuntimeError(f"{op}: the Triton kernels run on CUDA devices, got a tensor on {device}")


def check_float(op: str, **tensors: torch.Tensor | None) -> None:
    """Each given tensor is fp32, fp16 or bf16."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def once_differentiable(op: str):
    """Decorate an autograd backward that is itself not differentiable: differentiating its
    outputs again (double backward, e.g. ``create_graph=True`` then ``.backward()``) raises an
    error naming ``op``, not one from deep inside the dispatcher."""
    message = f"{op}: double backward (a gradient of its gradient) is not supported".encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return outputs
            if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads) and not any(
                    isinstance(t, torch.Tensor) and t.requires_grad for t in ctx.saved_tensors):
                return outputs
            error = torch._C._functions.DelayedError(message, len(outputs))
            tensors = [None if o is None else o.detach().requires_grad_() for o in outputs]
            return error(*tensors)

        return wrapper

    return decorate


def library_op(name: str, forward: Callable, fake: Callable, setup_context: Callable | None = None,
               backward: Callable | None = None) -> Callable:
    """Register ``forward`` as the opaque op ``gptfast::<name>``; return the call to use.

    The functions are those of ``torch.library.custom_op`` and ``register_autograd``:
    ``forward`` (type-annotated) is the op's implementation on every device (CUDA, and CPU
    under the interpreter); ``fake`` makes its outputs' shapes and dtypes from input metadata;
    ``setup_context(ctx, inputs, output)`` saves what ``backward(ctx, *grads)`` needs (both
    None: an inference-only op, without autograd).

    The returned callable takes ``forward``'s arguments. While torch.compile traces, it calls
    the op, which stays one node of the graph. In eager mode it runs the very same functions
    directly (as an autograd.Function when differentiable), skipping the custom op's Python
    dispatch (~6 µs a call, ~28 µs with gradients, measured on a 2-core CPU machine).
    """
    op = torch.library.custom_op(f"gptfast::{name}", forward, mutates_args=())
    op.register_fake(fake)
    if backward is None:
        eager = forward
    else:
        op.register_autograd(backward, setup_context=setup_context)

        def eager_forward(ctx, *args):
            output = forward(*args)
            setup_context(ctx, args, output)
            return output

        # An old-style Function (forward takes ctx): its apply() skips the inspect.signature
        # binding that a Function with a separate setup_context pays on every call.
        eager = type(name.title().replace("_", ""), (torch.autograd.Function,),
                     {"forward": staticmethod(eager_forward), "backward": staticmethod(backward)}).apply

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager(*args)

    return call
