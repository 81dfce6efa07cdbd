"""Fused LayerNorm, and residual add + LayerNorm, over the last dimension (Triton).

``layer_norm(x, weight, bias, eps)`` matches ``torch.nn.functional.layer_norm(x, (N,), ...)``:
y = (x - mean) / sqrt(var + eps) * weight + bias with the biased variance, per row of N elements.
``add_layer_norm(x, residual, ...)`` returns ``(layer_norm(s), s)`` for s = x + residual, the
pre-LN transformer step ``x = x + attn_out; h = norm2(x)`` in one pass over memory, both ways.

Numerics: x may be fp32, fp16 or bf16; statistics and accumulation are fp32, outputs are stored in
x's dtype. weight/bias may have another float dtype (e.g. fp32 parameters with bf16 activations);
their gradients come back in their own dtype. The fused sum is rounded like eager PyTorch:
s = fp32(x) + fp32(residual) rounded once to x's dtype, stored, and that stored value is normalized.

Backward: dx = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy)), with mean and rstd saved (fp32)
by the forward. dweight = sum_rows(dy * xhat), dbias = sum_rows(dy): every backward program
accumulates its own rows in fp32 registers and writes one row of fp32 partial sums; a second small
kernel adds the partial rows in a fixed order. No atomics, no locks: bitwise deterministic. Two
launches (three for rows wider than 8192); the forward is one. Double backward is not supported
(a clear error says so).

Inputs may be non-contiguous: rows with a unit-stride last dimension are read in place through a
row stride (e.g. a column slice); anything else is copied to contiguous rows first (by the
forward and again by the backward, which keeps x itself rather than a copy). Widths 1..MAX_N.
Rows up to 8192 wide (padded to a power of 2) are held in registers; wider rows loop over
4096-column blocks. The kernels are in layer_norm_kernels.py, their launch plans in
layer_norm_plans.py.

Host path: every kernel launches through ``_common.Kernel`` (no Triton dispatch per call) with a
config cached per (width, dtype, device, flags) by ``plan_cache``; the checks are a few attribute
reads, rows are passed in place with their row stride, and a call without gradients skips
autograd (and the statistics the backward would need).

torch.compile sees the ops gptfast::layer_norm, gptfast::add_layer_norm and
gptfast::layer_norm_backward (see gptfast/kernels/__init__.py).
"""

import math
import numbers

import torch

from gptfast.kernels._common import (
    FLOAT_DTYPES, cdiv, check_device, check_float, check_launchable, library_op, on_device,
    once_differentiable,
)
from gptfast.kernels.layer_norm_kernels import (  # noqa: F401  (the gate and tests name them here)
    _bwd_kernel, _bwd_row_sums_kernel, _fwd_rows_kernel, _fwd_wide_kernel, _sum_partials_kernel,
)
from gptfast.kernels.layer_norm_plans import (  # noqa: F401  (tests and bench/tune.py use these)
    _SUM_WARPS, BWD, BWD_KERNEL, FWD_KERNEL, ROW_SUMS, SUM_PARTIALS, TUNING_SPACE, _bwd_groups,
    _bwd_plan, _fwd_plan, _sum_plan, aot_configs, bwd_grid, bwd_plan, fwd_plan, report_cases,
)

MAX_N = 1 << 20  # widest row accepted; the looping kernels themselves have no lower limit


# ---- host side -----------------------------------------------------------------------------


def _rows_of(t: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """(t, its row stride) when t is read in place as rows of n elements (contiguous, or 2-D
    with a unit column stride: any row stride), else (a contiguous copy of its rows, n)."""
    if t.is_contiguous():
        return t, n
    if t.dim() == 2 and t.stride(1) == 1:
        return t, t.stride(0)
    rows = t.reshape(-1, n)
    if rows.stride(-1) != 1 and n != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0)


def _like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor of t's shape and device in ``dtype``."""
    if dtype is t.dtype and t.is_contiguous():
        return torch.empty_like(t)  # the cheapest allocation on the host
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def _forward(x, residual, weight, bias, eps, stats=True):
    """Returns y and the stored sum (or None), contiguous and shaped like x, and mean, rstd
    (None unless ``stats``: only the backward needs them)."""
    n = x.shape[-1]
    contiguous = x.is_contiguous()  # (the common case: no call for it)
    xr, stride_x = (x, n) if contiguous else _rows_of(x, n)
    if residual is None:
        rr, stride_r, dtype, s = xr, stride_x, x.dtype, None
        y = torch.empty_like(x) if contiguous else _like(x, dtype)
    else:
        rr, stride_r = _rows_of(residual, n)
        dtype = x.dtype if residual.dtype is x.dtype else torch.promote_types(x.dtype, residual.dtype)
        y = _like(x, dtype)
        s = torch.empty_like(y)
    m = x.numel() // n
    mean = rstd = y  # y stands in for the statistics' pointers without STATS
    if stats:
        mean = y.new_empty(m, dtype=torch.float32)
        rstd = torch.empty_like(mean)
    if m:
        device = x.device
        launcher, config, rows = fwd_plan(n, dtype, device, s is not None, weight is not None,
                                          bias is not None, stats)
        tensors = (xr, rr, y if s is None else s, y, y if weight is None else weight,
                   y if bias is None else bias, mean, rstd)
        with on_device(device):
            if rows:
                launcher(config, (cdiv(m, rows),), tensors, (m, n, stride_x, stride_r, eps))
            else:  # the wide kernel: one program per row
                launcher(config, (m,), tensors, (n, stride_x, stride_r, eps))
    return (y, s, mean, rstd) if stats else (y, s, None, None)


