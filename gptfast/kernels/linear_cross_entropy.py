"""Fused output projection + cross-entropy: the training loss without the (tokens x vocab) logits.

``linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing)``
has the value and the gradients (to hidden, weight, bias) of
``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ...)`` for hidden (..., d),
weight (V, d), targets (...) of class indices.

Plan, per chunk of C tokens (one (C, V) buffer, reused by every chunk):
  1. logits = hidden_c @ weight^T (+ bias): cuBLAS, in the input dtype with fp32 accumulation,
     exactly what F.linear computes, written into the buffer;
  2. one Triton program per token row (``_ce_kernel``): online max / log-sum-exp over the row in
     fp32, the row's loss (label smoothing included, 0 for ignore_index), and, when gradients
     are wanted, d(loss)/d(logits) = scale * (softmax - smoothed one-hot) written over the
     logits in place (the scale is 1/count of non-ignored targets for "mean", 1 for "sum");
  3. grad_hidden_c = dlogits @ weight (cuBLAS, straight into its rows of grad_hidden);
     dweight += dlogits^T @ hidden_c into one fp32 (V, d) accumulator (cuBLAS with an fp32
     output on CUDA: no rounding to bf16 between chunks); dbias += column sums in fp32.
The loss is the fp32 sum of the per-token losses (divided by the count for "mean": all ignored
gives 0/0 = nan, as torch does).

Gradients for "mean"/"sum" are computed in the forward and saved; the backward only multiplies
them by grad_output into new tensors (the saved ones are never modified, so in-place changes of
the loss, or a second backward with retain_graph, work). For ``reduction="none"`` the gradient
of each row depends on its own grad_output, unknown in the forward: the forward computes the
losses only, and the backward reruns the chunk loop (one more logits matmul) with per-row scales.
Without gradients (no_grad, or no input requiring grad) only steps 1-2 run, loss only.

Memory: peak extra memory is the chunk buffer, C x V elements of the input dtype (rows V rounded
up to 16 elements apart: aligned, vectorised rows) with C chosen so that it holds at most
CHUNK_BYTES = 128 MiB (at most 1334 rows at V = 50,257 in bf16, 667 in fp32),
plus the fp32 dweight accumulator (V x d) and the gradients themselves (hidden's and weight's
sizes): O(C x V + V x d), never a (tokens x vocab) tensor. (With fp16/bf16 on a torch whose
addmm cannot accumulate into an fp32 tensor, each chunk's fp32 product is one more V x d.) Eager linear + cross-entropy holds
the logits, their fp32 copy, the log-softmax and the logits' gradient: 4 (tokens x vocab) tensors.

Targets: int64 or int32; a target outside [0, V) that is not ``ignore_index`` is an error. On
CPU it is checked before anything runs; on CUDA (where reading it back would synchronise every
call) and under torch.compile a device-side assert checks it without a sync, and the kernel
never reads outside the row whatever the target.

Autocast: hidden, weight and bias are cast to the autocast dtype (F.linear's policy) and the
loss is computed in fp32 (cross-entropy's), so the op behaves like the unfused pair under it.

torch.compile sees the ops gptfast::linear_cross_entropy and
gptfast::linear_cross_entropy_backward (the per-token backward of reduction="none").
"""

import functools
import numbers

import torch
import triton
import triton.language as tl

from gptfast.kernels._common import Launch, check_device, check_float, library_op, on_device

CHUNK_BYTES = 1 << 27  # the (C, V) logits buffer of one chunk holds at most this many bytes
_ROW_ALIGN = 64  # chunk rows are rounded to this (GEMM tiles), within the byte budget
_BLOCK_V = (128, 4096)  # narrowest and widest column block of the row loop
_REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _load_block(z_row, start, cols, V, other, MASKED: tl.constexpr):
    """Columns start + cols of a row as fp32; only the row's last, partial block is masked, so
    that the others load 16 bytes per thread and instruction (the rows are 16-element aligned)."""
    if MASKED:
        return tl.load(z_row + start + cols, mask=start + cols < V, other=other).to(tl.float32)
    return tl.load(z_row + start + cols).to(tl.float32)


