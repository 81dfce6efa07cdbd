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

# ---- Whose launch plans ---------------------------------------------------------------------
# Tile sizes, kernel forms and grids depend on the GPU generation. A launch on a CUDA device takes
# that device's plan. Under the interpreter it takes the interpreter's own small tiles, unless a
# capability is named (GPTFAST_PLAN_CC=80 or 90 in the environment, or ``plans_of(cc)``): then
# every plan is the one a GPU of that capability (with SM_COUNTS[cc] SMs) would take, tuning
# tables aside. That is how CPU tests run the GPU-only plans. Off CUDA without the interpreter
# (compiling for the static gate and report) a plan is sm_90's unless one is named.
PLAN_CCS = (80, 90)
SM_COUNTS = {80: 108, 90: 132}  # an A100 and an H100/H200 (SXM)


def _named_cc(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    if value not in {str(cc) for cc in PLAN_CCS}:
        raise RuntimeError(f"GPTFAST_PLAN_CC must be one of {', '.join(map(str, PLAN_CCS))} "
                           f"(a GPU's compute capability), got {value!r}")
    return int(value)


_named = _named_cc(os.environ.get("GPTFAST_PLAN_CC"))


@functools.cache
def _cuda_capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def plan_capability(device: torch.device | None) -> int | None:
    """The compute capability (90 for sm_90) whose launch plans a launch on ``device`` takes; None
    under the interpreter when none is named (its own small tiles)."""
    if device is not None and device.type == "cuda":
        return _cuda_capability(device)
    if _named is not None:
        return _named
    return None if INTERPRETING else 90


@functools.cache
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_sm_count(device: torch.device | None) -> int | None:
    """SMs that plans spread work over: a CUDA device's own, else SM_COUNTS of the named (or
    default) capability; None under the interpreter's own plans."""
    if device is not None and device.type == "cuda":
        return _cuda_sm_count(device)
    cc = plan_capability(device)
    return None if cc is None else SM_COUNTS[cc]


@contextlib.contextmanager
def plans_of(cc: int | None):
    """Plan every launch off CUDA as a GPU of compute capability ``cc`` would (None: the
    interpreter's own small tiles) inside the block. For tests and the static report."""
    global _named
    if cc is not None and cc not in PLAN_CCS:
        raise ValueError(f"plans_of: cc must be one of {PLAN_CCS} or None, got {cc!r}")
    saved, _named = _named, cc
    try:
        yield
    finally:
        _named = saved


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
            # The gradients depend on the op's differentiable inputs even where the backward
            # reads only values saved without grad (the fused loss saves its gradients).
            if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads) and not any(
                    ctx.needs_input_grad) and not any(
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