def _backward(dy, dsum, x, weight, bias, mean, rstd):
    """dx (+ dsum) shaped like x, dweight, dbias (None without a weight, a bias); x is the input
    that was normalized (add_layer_norm: the sum)."""
    n = x.shape[-1]
    xr, stride_x = _rows_of(x, n)
    dyr, stride_dy = _rows_of(dy, n)
    dsr, stride_ds = (dyr, stride_dy) if dsum is None else _rows_of(dsum, n)
    dx = _like(x, x.dtype)
    dw = None if weight is None else torch.empty_like(weight)
    db = None if bias is None else torch.empty_like(bias)
    m = x.numel() // n
    if m == 0:
        return dx, None if dw is None else dw.zero_(), None if db is None else db.zero_()
    device = x.device
    plan = bwd_plan(n, x.dtype, device, dsum is not None, weight is not None, bias is not None)
    groups, per_program = bwd_grid(m, plan.rows, plan.groups)
    if plan.reduce is None:  # no parameter gradients: dx stands in for the unused pointers
        part_w = part_b = dx
    else:
        part_w, part_b = torch.empty((2, groups, n), dtype=torch.float32, device=device).unbind()
    sums = mean if plan.row_sums is None else torch.empty((2, m), dtype=torch.float32, device=device)
    w = dx if weight is None else weight
    with on_device(device):
        if plan.row_sums is not None:
            ROW_SUMS(plan.row_sums, (m,), (xr, dyr, w, mean, rstd, sums), (m, n, stride_x, stride_dy))
        BWD(plan.main, (groups, plan.col_blocks), (xr, dyr, dsr, dx, w, mean, rstd, sums, part_w, part_b),
            (m, n, stride_x, stride_dy, stride_ds, per_program))
        if plan.reduce is not None:
            SUM_PARTIALS(plan.reduce, plan.reduce_grid,
                         (part_w, part_b, dx if dw is None else dw, dx if db is None else db), (groups, n))
    return dx, dw, db


# ---- autograd, and the torch.library ops torch.compile sees ---------------------------------
# gptfast::layer_norm -> (y, mean, rstd) and gptfast::add_layer_norm -> (y, s, mean, rstd) are
# opaque ops (see gptfast/kernels/__init__.py) over validated input (the public functions check it):
# they also return the fp32 row statistics the backward needs, which the public functions drop.
# gptfast::layer_norm_backward serves both; it has no autograd (no double backward). In eager
# mode the autograd functions call the implementations directly (the custom op's dispatch costs
# ~30 µs a call on a 2-core CPU); under torch.compile they call the ops.


def _rows(x: torch.Tensor):
    """M, the number of rows of N = x.shape[-1] elements (symbolic under dynamic shapes)."""
    return math.prod(x.shape[:-1])


def _backward_impl(dy: torch.Tensor, dsum: torch.Tensor | None, x: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx + dsum, dweight, dbias) for the normalized input x (add_layer_norm: the sum s);
    an absent weight or bias gets an empty placeholder gradient."""
    dx, dw, db = _backward(dy, dsum, x, weight, bias, mean, rstd)
    return dx, dx.new_empty(0) if dw is None else dw, dx.new_empty(0) if db is None else db


_backward_op = torch.library.custom_op("gptfast::layer_norm_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _(dy, dsum, x, weight, bias, mean, rstd):
    def grad(p):
        return x.new_empty(0) if p is None else torch.empty_like(p)
    return x.new_empty(x.shape), grad(weight), grad(bias)


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` belongs to a trace (torch.compile, or AOT/make_fx tracing with fake or
    functional tensor subclasses): such calls go through the ops, plain tensors run directly."""
    return type(t) is not torch.Tensor or torch.compiler.is_compiling()


def _backward_call(dy, dsum, x, weight, bias, mean, rstd):
    """(dx, dweight, dbias), None for an absent weight or bias: the implementation itself, or
    the op inside a trace."""
    if not _traced(dy):
        return _backward(dy, dsum, x, weight, bias, mean, rstd)
    dx, dw, db = _backward_op(dy, dsum, x, weight, bias, mean, rstd)
    return dx, None if weight is None else dw, None if bias is None else db


