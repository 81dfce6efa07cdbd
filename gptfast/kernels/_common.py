"""Shared by every kernel entry point: input checks, launch plans, launches, and the registration
of its torch.library op.

Each check raises an error that names the op and the problem, so that bad input never reaches
Triton (whose own errors are tracebacks through generated code). ``library_op`` registers an
entry point as a ``gptfast::`` op for torch.compile (see the kernels package docstring).

The host path of a call (see README "Host cost"): ``plan_cache`` memoizes a launch plan per
shape, ``Kernel`` launches a compiled kernel without Triton's per-call dispatch, ``cdiv`` and
``next_power_of_2`` are Triton's at Python speed, and ``library_op`` skips autograd when nothing
needs a gradient.
"""

import contextlib
import functools
import inspect
import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from triton import knobs

from gptfast.kernels import tuning

# triton.jit picks the interpreter when it decorates a kernel, i.e. when this package is
# imported; read the variable at the same moment so the check below agrees with the kernels.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# CPU tensors launch kernels under the interpreter, and with CPU_LAUNCH: bench/_host.py sets it
# with Triton's driver stubbed, to time the compiled kernels' host path on a machine without GPU.
CPU_LAUNCH = False

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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: ``triton.cdiv`` is a jit function, whose host call costs ~2 us."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of 2 >= n (1 for n <= 1), as ``triton.next_power_of_2`` (also slow on the
    host, a constexpr function in triton 3.9)."""
    return 1 << max(n - 1, 0).bit_length()


def plan_cache(plan: Callable) -> Callable:
    """Memoize a launch plan: ``plan(*args)`` (hashable arguments: shapes, dtypes, devices,
    flags) is computed once per argument tuple and plan context (``plans_of``, the tuning
    tables' generation). Plans are not cached while a tuning override is in use (bench/tune.py
    tries many). A plan must depend on nothing else."""
    cache = {}

    @functools.wraps(plan)
    def cached(*args):
        if tuning.overridden():
            return plan(*args)
        key = (args, _named, tuning.generation())
        found = cache.get(key)
        if found is None:
            if len(cache) >= 4096:  # shapes come and go (prompt lengths): bound the memory
                cache.clear()
            found = cache[key] = plan(*args)
        return found

    cached.cache = cache
    return cached


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


# ---- Launching ------------------------------------------------------------------------------
# Triton's ``kernel[grid](*args, **kwargs)`` binds and specializes every argument, builds a cache
# key (its options stringified) and looks the compiled kernel up on each call: ~15 us of Python
# per launch on a 2-core CPU, more than many kernels take on the GPU. ``Kernel`` does that once
# per specialization: it keys the compiled kernel on what Triton specializes on, finer (the
# config, device, tensor dtypes, whether every pointer is 16-byte aligned, the exact scalar
# values but for do_not_specialize ones, which count by int32/int64 range only), and then
# calls its launcher directly, as Triton's own run() does after the lookup (the same call in
# triton 3.6 and 3.9). A miss takes Triton's path, which compiles or finds the kernel and
# launches it. Under the interpreter (and while launch hooks are set, e.g. by a profiler)
# every launch takes Triton's path.


def _int_class(value) -> int:
    """Triton's type of a do_not_specialize int: 0 int32, 1 int64, 2 uint64."""
    return 0 if -2**31 <= value < 2**31 else 1 if value < 2**63 else 2


_dtype_of = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr


def _hooked() -> bool:
    """Whether Triton launch hooks are set (a HookChain with calls, or a callable)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return (enter is not None and getattr(enter, "calls", True)) or (
        leave is not None and getattr(leave, "calls", True))


class LaunchConfig:
    """A kernel's constexprs and launch options, made once per plan by ``Kernel.config``."""

    __slots__ = ("kwargs", "values")

    def __init__(self, kwargs: dict, values: tuple):
        self.kwargs, self.values = kwargs, values  # values: the constexprs in parameter order


