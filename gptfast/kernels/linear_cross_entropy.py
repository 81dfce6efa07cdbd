"""Fused output projection + cross-entropy: the training loss without the (tokens x vocab) logits.

``linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing)``
has the value and the gradients (to hidden, weight, bias) of
``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ...)`` for hidden (..., d),
weight (V, d), targets (...) of class indices.

Plan, per chunk of C tokens (one (C, V) buffer, reused by every chunk):
  1. logits = hidden_c @ weight^T (+ bias): cuBLAS, in the input dtype with fp32 accumulation,
     rounded once (F.linear's numbers), written into the buffer;
  2. one Triton program per token row (``_ce_kernel``): online max / log-sum-exp over the row in
     fp32, the row's loss (label smoothing included, 0 for ignore_index), and, when gradients
     are wanted, d(loss)/d(logits) = scale * (softmax - smoothed one-hot) written over the
     logits in place (the scale is 1/count of non-ignored targets for "mean", 1 for "sum");
  3. grad_hidden_c = dlogits @ weight (cuBLAS, fp32 output, rounded once into its rows of
     grad_hidden); dweight += dlogits^T @ hidden_c into one fp32 (V, d) accumulator (cuBLAS with
     an fp32 output on CUDA: no rounding to bf16 between chunks); dbias += column sums in fp64.
The loss is the fp64 sum of the per-token losses rounded once to fp32 (divided in fp64 by the
count for "mean": all ignored gives 0/0 = nan, as torch does): one program (``_loss_kernel``).
Without gradients and without the target check a call is 3 launches (the logits product, the
row kernel, the loss kernel), as F.linear + F.cross_entropy are.

Aligned GEMMs: cuBLAS picks its fast (sm_90, 16-byte vectorised) kernels only when the
contiguous extent of every operand is a multiple of 8 elements (ATen passes the strided views
through with their leading dimensions, see prepare_matrix_for_cublas in ATen's Blas.cpp); a
vocabulary of 50,257 makes the logits' M, grad_hidden's K and dweight's N odd, and cuBLAS falls
back to an sm_75 align-1 kernel (``cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1``
on the H200, 2026-12-04). So without a bias each product runs over an aligned main part of the
vocabulary (V rounded down to a multiple of 64: weight[:V_main], a contiguous view, and the
buffer's first V_main columns) and a small tail (the last V - V_main < 64 rows, 0.03% of the
FLOPs at V = 50,257), with no copy of the weight. With a bias, weight and bias are padded with
zero rows to the buffer's 16-aligned row length (one copy per call, V x d more memory): the
logits are then one contiguous ``addmm`` whose bias cuBLASLt adds in its epilogue before the
single rounding, as F.linear does. (An ``addmm`` into a strided view copies the bias into it and
adds the product with beta = 1; on the H200, cuBLAS with torch's default reduced-precision
reductions rounded the product to fp16 before adding the bias: 6x eager's loss error in fp16.)

Gradients for "mean"/"sum" are computed in the forward and saved; the backward only multiplies
them by grad_output into new tensors (the saved ones are never modified, so in-place changes of
the loss, or a second backward with retain_graph, work). For ``reduction="none"`` the gradient
of each row depends on its own grad_output, unknown in the forward: the forward computes the
losses only, and the backward reruns the chunk loop (one more logits matmul) with per-row scales.
Without gradients (no_grad, or no input requiring grad) only steps 1-2 run, loss only. Double
backward is not supported (a clear error says so).

Memory: peak extra memory is the chunk buffer, C x V elements of the input dtype (rows V rounded
up to 16 elements apart: aligned, vectorised rows) with C chosen so that it holds at most
CHUNK_BYTES = 128 MiB (at most 1334 rows at V = 50,257 in bf16, 667 in fp32; the plans
module's, gptfast/kernels/linear_cross_entropy_plans.py, with the other launch plans),
plus the fp32 dweight accumulator (V x d), one chunk's fp32 grad_hidden (C x d), the padded
weight with a bias (V x d), and the gradients themselves (hidden's and weight's sizes):
O(C x V + V x d), never a (tokens x vocab) tensor. (With fp16/bf16 on a torch whose addmm cannot accumulate into an fp32 tensor, each
chunk's fp32 product is one more V x d.) Eager linear + cross-entropy holds the logits, their
fp32 copy, the log-softmax and the logits' gradient: 4 (tokens x vocab) tensors.

Targets: int64 or int32; a target outside [0, V) that is not ``ignore_index`` is an error.
The kernels read the caller's targets as they are. One small kernel (``_targets_kernel``),
run when the check or the gradients' scale needs it, counts the valid ones, finds the first bad
one and writes the gradients' scale (1/count for "mean", 1 for "sum"); the call then reads that
index (a host sync, ``check_targets=True``, the default) and raises the same ValueError on CUDA
as on CPU before the GEMMs run: no device-side assert, the process goes on.
``check_targets=False`` (targets already validated, e.g. by ``gptfast.dataset``) skips the read,
and so does a CUDA graph capture: a bad target then gives a NaN loss for its token (and NaN
gradients), never a read outside the row.

Autocast: hidden, weight and bias are cast to the autocast dtype (F.linear's policy) and the
loss is computed in fp32 (cross-entropy's), so the op behaves like the unfused pair under it.

Host path: the kernels launch through ``_common.Kernel`` (no Triton dispatch per call) with
configs cached by ``plan_cache`` (per vocabulary and flags); one chunk takes its tensors whole
(no views, grad_hidden is its product), no torch op computes the count, the scale or the
loss, and a call without gradients skips the autograd op (the loss alone, directly).

torch.compile sees the ops gptfast::linear_cross_entropy and
gptfast::linear_cross_entropy_backward (the per-token backward of reduction="none").
"""