def _layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


def _layer_norm_fake(x, weight, bias, eps):
    stats = x.new_empty(_rows(x), dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) grads
    ctx.save_for_backward(x, weight, bias, mean, rstd)


@once_differentiable("layer_norm")
def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    return *_backward_call(dy, None, *ctx.saved_tensors), None


def _add_layer_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, residual, weight, bias, eps)


def _add_layer_norm_fake(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    stats = x.new_empty(_rows(x), dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), stats,
            torch.empty_like(stats))


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.dtypes = x.dtype, residual.dtype
    ctx.save_for_backward(s, weight, bias, mean, rstd)


@once_differentiable("add_layer_norm")
def _add_layer_norm_backward(ctx, dy, dsum, _dmean, _drstd):
    x_dtype, r_dtype = ctx.dtypes
    if dy is None:  # only the sum was used downstream
        return dsum.to(x_dtype), dsum.to(r_dtype), None, None, None
    ds, dw, db = _backward_call(dy, dsum, *ctx.saved_tensors)
    return ds.to(x_dtype), ds.to(r_dtype), dw, db, None


_layer_norm = library_op("layer_norm", _layer_norm_forward, _layer_norm_fake, _layer_norm_setup,
                         _layer_norm_backward)
_add_layer_norm = library_op("add_layer_norm", _add_layer_norm_forward, _add_layer_norm_fake,
                             _add_layer_norm_setup, _add_layer_norm_backward)


def _needs_op(x, weight, bias, residual=None) -> bool:
    """Whether a call goes through the op: to record autograd, or into a trace. Otherwise
    (inference, or nothing requires grad) it launches the forward directly."""
    if _traced(x):
        return True
    return torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad) or (residual is not None and residual.requires_grad))


# ---- input checks and the public functions ---------------------------------------------------


def _check(op, x, residual, weight, bias, eps) -> None:
    """Every input problem named in Python, before any launch. The common case (tensors on one
    device, float dtypes, a float eps) is a few attribute reads; the slow path names the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    device = x.device
    same = x.dtype in FLOAT_DTYPES
    if residual is not None or op == "add_layer_norm":
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{op}: residual must be a torch.Tensor shaped like x, got "
                            f"{type(residual).__name__} (without a residual, call layer_norm)")
        same = same and residual.device == device and residual.dtype in FLOAT_DTYPES
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
        same = same and weight.device == device and weight.dtype in FLOAT_DTYPES
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a torch.Tensor, got {type(bias).__name__}")
        same = same and bias.device == device and bias.dtype in FLOAT_DTYPES
    if not same:
        check_device(op, x=x, residual=residual, weight=weight, bias=bias)
        check_float(op, x=x, residual=residual, weight=weight, bias=bias)
    else:
        check_launchable(op, x)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the normalized last one)")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"{op}: the normalized (last) dimension must have 1 to {MAX_N} elements, got {n}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    if weight is not None and (weight.dim() != 1 or weight.numel() != n):
        _bad_param(op, "weight", weight, n)
    if bias is not None and (bias.dim() != 1 or bias.numel() != n):
        _bad_param(op, "bias", bias, n)
    # Any finite eps, as torch's: eps = 0 on a constant row gives NaN there, as torch does.
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise ValueError(f"{op}: eps must be a finite number, got {eps!r}")
    if not math.isfinite(eps):
        raise ValueError(f"{op}: eps must be a finite number, got {eps!r}")


def _bad_param(op, name, p, n):
    raise ValueError(f"{op}: {name} must have shape ({n},) like the last dimension of x, got {tuple(p.shape)}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x (any leading dims), like F.layer_norm(x, (N,), ...).

    x: fp32/fp16/bf16, N = x.shape[-1] in 1..MAX_N. weight, bias: optional, shape (N,), any float
    dtype. Returns a tensor shaped like x, in x's dtype. Differentiable in x, weight and bias.
    """
    _check("layer_norm", x, None, weight, bias, eps)
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if _needs_op(x, weight, bias):
        return _layer_norm(x, weight, bias, float(eps))[0]
    return _forward(x, None, weight, bias, float(eps), False)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(s, weight, bias, eps), s) with s = x + residual, in one pass each way.

    s is x + residual computed in fp32 and rounded once to their promoted dtype (what eager
    ``x + residual`` gives: e.g. fp32 for a bf16 branch output added to an fp32 residual stream
    under autocast); that rounded s is what gets normalized, and the output has s's dtype.
    residual must have x's shape. Gradients reach x and residual (the grad of s plus the norm's
    input grad, cast to each input's dtype).
    """
    _check("add_layer_norm", x, residual, weight, bias, eps)
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if _needs_op(x, weight, bias, residual):
        y, s, _, _ = _add_layer_norm(x, residual, weight, bias, float(eps))
    else:
        y, s, _, _ = _forward(x, residual, weight, bias, float(eps), False)
    return y, s