class Kernel:
    """A ``@triton.jit`` kernel whose parameters are tensors, then scalars, then constexprs,
    launched as ``kernel(config, grid, tensors, scalars)`` with ``config = kernel.config(
    num_warps=..., num_stages=..., **constexprs)`` (every constexpr named, made once per plan).
    Launches on the current stream of the first tensor's device (call it under ``on_device``)."""

    def __init__(self, fn):
        self.fn = fn  # a JITFunction, or an InterpretedFunction under the interpreter
        self.name = fn.fn.__name__
        params = list(inspect.signature(fn.fn).parameters.values())
        constexpr = ["constexpr" in str(p.annotation) for p in params]
        first = constexpr.index(True) if True in constexpr else len(params)
        if not all(constexpr[first:]):
            raise TypeError(f"{self.name}: the constexpr parameters must come last")
        self._constexprs = [p.name for p in params[first:]]
        # the do_not_specialize runtime arguments, by position
        names = set(getattr(fn, "do_not_specialize", ()))
        self._dns = tuple(i for i, p in enumerate(params[:first]) if p.name in names or i in names)
        self._compiled = {}
        self._stream = None

    def config(self, *, num_warps: int, num_stages: int | None = None,
               **constexprs) -> LaunchConfig:
        """The launch of one plan: every constexpr by name; ``num_stages`` None: Triton's
        default."""
        missing = set(self._constexprs) - set(constexprs)
        if missing:
            raise TypeError(f"{self.name}: constexprs {sorted(missing)} not given")
        values = tuple(constexprs[name] for name in self._constexprs)
        options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
        return LaunchConfig(dict(constexprs, **options), values)

    def __call__(self, config: LaunchConfig, grid: tuple, tensors: tuple, scalars: tuple) -> None:
        if INTERPRETING:
            self.fn[grid](*tensors, *scalars, **config.kwargs)
            return
        key = self._key(config, tensors, scalars)
        compiled = self._compiled.get(key)
        if compiled is None or _hooked():
            compiled = self.fn.run(*tensors, *scalars, grid=grid, warmup=False, **config.kwargs)
            if len(self._compiled) >= 4096:
                self._compiled.clear()
            self._compiled[key] = compiled
            return
        if self._stream is None:
            from triton.runtime import driver

            self._stream = driver.active.get_current_stream
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, self._stream(key[1]), compiled.function,
                     compiled.packed_metadata, None, None, None, *tensors, *scalars,
                     *config.values)

    def _key(self, config, tensors, scalars) -> tuple:
        ptrs = tuple(map(_data_ptr, tensors))
        aligned = math.gcd(*ptrs) % 16 == 0 or tuple(p % 16 == 0 for p in ptrs)
        if self._dns:
            scalars = list(scalars)
            for i in self._dns:
                scalars[i - len(tensors)] = _int_class(scalars[i - len(tensors)])
        device = tensors[0].get_device()
        return (config, device, aligned, *map(_dtype_of, tensors), *scalars)


_CURRENT = contextlib.nullcontext()


@functools.cache
def _one_gpu() -> bool:
    """Whether at most one CUDA device is visible (then it is the current one)."""
    return torch.cuda.device_count() <= 1


def on_device(device: torch.device):
    """Launch on the tensors' own GPU (Triton launches on the current CUDA device); nothing to
    switch when it is the current one (always so with one GPU: no query per call)."""
    if _one_gpu() or device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return _CURRENT
    return torch.cuda.device(device)


def _launchable(device: torch.device) -> bool:
    """Whether the kernels launch on ``device``: CUDA, or the CPU under the interpreter (and
    under CPU_LAUNCH, the host bench's stand-in for CUDA)."""
    return device.type == "cuda" or (device.type == "cpu" and (INTERPRETING or CPU_LAUNCH))


def launches_on(t: torch.Tensor) -> bool:
    """``_launchable(t.device)`` in a few attribute reads, without making a device object."""
    return t.is_cuda or (t.is_cpu and (INTERPRETING or CPU_LAUNCH))