@triton.jit
def _lse_step(m, s, z_sum, z, ok, HAS_SMOOTHING: tl.constexpr):
    """Online max and sum of exp(z - max) over one more block (and the row sum for smoothing)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
    if HAS_SMOOTHING:
        z_sum += tl.sum(tl.where(ok, z, 0.0), axis=0)
    return m_new, s, z_sum


@triton.jit
def _grad_step(z_row, start, cols, V, m, inv_s, scale, target, valid, smoothing,
               HAS_SMOOTHING: tl.constexpr, MASKED: tl.constexpr):
    """Overwrite one block of logits with their gradient (softmax - one-hot, smoothed) x scale."""
    z = _load_block(z_row, start, cols, V, 0.0, MASKED)
    grad = tl.exp(z - m) * inv_s
    if HAS_SMOOTHING:
        grad -= smoothing / V
        grad = tl.where(start + cols == target, grad - (1.0 - smoothing), grad)
    else:
        grad = tl.where(start + cols == target, grad - 1.0, grad)
    grad = tl.where(valid, grad * scale, 0.0).to(z_row.dtype.element_ty)
    if MASKED:
        tl.store(z_row + start + cols, grad, mask=start + cols < V)
    else:
        tl.store(z_row + start + cols, grad)


# One program per logits row of a chunk, looping over BLOCK_V-column blocks of the row.
# Pass 1 reads the row once (V elements of the input dtype) and keeps a running max and the sum
# of exp(z - max) (one exp per element; each block's max rescales the sum), plus the row sum of
# z for label smoothing, and reads the target's logit (one element). Pass 2, only when gradients
# are wanted, re-reads the row and writes the gradient over it in place: a program's row (100 KB
# at V = 50,257 in bf16) was read just before, and the rows in flight (bf16: 3 programs of 8
# warps per SM at 80 registers, ~40 MB on an H100) fit in its 50 MB L2, so the second read comes
# from L2 and HBM traffic is one read and one write of the logits; 8 bytes (target, loss) per row
# besides. (fp32 rows, 4 programs per SM at 56 registers: ~106 MB in flight, more than L2 holds:
# part of the second read may come from HBM.)
# Rows are stride_row apart (V rounded up to 16 elements by the host), so whole blocks load
# and store 128 bits at a time. No atomics: each row's results belong to one program.
@triton.jit
def _ce_kernel(
    LOGITS, TARGETS, LOSS, SCALE, V, stride_row, smoothing,
    WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = LOGITS + row.to(tl.int64) * stride_row
    target = tl.load(TARGETS + row)  # -1: ignored (the host maps ignore_index to -1)
    valid = target >= 0
    cols = tl.arange(0, BLOCK_V)
    full = V // BLOCK_V * BLOCK_V  # the columns of whole blocks
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    z_sum = tl.zeros([], tl.float32)
    for start in range(0, full, BLOCK_V):
        z = _load_block(z_row, start, cols, V, float("-inf"), False)
        m, s, z_sum = _lse_step(m, s, z_sum, z, True, HAS_SMOOTHING)
    if full < V:
        z = _load_block(z_row, full, cols, V, float("-inf"), True)
        m, s, z_sum = _lse_step(m, s, z_sum, z, full + cols < V, HAS_SMOOTHING)
    # Relative to the max, as log_softmax does: loss = (m - z_t) + log(s), p = exp(z - m) / s
    # (exp(z - lse) would carry the rounding of lse at its magnitude into every probability).
    log_s = tl.log(s)
    safe_target = tl.where(valid & (target < V), target, 0)  # never read outside the row
    z_target = tl.load(z_row + safe_target).to(tl.float32)
    if HAS_SMOOTHING:
        z_mean = z_sum / V
        loss = (1.0 - smoothing) * (m - z_target) + smoothing * (m - z_mean) + log_s
    else:
        loss = (m - z_target) + log_s
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        if ROW_SCALE:
            scale = tl.load(SCALE + row)
        else:
            scale = tl.load(SCALE)
        inv_s = 1.0 / s
        for start in range(0, full, BLOCK_V):
            _grad_step(z_row, start, cols, V, m, inv_s, scale, target, valid, smoothing,
                       HAS_SMOOTHING, False)
        if full < V:
            _grad_step(z_row, full, cols, V, m, inv_s, scale, target, valid, smoothing,
                       HAS_SMOOTHING, True)


# ---- launch heuristics ---------------------------------------------------------------------


def _launch(vocab: int) -> Launch:
    """The row loop's column block (a power of 2 in 128..4096, 16 fp32 values per thread at
    most) and warps for a vocabulary of ``vocab``."""
    block = min(_BLOCK_V[1], max(_BLOCK_V[0], triton.next_power_of_2(vocab)))
    return Launch(block_m=1, block_n=block, num_warps=max(1, block // 512), num_stages=1)


def row_stride(vocab: int) -> int:
    """Elements between logits rows in the chunk buffer: vocab rounded up to 16, so that every
    row starts 16-byte aligned (and Triton, seeing a stride divisible by 16, vectorises)."""
    return triton.cdiv(vocab, 16) * 16


def chunk_rows(tokens: int, vocab: int, element_size: int) -> int:
    """Rows C of a chunk: the fewest chunks whose (C, vocab) buffer fits CHUNK_BYTES, balanced,
    rows rounded up to a multiple of 64 where the budget allows. At least 1 row."""
    budget = max(1, CHUNK_BYTES // (vocab * element_size))
    if tokens <= budget:
        return max(1, tokens)
    per_chunk = triton.cdiv(tokens, triton.cdiv(tokens, budget))
    return min(budget, triton.cdiv(per_chunk, _ROW_ALIGN) * _ROW_ALIGN)


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


def _accumulate_dweight(acc: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc (V, d) fp32 += dlogits^T @ hidden without rounding the chunk's product to the inputs'
    dtype: cuBLAS with an fp32 output on CUDA (accumulating in place where torch allows it, else
    through an fp32 product); on CPU (the interpreter) by an fp32 product of upcast inputs."""
    if hidden.dtype == torch.float32:
        acc.addmm_(dlogits.t(), hidden)
    elif not acc.is_cuda:
        acc.addmm_(dlogits.t().float(), hidden.float())
    elif _accumulating_addmm(acc.device):
        torch.addmm(acc, dlogits.t(), hidden, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(dlogits.t(), hidden, out_dtype=torch.float32)


def _chunked(hidden, weight, bias, targets, scale, smoothing, needs, loss):
    """Writes the per-token losses into ``loss`` (fp32, (N,)) and returns, for each of (hidden,
    weight, bias) flagged in ``needs``, its gradient for upstream per-token weights ``scale``
    (a 1-element or (N,) fp32 tensor), else None. hidden (N, d) and weight (V, d) contiguous;
    targets (N,) int32 with -1 for ignored tokens."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    need_h, need_w, need_b = needs
    write_grad = any(needs)
    grad_h = torch.empty_like(hidden) if need_h else None
    acc_w = torch.zeros((vocab, d), dtype=torch.float32, device=hidden.device) if need_w else None
    acc_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
    launch = _launch(vocab)
    stride = row_stride(vocab)
    rows = chunk_rows(n, stride, hidden.element_size())
    buffer = torch.empty((min(rows, n), stride), dtype=hidden.dtype, device=hidden.device)
    buffer = buffer[:, :vocab]  # 16-element aligned rows: cuBLAS writes them at that stride
    row_scale = scale.numel() > 1
    weight_t = weight.t()
    with on_device(hidden.device):
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h, logits = hidden[start:end], buffer[: end - start]
            if bias is None:
                torch.mm(h, weight_t, out=logits)
            else:
                torch.addmm(bias, h, weight_t, out=logits)
            _ce_kernel[(end - start,)](
                logits, targets[start:end], loss[start:end], scale[start:end] if row_scale else scale,
                vocab, stride, smoothing, WRITE_GRAD=write_grad, ROW_SCALE=row_scale,
                HAS_SMOOTHING=smoothing > 0, BLOCK_V=launch.block_n, num_warps=launch.num_warps,
            )
            if need_h:
                torch.mm(logits, weight, out=grad_h[start:end])
            if need_w:
                _accumulate_dweight(acc_w, logits, h)
            if need_b:
                acc_b += logits.sum(0, dtype=torch.float32)
    del buffer
    grad_w = None if acc_w is None else acc_w.to(weight.dtype)
    grad_b = None if acc_b is None else acc_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


def _prepare(hidden, weight, targets, bias, ignore_index):
    """(hidden rows (N, d), weight, bias contiguous; targets as int32 with -1 where ignored)."""
    rows = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat = targets.reshape(-1)
    mapped = torch.where(flat == ignore_index, -1, flat).to(torch.int32)
    return rows, weight.contiguous(), None if bias is None else bias.contiguous(), mapped


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


# ---- autograd, and the torch.library ops torch.compile sees ---------------------------------
# gptfast::linear_cross_entropy -> (loss, grad_hidden, grad_weight, grad_bias): the gradients
# (for grad_output = 1) are computed in the forward for "mean"/"sum" where need_* asks for them,
# else empty placeholders; the public function returns the loss only.
# gptfast::linear_cross_entropy_backward: the per-token backward of reduction="none".


def _or_empty(t, like):
    return like.new_empty(0) if t is None else t


def _forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             bias: torch.Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
             need_hidden: bool, need_weight: bool, need_bias: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w, b, t = _prepare(hidden, weight, targets, bias, ignore_index)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    if reduction == "none":
        needs = (False, False, False)  # the backward computes them, with per-token scales
    count = (t >= 0).sum().to(torch.float32)
    scale = (1.0 / count if reduction == "mean" else torch.ones((), device=h.device)).reshape(1)
    losses = torch.empty(targets.shape, dtype=torch.float32, device=h.device)
    with _no_autocast(h.device):
        grad_h, grad_w, grad_b = _chunked(h, w, b, t, scale, label_smoothing, needs, losses.view(-1))
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum() / count if reduction == "mean" else losses.sum()
    grad_h = None if grad_h is None else grad_h.view(hidden.shape)
    return loss, _or_empty(grad_h, h), _or_empty(grad_w, h), _or_empty(grad_b, h)


def _fake(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing,
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
    ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, bias)
    else:
        ctx.save_for_backward(grad_h, grad_w, grad_b)


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
            grad_b if need_b and ctx.has_bias else None, None, None, None, None, None, None)


@torch.library.custom_op("gptfast::linear_cross_entropy_backward", mutates_args=())
def _backward_none(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                   targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
                   label_smoothing: float, need_hidden: bool, need_weight: bool, need_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of reduction="none" for upstream per-token gradients ``grad_loss`` (targets'
    shape): the chunk loop again, each row's gradient scaled by its own grad_loss."""
    h, w, b, t = _prepare(hidden, weight, targets, bias, ignore_index)
    scale = grad_loss.reshape(-1).to(torch.float32).contiguous()
    with _no_autocast(h.device):
        grad_h, grad_w, grad_b = _chunked(h, w, b, t, scale, label_smoothing,
                                          (need_hidden, need_weight, need_bias), torch.empty_like(scale))
    grad_h = None if grad_h is None else grad_h.view(hidden.shape)
    return _or_empty(grad_h, h), _or_empty(grad_w, h), _or_empty(grad_b, h)


@_backward_none.register_fake
def _(grad_loss, hidden, weight, targets, bias, ignore_index, label_smoothing,
      need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(bias.shape if need_bias else (0,)))


_linear_cross_entropy = library_op("linear_cross_entropy", _forward, _fake, _setup, _backward)


# ---- input checks and the public function ---------------------------------------------------

_OP = "linear_cross_entropy"


def _check(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing) -> None:
    """Every input problem named in Python, before any launch (values of CPU targets too)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if (t is not None or name != "bias") and not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(_OP, hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_float(_OP, hidden=hidden, weight=weight, bias=bias)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_OP}: targets must be int64 or int32 class indices, got {targets.dtype}")
    if hidden.dim() == 0:
        raise ValueError(f"{_OP}: hidden must have at least one dimension (the last one is d)")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{_OP}: weight must have shape (vocab, {d}) (d = hidden.shape[-1]), "
                         f"got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError(f"{_OP}: weight must have at least one row (a vocabulary of 1 or more)")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_OP}: targets must have shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"without its last dim), got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"{_OP}: bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{_OP}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if vocab >= 2**31 or targets.numel() >= 2**31:
        raise ValueError(f"{_OP}: at most 2**31 - 1 classes and tokens")


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets in [0, vocab) or ignore_index: checked now on CPU in eager mode; otherwise by a
    device-side assert (no host sync), which fails the call's stream on a bad target."""
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        if targets.numel() and bad.any():
            value = targets[bad][0].item()
            raise ValueError(f"{_OP}: target {value} is out of range for {vocab} classes "
                             f"(and is not ignore_index={ignore_index})")
        return
    torch._assert_async(~bad.any(), f"{_OP}: a target is out of range for {vocab} classes")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``targets``, fused.

    Equals ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=...,
    reduction=..., label_smoothing=...)`` in value and gradients, without storing the logits.
    hidden (..., d) and weight (V, d) (and bias (V,)) of one float dtype (fp32/fp16/bf16; under
    autocast they are cast to its dtype, as F.linear is); targets (...) int64/int32 in [0, V) or
    ``ignore_index``. Returns an fp32 scalar ("mean", "sum") or the per-token losses, shaped like
    targets ("none"). Differentiable in hidden, weight and bias; gradients are accumulated in fp32
    (dweight across chunks too). Peak extra memory: one (C, V) chunk of logits (at most
    CHUNK_BYTES = 128 MiB) + an fp32 (V, d) accumulator + the gradients.
    """
    _check(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing)
    ignore_index = int(ignore_index)  # numpy integers too
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # F.linear's autocast policy; the loss stays fp32
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"{_OP}: hidden, weight and bias must have one dtype (as for F.linear), "
                        f"got {', '.join(str(t) for t in sorted(dtypes, key=str))}")
    _check_targets(targets, weight.shape[0], ignore_index)
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    return _linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction,
                                 float(label_smoothing), *needs)[0]


# ---- ahead-of-time compile configs -----------------------------------------------------------

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _config(t: str, launch: Launch, write_grad=True, row_scale=False, smoothing=True) -> dict:
    constexprs = dict(WRITE_GRAD=write_grad, ROW_SCALE=row_scale, HAS_SMOOTHING=smoothing,
                      BLOCK_V=launch.block_n)
    types = {"LOGITS": "*" + t, "TARGETS": "*i32", "LOSS": "*fp32", "SCALE": "*fp32",
             "V": "i32", "stride_row": "i32", "smoothing": "fp32"}
    signature = {a: "constexpr" if a in constexprs else types[a] for a in _ce_kernel.arg_names}
    aligned_args = [i for i, a in enumerate(_ce_kernel.arg_names)
                    if signature[a].startswith("*") or a == "stride_row"]
    flags = f"g{write_grad:d}r{row_scale:d}s{smoothing:d}"
    # what a launch's tensors and row stride (a multiple of 16, see row_stride) get
    aligned = {(i,): [["tt.divisibility", 16]] for i in aligned_args}
    return {"name": f"_ce_kernel/{t}/{flags}/{launch.block_n}w{launch.num_warps}", "fn": _ce_kernel,
            "signature": signature, "constexprs": constexprs, "num_warps": launch.num_warps,
            "num_stages": launch.num_stages, "attrs": aligned}


def _plan_vocabs() -> list[int]:
    """One vocabulary size per distinct launch: each column block from 128 to 4096."""
    return [1 << k for k in range(_BLOCK_V[0].bit_length() - 1, _BLOCK_V[1].bit_length())]


def aot_configs():
    """Every (BLOCK_V, num_warps) the heuristic can pick, for fp32/fp16/bf16 logits, compiled
    with the gradient pass and label smoothing on (the most code and registers); the other flag
    combinations (forward only, per-row scales of reduction="none", no smoothing) only drop or
    swap a scalar load and a few elementwise ops, and are compiled at GPT-2's block (4096)."""
    configs = [_config(t, _launch(v)) for t in _TYPES.values() for v in _plan_vocabs()]
    gpt2 = _launch(50257)
    for t in _TYPES.values():
        for write_grad, row_scale, smoothing in ((False, False, False), (False, False, True),
                                                 (True, False, False), (True, True, False),
                                                 (True, True, True)):
            configs.append(_config(t, gpt2, write_grad, row_scale, smoothing))
    return configs


