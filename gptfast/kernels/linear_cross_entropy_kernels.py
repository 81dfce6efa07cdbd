"""The Triton kernels of the fused linear + cross-entropy (see
gptfast/kernels/linear_cross_entropy.py for the op, its chunk loop and launch plans)."""

import triton
import triton.language as tl


@triton.jit
def _classify(t, V, ignore_index):
    """(ignored, bad) for targets t of any integer dtype: ignore_index, or outside [0, V)."""
    ignored = t == ignore_index
    return ignored, ~ignored & ((t < 0) | (t >= V))


# Targets, in one program, before the products when the gradients' scale or the check needs
# them: reads the N targets (int64/int32) in blocks and stores the count of valid targets and
# the index of the first bad one (N if none) in STATS, and the gradients' scale in SCALE (fp32:
# 1/count, rounded as torch's fp32 division, with MEAN, "mean"'s; else 1, "sum"'s), which
# _ce_kernel reads. 8 bytes per token read, one launch; one program keeps the count and the
# first index exact without atomics (8192 tokens: 2 steps).
@triton.jit
def _targets_kernel(TARGETS, STATS, SCALE, N, V, ignore_index, MEAN: tl.constexpr,
                    BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    count = tl.zeros([], tl.int32)
    first_bad = tl.zeros([], tl.int32) + N
    for start in range(0, N, BLOCK):
        idx = start + offsets
        ok = idx < N
        ignored, bad = _classify(tl.load(TARGETS + idx, mask=ok, other=ignore_index), V, ignore_index)
        count += tl.sum((ok & ~ignored & ~bad).to(tl.int32), axis=0)
        first_bad = tl.minimum(first_bad, tl.min(tl.where(ok & bad, idx, N), axis=0))
    tl.store(STATS, count)
    tl.store(STATS + 1, first_bad)
    if MEAN:  # inf for no valid target, as torch's 1 / 0
        tl.store(SCALE, tl.div_rn(tl.full([], 1.0, tl.float32), count.to(tl.float32)))
    else:
        tl.store(SCALE, tl.full([], 1.0, tl.float32))


# The loss, in one program, after the row kernel: the N per-token losses (fp32) summed in fp64
# in a fixed order (blocks, then a tree within each: deterministic, and exact enough to add no
# rounding of its own), for MEAN divided in fp64 by the count of valid targets it counts from
# the targets (0/0 = nan when all are ignored, as torch), and rounded once into the fp32 OUT.
# 12 bytes per token read, one launch: what a sum, a count and a division took three for.
@triton.jit
def _loss_kernel(LOSS, TARGETS, OUT, N, V, ignore_index, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([], tl.float64)
    count = tl.zeros([], tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + offsets
        ok = idx < N
        total += tl.sum(tl.load(LOSS + idx, mask=ok, other=0.0).to(tl.float64), axis=0)
        if MEAN:
            ignored, bad = _classify(tl.load(TARGETS + idx, mask=ok, other=ignore_index), V,
                                     ignore_index)
            count += tl.sum((ok & ~ignored & ~bad).to(tl.int32), axis=0)
    if MEAN:
        total = total / count.to(tl.float64)
    tl.store(OUT, total.to(tl.float32))


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
def _grad_step(z_row, start, cols, V, m, p_scale, hit, flat, target, ignored,
               HAS_SMOOTHING: tl.constexpr, MASKED: tl.constexpr):
    """Overwrite one block of logits with their gradient, (softmax - smoothed one-hot) x scale:
    exp(z - m) x (scale / s), less ``flat`` = scale x smoothing / V everywhere (smoothing) and
    ``hit`` = scale x (1 - smoothing) at the target (the scale is folded into the constants:
    one rounding after the exp, where multiplying by 1/s and then by the scale took two)."""
    z = _load_block(z_row, start, cols, V, 0.0, MASKED)
    grad = tl.exp(z - m) * p_scale
    if HAS_SMOOTHING:
        grad -= flat
    grad = tl.where(start + cols == target, grad - hit, grad)
    grad = tl.where(ignored, 0.0, grad).to(z_row.dtype.element_ty)
    if MASKED:
        tl.store(z_row + start + cols, grad, mask=start + cols < V)
    else:
        tl.store(z_row + start + cols, grad)


# One program per logits row of a chunk, looping over BLOCK_V-column blocks of the row.
# Pass 1 reads the row once (V elements of the input dtype) and keeps a running max and the sum
# of exp(z - max) (one exp per element; each block's max rescales the sum), plus the row sum of
# z for label smoothing, and reads the target's logit (one element). Pass 2, only when gradients are wanted, re-reads the row and
# writes the gradient over it in place: a program's row (100 KB at V = 50,257 in bf16) was read
# just before, and the rows in flight (bf16: 3 programs of 8 warps per SM at 80 registers, ~40
# MB on an H100) fit in its 50 MB L2, so the second read comes from L2 and HBM traffic is one
# read and one write of the logits; 12 bytes (an int64 target, the loss) per row besides. (fp32 rows, 4
# programs per SM at 56 registers: ~106 MB in flight, more than L2 holds: part of the second
# read may come from HBM.) Rows are stride_row apart (V rounded up to 16 elements by the host),
# so whole blocks load and store 128 bits at a time. No atomics: each row's results belong to
# one program. The targets are the caller's (int64/int32): ignore_index gives loss 0 and no
# gradient, a target outside [0, V) (unchecked: see _targets_kernel) NaN, never a read outside
# the row.
@triton.jit
def _ce_kernel(
    LOGITS, TARGETS, LOSS, SCALE, V, stride_row, ignore_index, smoothing,
    WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = LOGITS + row.to(tl.int64) * stride_row
    target = tl.load(TARGETS + row)
    ignored, bad = _classify(target, V, ignore_index)
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
    target = tl.where(ignored | bad, 0, target).to(tl.int32)  # never read outside the row
    z_target = tl.load(z_row + target).to(tl.float32)
    if HAS_SMOOTHING:
        z_mean = z_sum / V
        loss = (1.0 - smoothing) * (m - z_target) + smoothing * (m - z_mean) + log_s
    else:
        loss = (m - z_target) + log_s
    tl.store(LOSS + row, tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss)))
    if WRITE_GRAD:
        if ROW_SCALE:
            scale = tl.load(SCALE + row)
        else:
            scale = tl.load(SCALE)
        scale = tl.where(ignored, 0.0, tl.where(bad, float("nan"), scale))  # (1/count: inf if 0)
        p_scale = scale / s
        hit = scale * (1.0 - smoothing) if HAS_SMOOTHING else scale
        flat = scale * (smoothing / V)
        for start in range(0, full, BLOCK_V):
            _grad_step(z_row, start, cols, V, m, p_scale, hit, flat, target, ignored,
                       HAS_SMOOTHING, False)
        if full < V:
            _grad_step(z_row, full, cols, V, m, p_scale, hit, flat, target, ignored,
                       HAS_SMOOTHING, True)