import contextlib
import functools
import numbers

import torch

from gptfast.kernels import _common
from gptfast.kernels import linear_cross_entropy_plans as plans
from gptfast.kernels._common import (
    FLOAT_DTYPES, check_device, check_float, check_launchable, library_op, on_device,
    once_differentiable,
)
from gptfast.kernels.linear_cross_entropy_kernels import (  # noqa: F401  (tests name them here)
    _ce_kernel, _loss_kernel, _targets_kernel,
)
from gptfast.kernels.linear_cross_entropy_plans import (  # noqa: F401  (tests, the gate, the report)
    _CE, _LOSS, _TARGETS, _ce_plan, _launch, _layout, _loss_plan, _targets_plan, aot_configs,
    chunk_rows, report_cases, row_stride, vocab_parts,
)

_OP = "linear_cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")


# ---- host side -----------------------------------------------------------------------------


@functools.cache
def _accumulating_addmm(device: torch.device) -> bool:
    """Whether this torch's CUDA addmm with ``out_dtype=float32`` takes an fp32 ``self`` (and so
    accumulates fp16/bf16 products into an fp32 tensor in place); older releases require
    ``self`` in the inputs' dtype. Probed once per device on 2x2 tensors."""
    a = torch.zeros((2, 2), dtype=torch.bfloat16, device=device)
    acc = torch.zeros((2, 2), dtype=torch.float32, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except RuntimeError:
        return False
    return True


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as an fp32 tensor, the product of the inputs' values without rounding to their
    dtype: cuBLAS with an fp32 output on CUDA. On CPU (the interpreter) in fp64 (one chunk's
    fp64 copy): the fp32 rounding noise of a chunk's product against eager's product of all
    rows, blocked otherwise, decided the 2x rule at K = 1000 classes by chance (1 seed in 60:
    20 ulps where eager's draw was 4); exact products keep the CPU tests about the kernels.
    (The host bench's CPU tensors stand for CUDA ones: there the CUDA calls are timed.)"""
    if a.is_cuda or _common.CPU_LAUNCH:
        return torch.mm(a, b) if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.double(), b.double()).float()


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the product to the inputs' dtype: in place where
    cuBLAS can accumulate into an fp32 output (fp32 inputs; fp16/bf16 where torch allows it),
    else through an fp32 product (_mm_fp32)."""
    cuda = a.is_cuda or _common.CPU_LAUNCH  # (the host bench times the CUDA calls)
    if cuda and a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif cuda and _accumulating_addmm(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += _mm_fp32(a, b)


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with zero rows appended up to ``rows`` rows (a new contiguous tensor)."""
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _chunked(hidden, weight, bias, targets, ignore_index, scale, smoothing, needs, loss):
    """Writes the per-token losses into ``loss`` (fp32, (N,)) and returns, for each of (hidden,
    weight, bias) flagged in ``needs``, its gradient for upstream per-token weights ``scale``
    (a 1-element or (N,) fp32 tensor; None without gradients), else None. hidden (N, d) and
    weight (V, d) contiguous; targets (N,) contiguous int64/int32. Runs on the tensors' device
    (the caller's ``on_device``)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    need_h, need_w, need_b = needs
    row_scale = scale is not None and scale.numel() > 1
    config = _ce_plan(vocab, need_h or need_w or need_b, row_scale, smoothing > 0)
    stride, rows, ranges = _layout(n, vocab, hidden.element_size(), bias is not None,
                                   plans.CHUNK_BYTES)
    device = hidden.device
    buffer = torch.empty((min(rows, n), stride), dtype=hidden.dtype, device=device)
    if bias is None:  # the products over an aligned main part and the tail (vocab_parts)
        parts = [(weight if hi - lo == vocab else weight[lo:hi], lo, hi) for lo, hi in ranges]
    else:  # the bias inside the product, rounded once with it: weight and bias padded to the
        parts = [(_padded(weight, stride), 0, stride)]  # buffer's aligned rows (zeros beyond V)
        bias_rows = _padded(bias, stride)
    transposed = [w.t() for w, _, _ in parts]
    one_chunk = 0 < n <= rows
    grad_h = torch.empty_like(hidden) if need_h and not one_chunk else None
    # dweight's fp32 sum: over one part, the first chunk's product starts it (no zeros to add to)
    summed = need_w and (len(parts) > 1 or n == 0)
    acc_w = torch.zeros((parts[-1][2], d), dtype=torch.float32, device=device) if summed else None
    acc_b = torch.zeros(vocab, dtype=torch.float64, device=device) if need_b else None
    outs = []
    for start in range(0, n, rows):
        end = min(start + rows, n)
        if one_chunk:  # the whole tensors, no views
            h, full, t, chunk_loss, chunk_scale = hidden, buffer, targets, loss, scale
        else:
            h, full, t, chunk_loss = (hidden[start:end], buffer[: end - start], targets[start:end],
                                      loss[start:end])
            chunk_scale = scale[start:end] if row_scale else scale
        # 16-element aligned rows: cuBLAS writes them at the buffer's stride
        outs = [full if hi - lo == stride else full[:, lo:hi] for _, lo, hi in parts]
        if bias is None:
            for wt, out in zip(transposed, outs):
                torch.mm(h, wt, out=out)
        else:  # (contiguous output: cuBLASLt's bias epilogue, as F.linear; 0 beyond V)
            torch.addmm(bias_rows, h, transposed[0], out=full)
        # the logits' first element stands for the rows (their stride is passed); without
        # gradients the losses stand for the scale, which the kernel then never reads
        if scale is None:
            chunk_scale = chunk_loss
        _CE(config, (end - start,), (full, t, chunk_loss, chunk_scale), (vocab, stride, ignore_index, smoothing))
        if need_h:  # summed over the parts in fp32, rounded once
            grad = _mm_fp32(outs[0], parts[0][0])
            for (w, _, _), out in zip(parts[1:], outs[1:]):
                _addmm_fp32(grad, out, w)
            if one_chunk:  # the product itself (rounded once, if not fp32)
                grad_h = grad if grad.dtype is hidden.dtype else grad.to(hidden.dtype)
            else:
                grad_h[start:end] = grad
        if need_w and acc_w is None:
            acc_w = _mm_fp32(outs[0].t(), h)
        elif need_w:
            for (_, lo, hi), out in zip(parts, outs):
                _addmm_fp32(acc_w[lo:hi] if hi - lo < acc_w.shape[0] else acc_w, out.t(), h)
        if need_b:
            acc_b += (full if vocab == stride else full[:, :vocab]).sum(0, dtype=torch.float64)
    del buffer, parts, transposed, outs
    grad_w = None if acc_w is None else (acc_w if acc_w.shape[0] == vocab else acc_w[:vocab]).to(weight.dtype)
    grad_b = None if acc_b is None else acc_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


def _prepare(hidden, weight, targets, bias, ignore_index, check, mean, need_scale):
    """(hidden rows (N, d), weight, bias and targets (N,) contiguous, the gradients' scale: fp32
    (1,) on the device, 1/count with ``mean``, else 1; None unless ``need_scale``). The targets
    kernel runs when the scale or the check needs it; ``check``: raise the ValueError for the
    first out-of-range target (one host read of its index, skipped while a CUDA graph is
    captured)."""
    rows = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
    flat = targets if targets.dim() == 1 else targets.reshape(-1)
    rows, flat = rows.contiguous(), flat.contiguous()
    scale = None
    if check or need_scale:
        n, vocab = flat.numel(), weight.shape[0]
        stats = torch.empty(2, dtype=torch.int32, device=flat.device)
        scale = torch.empty(1, dtype=torch.float32, device=flat.device)
        _TARGETS(_targets_plan(mean), (1,), (flat, stats, scale), (n, vocab, ignore_index))
        if check and not (flat.is_cuda and torch.cuda.is_current_stream_capturing()):
            first_bad = int(stats[1])
            if first_bad < n:
                raise ValueError(f"{_OP}: target {int(flat[first_bad])} is out of range for {vocab} "
                                 f"classes (and is not ignore_index={ignore_index})")
    return rows, weight.contiguous(), None if bias is None else bias.contiguous(), flat, scale


_NO_CONTEXT = contextlib.nullcontext()


def _no_autocast(device: torch.device):
    """The products in the inputs' dtype: autocast off inside (nothing to do when it is off)."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else _NO_CONTEXT


# ---- autograd, and the torch.library ops torch.compile sees ---------------------------------
# gptfast::linear_cross_entropy -> (loss, grad_hidden, grad_weight, grad_bias): the gradients
# (for grad_output = 1) are computed in the forward for "mean"/"sum" where need_* asks for them,
# else empty placeholders; the public function returns the loss only.
# gptfast::linear_cross_entropy_backward: the per-token backward of reduction="none".


def _or_empty(t, like):
    return like.new_empty(0) if t is None else t


def _compute(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, check,
             needs) -> tuple:
    """(loss, grad_hidden, grad_weight, grad_bias): the loss, and for "mean"/"sum" the gradients
    flagged in ``needs`` (for grad_output = 1; None for the others)."""
    mean = reduction == "mean"
    if reduction == "none":
        needs = (False, False, False)  # the backward computes them, with per-token scales
    else:
        needs = (needs[0], needs[1], needs[2] and bias is not None)
    device = hidden.device
    with on_device(device), _no_autocast(device):
        h, w, b, t, scale = _prepare(hidden, weight, targets, bias, ignore_index, check, mean,
                                     any(needs))
        losses = torch.empty(t.shape, dtype=torch.float32, device=device)
        grad_h, grad_w, grad_b = _chunked(h, w, b, t, ignore_index, scale, label_smoothing, needs,
                                          losses)
        if reduction == "none":
            loss = losses if targets.dim() == 1 else losses.view(targets.shape)
        else:  # the fp64 sum (over the count: 0/0 = nan) rounded once to fp32
            loss = torch.empty((), dtype=torch.float32, device=device)
            _LOSS(_loss_plan(mean), (1,), (losses, t, loss), (t.numel(), w.shape[0], ignore_index))
    if grad_h is not None and hidden.dim() != 2:
        grad_h = grad_h.view(*hidden.shape)
    return loss, grad_h, grad_w, grad_b


def _forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             bias: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
             check_targets: bool, need_hidden: bool, need_weight: bool, need_bias: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad_h, grad_w, grad_b = _compute(hidden, weight, targets, bias, ignore_index, reduction,
                                            label_smoothing, check_targets,
                                            (need_hidden, need_weight, need_bias))
    return loss, _or_empty(grad_h, hidden), _or_empty(grad_w, hidden), _or_empty(grad_b, hidden)


def _fake(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, check_targets,
          need_hidden, need_weight, need_bias):
    loss_shape = targets.shape if reduction == "none" else ()
    loss = hidden.new_empty(loss_shape, dtype=torch.float32)
    grads = reduction != "none"
    return (loss,
            hidden.new_empty(hidden.shape if grads and need_hidden else (0,)),
            weight.new_empty(weight.shape if grads and need_weight else (0,)),
            hidden.new_empty(bias.shape if grads and need_bias and bias is not None else (0,)))


def _setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, reduction, label_smoothing = inputs[:7]
    _, grad_h, grad_w, grad_b = output
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.set_materialize_grads(False)  # no zero tensors for the saved gradients' (absent) grads
    ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, bias)
    else:
        ctx.save_for_backward(grad_h, grad_w, grad_b)


@once_differentiable(_OP)
def _backward(ctx, grad_loss, _gh, _gw, _gb):
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if ctx.reduction == "none":
        hidden, weight, targets, bias = ctx.saved_tensors
        grad_h, grad_w, grad_b = _backward_none(
            grad_loss, hidden, weight, targets, bias, ctx.ignore_index, ctx.label_smoothing,
            need_h, need_w, need_b and ctx.has_bias)
    else:
        saved_h, saved_w, saved_b = ctx.saved_tensors
        pairs = ((saved_h, need_h), (saved_w, need_w), (saved_b, need_b))
        grad_h, grad_w, grad_b = (g * grad_loss if need else None for g, need in pairs)
    return (grad_h if need_h else None, grad_w if need_w else None, None,
            grad_b if need_b and ctx.has_bias else None, None, None, None, None, None, None, None)


@torch.library.custom_op("gptfast::linear_cross_entropy_backward", mutates_args=())
def _backward_none(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
                   label_smoothing: float, need_hidden: bool, need_weight: bool, need_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of reduction="none" for upstream per-token gradients ``grad_loss`` (targets'
    shape): the chunk loop again, each row's gradient scaled by its own grad_loss (the targets
    were checked by the forward)."""
    with on_device(hidden.device), _no_autocast(hidden.device):
        h, w, b, t, _ = _prepare(hidden, weight, targets, bias, ignore_index, False, False, False)
        scale = grad_loss.reshape(-1).to(torch.float32).contiguous()
        grad_h, grad_w, grad_b = _chunked(h, w, b, t, ignore_index, scale, label_smoothing,
                                          (need_hidden, need_weight, need_bias), torch.empty_like(scale))
    grad_h = None if grad_h is None else grad_h.view(*hidden.shape)
    return _or_empty(grad_h, h), _or_empty(grad_w, h), _or_empty(grad_b, h)


@_backward_none.register_fake
def _(grad_loss, hidden, weight, targets, bias, ignore_index, label_smoothing,
      need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(bias.shape if need_bias else (0,)))


_linear_cross_entropy = library_op("linear_cross_entropy", _forward, _fake, _setup, _backward)


# ---- input checks and the public function ---------------------------------------------------


def _check(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing,
           check_targets) -> None:
    """Every input problem named in Python, before any launch (the targets' values: see
    _prepare)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if (t is not None or name != "bias") and not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    device = hidden.device
    if not (hidden.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES
            and weight.device == device and targets.device == device
            and (bias is None or (bias.device == device and bias.dtype in FLOAT_DTYPES))):
        check_device(_OP, hidden=hidden, weight=weight, targets=targets, bias=bias)
        check_float(_OP, hidden=hidden, weight=weight, bias=bias)
    else:
        check_launchable(_OP, hidden)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_OP}: targets must be int64 or int32 class indices, got {targets.dtype}")
    if hidden.dim() == 0:
        raise ValueError(f"{_OP}: hidden must have at least one dimension (the last one is d)")
    d = hidden.shape[-1]
    if d == 0:
        raise ValueError(f"{_OP}: hidden's last dimension d (the projection's input width) must be "
                         f"at least 1, got hidden of shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{_OP}: weight must have shape (vocab, {d}) (d = hidden.shape[-1]), "
                         f"got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError(f"{_OP}: weight must have at least one row (a vocabulary of 1 or more)")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"{_OP}: targets must have shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"without its last dim), got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"{_OP}: bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if type(ignore_index) is not int and (isinstance(ignore_index, bool)
                                          or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if type(label_smoothing) is not float and (isinstance(label_smoothing, bool)
                                               or not isinstance(label_smoothing, numbers.Real)):
        raise ValueError(f"{_OP}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(check_targets, bool):
        raise TypeError(f"{_OP}: check_targets must be True or False, got {check_targets!r}")
    if vocab >= 2**31 or targets.numel() >= 2**31:
        raise ValueError(f"{_OP}: at most 2**31 - 1 classes and tokens")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, *,
                         check_targets: bool = True) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``targets``, fused.

    Equals ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=...,
    reduction=..., label_smoothing=...)`` in value and gradients, without storing the logits.
    hidden (..., d) and weight (V, d) (and bias (V,)) of one float dtype (fp32/fp16/bf16; under
    autocast they are cast to its dtype, as F.linear is); targets (...) int64/int32 in [0, V) or
    ``ignore_index``. Returns an fp32 scalar ("mean", "sum") or the per-token losses, shaped like
    targets ("none"). Differentiable in hidden, weight and bias; gradients are accumulated in fp32
    (dweight across chunks too). Peak extra memory: one (C, V) chunk of logits (at most
    CHUNK_BYTES = 128 MiB) + an fp32 (V, d) accumulator + the gradients.

    A target out of range raises ValueError, on CUDA as on CPU; that check reads one number back
    from the device (a host sync). ``check_targets=False`` skips it for targets known to be
    valid (e.g. batches of ``gptfast.dataset.TokenData``): a bad target then gives a NaN loss.
    """
    _check(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, check_targets)
    ignore_index = int(ignore_index)  # numpy integers too
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # F.linear's autocast policy; the loss stays fp32
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if weight.dtype is not hidden.dtype or (bias is not None and bias.dtype is not hidden.dtype):
        dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
        raise TypeError(f"{_OP}: hidden, weight and bias must have one dtype (as for F.linear), "
                        f"got {', '.join(str(t) for t in sorted(dtypes, key=str))}")
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    if not (needs[0] or needs[1] or needs[2] or _common._traced()):  # the loss alone, directly
        return _compute(hidden, weight, targets, bias, ignore_index, reduction,
                        float(label_smoothing), check_targets, needs)[0]
    return _linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction,
                                 float(label_smoothing), check_targets, *needs)[0]