def report_cases(cc: int = 90):
    """GPT-2's training loss at 8 x 1024 tokens and vocabulary 50,257, for the static report
    (gptfast/kernels/report.py): one ``_ce_kernel`` launch per chunk, fp32 and bf16 logits, mean
    reduction without label smoothing. The width (768..1600, 124M..1558M) only enters the
    cuBLAS products, not this kernel's launch: one case per dtype. Per launch a label, its aot
    config (specialised as the JIT specialises the call) and its grid (a full chunk's rows);
    the same on every GPU (``cc``)."""
    from gptfast.kernels.testing import launch_config

    tokens, vocab, launch = 8 * 1024, 50257, _launch(50257)
    cases = []
    for dtype, t in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        rows = chunk_rows(tokens, row_stride(vocab), dtype.itemsize)
        label = f"GPT-2 {tokens}x{vocab} {t} ({triton.cdiv(tokens, rows)} chunks)"
        args = dict(LOGITS="*" + t, TARGETS="*i32", LOSS="*fp32", SCALE="*fp32", V=vocab,
                    stride_row=row_stride(vocab), smoothing=0.0)
        constexprs = dict(WRITE_GRAD=True, ROW_SCALE=False, HAS_SMOOTHING=False,
                          BLOCK_V=launch.block_n)
        cfg = launch_config(f"_ce_kernel {label}", _ce_kernel, args, constexprs,
                            launch.num_warps, launch.num_stages)
        cases.append({"label": label, "config": cfg, "grid": rows})
    return cases