def check_launchable(op: str, t: torch.Tensor) -> None:
    """The hot path's device check of one tensor, once the inputs are known to share a device:
    a few attribute reads, ``check_device``'s error where the kernels cannot launch."""
    if not launches_on(t):
        check_device(op, x=t)


def check_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device where the kernels can run; returns that device."""
    device = None
    for t in tensors.values():
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items()
                                  if t is not None)
                raise ValueError(f"{op}: tensors must be on one device, got {where}")
    if _launchable(device):
        return device
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (got CPU tensors). On a machine without "
            "a GPU, set TRITON_INTERPRET=1 before importing kernels to run them in Triton's "
            "interpreter, or use the eager PyTorch path (GPTModel(..., kernels='torch'))."
        )
    raise RuntimeError(f"{op}: the Triton kernels run on CUDA devices, got a tensor on {device}")


def host_readable(t: torch.Tensor) -> bool:
    """Whether the host may read ``t``'s values without a sync: a CPU tensor, except under
    CPU_LAUNCH, where CPU tensors stand for GPU ones (so the host path timed is the GPU's)."""
    return t.device.type == "cpu" and not CPU_LAUNCH


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


_TRACING_MODES = [getattr(torch._C._TorchDispatchModeKey, key)
                  for key in ("FAKE", "PROXY", "FUNCTIONAL")]


def _traced() -> bool:
    """Whether a call must go through the registered op: while torch.compile traces, or under a
    tracing dispatch mode (fake tensors, make_fx: AOTAutograd, opcheck)."""
    return torch.compiler.is_compiling() or (torch._C._len_torch_dispatch_stack() > 0 and any(
        torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES))


def library_op(name: str, forward: Callable, fake: Callable, setup_context: Callable | None = None,
               backward: Callable | None = None, mutates_args: tuple = ()) -> Callable:
    """Register ``forward`` as the opaque op ``gptfast::<name>``; return the call to use.

    The functions are those of ``torch.library.custom_op`` and ``register_autograd``:
    ``forward`` (type-annotated) is the op's implementation on every device (CUDA, and CPU
    under the interpreter); ``fake`` makes its outputs' shapes and dtypes from input metadata;
    ``setup_context(ctx, inputs, output)`` saves what ``backward(ctx, *grads)`` needs (both
    None: an inference-only op, without autograd); ``mutates_args`` names the arguments it
    writes into.

    The returned callable takes ``forward``'s arguments. While torch.compile traces (or fake
    tensors or make_fx do), it calls the op, which stays one node of the graph. In eager
    mode it runs the very same functions directly, skipping the custom op's Python dispatch
    (~6 µs a call, ~28 µs with gradients, measured on a 2-core CPU machine): as an
    autograd.Function when differentiable and some tensor argument requires a gradient (in
    grad mode), else ``forward`` itself.
    """
    op = torch.library.custom_op(f"gptfast::{name}", forward, mutates_args=mutates_args)
    op.register_fake(fake)
    if backward is None:
        def call(*args):
            return op(*args) if _traced() else forward(*args)

        return call
    op.register_autograd(backward, setup_context=setup_context)

    def eager_forward(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    # An old-style Function (forward takes ctx): its apply() skips the inspect.signature
    # binding that a Function with a separate setup_context pays on every call.
    function = type(name.title().replace("_", ""), (torch.autograd.Function,),
                    {"forward": staticmethod(eager_forward), "backward": staticmethod(backward)})
    tensor_args = [i for i, p in enumerate(inspect.signature(forward).parameters.values())
                   if "Tensor" in str(p.annotation)]

    def call(*args):
        if _traced():
            return op(*args)
        if torch.is_grad_enabled():
            for i in tensor_args:
                if args[i] is not None and args[i].requires_grad:
                    return function.apply(*args)
        return forward(*args)

    return call
