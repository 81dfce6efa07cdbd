"""Flash attention (FlashAttention-2 style) in Triton: forward, backward, dropout, any length.

``attention(q, k, v, causal, scale, dropout_p, generator)`` computes
``dropout(softmax(q @ k^T * scale + mask)) @ v`` for q of shape (B, H, Tq, D) and k, v of shape
(B, H, Tk, D), like ``torch.nn.functional.scaled_dot_product_attention``, without ever
materialising the Tq x Tk score matrix. One difference from SDPA: the causal mask is aligned
to the bottom-right corner (as for a KV cache), i.e. query i attends keys j <= i + (Tk - Tq).
For Tq == Tk this is the usual lower-triangular mask; SDPA's ``is_causal`` aligns it top-left.

Padded batches: optional per-row ``key_lens`` / ``query_lens`` (right or left padding) restrict
each batch row to its valid windows, read by the kernels from device memory (no host sync); the
causal mask is aligned bottom-right on those windows; padded positions are never read.

Numerics: scores, the online softmax and all accumulators are fp32; ``tl.dot`` operands stay in
the input dtype (fp16/bf16 tensor cores; fp32 inputs use exact "ieee" fp32 products, no TF32).
The forward keeps the per-row log-sum-exp (fp32) so that the backward recomputes the attention
weights tile by tile instead of storing them.

Dropout drops attention weights after the softmax (as in eager PyTorch), with a counter-based
RNG (Philox4x32-7: ``tl.randint4x`` with 7 rounds, FlashAttention-2's count; Salmon et al.
(2011) find 7 rounds of Philox4x32 pass TestU01's BigCrush, 10 is their safety margin) keyed by
(seed, batch*head): each call
(one counter) gives 128 bits, i.e. 8 keep decisions of 16 bits for 8 weights of one row, so
the RNG costs 1/8 of a Philox call per weight (``_dropout_keep`` documents the exact mapping
of weights to counters and bits). A weight is kept iff its 16-bit draw is >= round(p * 2^16):
the applied drop probability is p quantised to a multiple of 2^-16 (``effective_dropout_p``,
within 2^-17 of p), and kept weights are scaled by 1/(1 - that). The backward regenerates
exactly the forward's keep mask, as does ``attention_dropout_mask``.

The seed is a (1,) int64 tensor drawn by ``torch.randint`` on q's device (from its default
generator unless a ``generator`` is given) and the kernels load it from there: no host read.
So a CUDA graph that captures a training step with dropout (``torch.cuda.graph``,
``torch.compile(mode="reduce-overhead")``) draws a fresh seed on each replay, through the CUDA
generator's graph-safe Philox state, as torch's own dropout does. Under torch.compile (see
gptfast/kernels/__init__.py) the draw is part of the graph, i.e. of the graph's RNG:
``torch.manual_seed`` repeats a compiled run, but the masks differ from eager mode's unless
``torch._inductor.config.fallback_random = True`` (then they are the same). Pass no
``generator`` to a compiled call: dynamo cannot trace a torch.Generator (a graph break; an error
with ``fullgraph=True``).
"""

import functools
import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gptfast.kernels import tuning
from gptfast.kernels._common import (
    INTERPRETING, Kernel, Launch, cdiv, check_device, check_float, host_readable, library_op,
    next_power_of_2, on_device, once_differentiable, plan_cache, plan_capability,
)

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
LOG2E = 1.4426950408889634
_INTERPRETED = tl.constexpr(INTERPRETING)
PHILOX_ROUNDS = tl.constexpr(7)  # of the dropout RNG (see above)
# Dropout counts Philox calls per (batch, head) with an int32 counter (one per 8 weights).
MAX_DROPOUT_SCORES = 2**31
MAX_BATCH_HEADS = 65535  # programs of one (batch, head) index CUDA grid axis 1


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc):
    """acc + a @ b; fp32 operands get exact fp32 products (no TF32), like eager PyTorch.

    Triton's interpreter multiplies the raw bits of bf16 operands (it stores bf16 as uint16;
    triton-lang/triton#11584), so there, and only there, bf16 operands are widened to fp32
    first: exact, and the same math as a bf16 tensor-core product with fp32 accumulation.
    """
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif _INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _wide(index):
    """An int64 copy of a row index, so that index * row stride cannot pass 2^31 in int32."""
    return tl.cast(index, tl.int64)


@triton.jit
def _philox_key(seed, off_bh):
    """64-bit Philox key of one (batch, head): its own stream, independent of the others."""
    return seed.to(tl.int64) + (off_bh.to(tl.int64) << 32)


@triton.jit
def _dropout_key(Seed, off_bh, DROPOUT: tl.constexpr):
    """The Philox key of one (batch, head) from the seed in device memory (drawn there by the
    host, so a CUDA graph replays a fresh one); without dropout 0 and the seed is not read."""
    key = tl.zeros([], dtype=tl.int64)
    if DROPOUT:
        key = _philox_key(tl.load(Seed), off_bh)
    return key


@triton.jit
def _dropout_threshold(dropout_p):
    """The 16-bit threshold of a (quantised, see ``effective_dropout_p``) drop probability."""
    return tl.cast(dropout_p * 65536.0, tl.int32)


@triton.jit
def _philox4x32(c0, key, N_ROUNDS: tl.constexpr = PHILOX_ROUNDS):
    """Philox4x32 (Salmon et al., 2011) of the counters (c0, 0, 0, 0) under a 64-bit key: the
    four words ``tl.randint4x(key, c0, N_ROUNDS)`` returns, bit for bit, with each round's high
    and low products taken from one 32x32 -> 64-bit multiply (IMAD.WIDE) instead of two."""
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = c0.to(tl.uint32, bitcast=True)
    c1 = tl.zeros_like(c0)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(N_ROUNDS):
        prod_a = c0.to(tl.uint64) * 0xD2511F53
        prod_b = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (prod_b >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (prod_a >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = prod_b.to(tl.uint32)
        c3 = prod_a.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(key, start_m, start_n, Tk, threshold, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """Keep mask (True = kept) of the weights [start_m + arange(BLOCK_M), start_n +
    arange(BLOCK_N)] of one (batch, head): a (BLOCK_M, BLOCK_N) block, or its transpose if
    KEYS_FIRST.

    One Philox4x32 call per 8 weights of a row; its 4 words give 8 16-bit halves, each
    compared with the threshold (kept iff >= it). Column c of row r draws half c % 2 of word
    2 * (c >> 4 & 1) + (c >> 3 & 1) of the call with counter r * 4 * cdiv(Tk, 32) + (c >> 5)
    * 4 + (c >> 1 & 3): the 8 columns of a call are those one thread holds in the tensor-core
    accumulator layout. ``start_n`` is a multiple of 32 (BLOCK_N >= 32), so any tiling agrees.

    The counters are laid out as that accumulator distributes the block (row = rr * 16 W +
    rw * 16 + r8 * 8 + rl, with W warps along the rows; col >> 1 & 3 across 4 lanes, rl
    across 8, rw across the warps, rr, r8 and col >> 5 in registers), which Triton's default
    layout of the 6-D tensor (rr, r8, col >> 5, rw, rl, col >> 1 & 3) is: the words then reach
    the scores without any data movement between threads.
    """
    NW: tl.constexpr = 4 if _INTERPRETED else tl.extra.cuda.num_warps()
    W: tl.constexpr = NW if NW * 16 <= BLOCK_M else BLOCK_M // 16
    RR: tl.constexpr = BLOCK_M // (16 * W)
    rr = tl.reshape(tl.arange(0, RR), (RR, 1, 1, 1, 1, 1))
    r8 = tl.reshape(tl.arange(0, 2), (1, 2, 1, 1, 1, 1))
    c5 = tl.reshape(tl.arange(0, BLOCK_N // 32), (1, 1, BLOCK_N // 32, 1, 1, 1))
    rw = tl.reshape(tl.arange(0, W), (1, 1, 1, W, 1, 1))
    rl = tl.reshape(tl.arange(0, 8), (1, 1, 1, 1, 8, 1))
    c1 = tl.reshape(tl.arange(0, 4), (1, 1, 1, 1, 1, 4))
    rows = start_m + rr * (16 * W) + rw * 16 + r8 * 8 + rl
    counters = rows * (tl.cdiv(Tk, 32) * 4) + (start_n // 32 + c5) * 4 + c1
    r0, r1, r2, r3 = _philox4x32(counters, key)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [..., col >> 4 & 1, col >> 3 & 1]
    limit = threshold.to(tl.uint32) << 16
    keep = tl.join((words << 16) >= limit, words >= limit)  # [..., col & 1]: low, high half
    # (rr, r8, col >> 5, rw, rl, col >> 1 & 3, col >> 4 & 1, col >> 3 & 1, col & 1) -> (row, col)
    keep = tl.reshape(tl.permute(keep, (0, 3, 1, 4, 2, 6, 7, 5, 8)), (BLOCK_M, BLOCK_N))
    if KEYS_FIRST:
        keep = tl.trans(keep)
    return keep


@triton.jit
def _load_key_tile(k_ptrs, v_ptrs, start_n, stride_kn, stride_vn, cols, offs_d, k_lo, k_hi, D,
                   MASKED: tl.constexpr, LOWER: tl.constexpr, EVEN_D: tl.constexpr):
    """K and V rows ``cols`` (= start_n + arange; the pointers point at them), zero outside
    [k_lo (LOWER), k_hi) (MASKED) and past the head dim."""
    if MASKED:
        mask = cols[:, None] < k_hi
        if LOWER:
            mask = mask & (cols[:, None] >= k_lo)
        if not EVEN_D:
            mask = mask & (offs_d[None, :] < D)
        k = tl.load(k_ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
    return k, v


@triton.jit
def _window(Lens, off_b, T, HAS_LENS: tl.constexpr, LEFT: tl.constexpr):
    """[lo, hi): the valid positions of batch row ``off_b`` among T, read from its length on
    the device (clamped to [0, T]); all T without lengths. Left padding: the last n positions."""
    lo = 0
    hi = T
    if HAS_LENS:
        n = tl.minimum(tl.maximum(tl.load(Lens + off_b), 0), T).to(tl.int32)
        if LEFT:
            lo = T - n
        else:
            hi = n
    return lo, hi


@triton.jit
def _key_range(start_m, q_lo, q_hi, k_lo, k_hi, CAUSAL: tl.constexpr, LOWER: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles a query tile [start_m, start_m + BLOCK_M) must visit, as three bounds.

    Keys [n_lo, n_full) are seen by every valid row of the tile and need no mask; [n_full,
    n_end) are the diagonal / boundary tiles that need the causal and length mask. Causal
    tiles above the diagonal (keys no valid row may see), padded keys, and tiles without a
    valid query row are skipped altogether. Causal is aligned bottom-right on the valid
    windows: row i sees keys j <= i + (k_hi - q_hi). Tiles are aligned to BLOCK_N (so the
    dropout RNG's groups of 8 keys never straddle two): with left-padded keys (LOWER) the
    first valid key k_lo may fall inside a tile, so every tile is masked.
    """
    n_lo = k_lo // BLOCK_N * BLOCK_N
    r_lo = tl.maximum(start_m, q_lo)  # the tile's valid rows: [r_lo, r_hi)
    r_hi = tl.minimum(start_m + BLOCK_M, q_hi)
    if CAUSAL:
        shift = k_hi - q_hi
        seen_by_all = tl.minimum(r_lo + shift + 1, k_hi)
        n_end = tl.minimum(k_hi, r_hi + shift)
    else:
        seen_by_all = k_hi
        n_end = k_hi
    n_full = n_lo
    if not LOWER:
        n_full = tl.maximum(seen_by_all, 0) // BLOCK_N * BLOCK_N
    n_end = tl.where(r_lo < r_hi, n_end, n_lo)
    return n_lo, tl.minimum(n_full, n_end), n_end


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_m, offs_d, lo, hi,
    k_lo, k_hi, shift, Tk, D, qk_scale, key, dropout_p,
    MASKED: tl.constexpr, LOWER: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax update of one query tile with the key tiles [lo, hi).

    In MASKED tiles a row may have seen no key yet (padding, or a query before every valid
    key): its running max stays -inf and its exponentials are taken against 0 instead.
    """
    offs_m = start_m + tl.arange(0, q.shape[0])
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs += _wide(lo) * stride_kn  # 64-bit: lo * row stride may pass 2^31
    v_ptrs += _wide(lo) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_key_tile(k_ptrs, v_ptrs, start_n, stride_kn, stride_vn, cols, offs_d, k_lo,
                              k_hi, D, MASKED, LOWER, EVEN_D)
        # Raw scores; their row max is scaled once per row and the scale enters the
        # exponent in one FMA: exp2(s * scale * log2(e) - m) == exp(s * scale - m'). This
        # needs scale > 0 (the launcher negates K for a negative scale).
        s = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
        if MASKED:
            visible = cols[None, :] < k_hi
            if LOWER:
                visible = visible & (cols[None, :] >= k_lo)
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_ref = m_new
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s * qk_scale - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # normaliser of the un-dropped softmax
        if DROPOUT:
            keep = _dropout_keep(key, start_m, start_n, Tk, _dropout_threshold(dropout_p),
                                 q.shape[0], BLOCK_N, False)
            p = tl.where(keep, p, 0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += _wide(BLOCK_N) * stride_kn
        v_ptrs += _wide(BLOCK_N) * stride_vn
    return acc, l_i, m_i


# Blocking: one program per (BLOCK_M queries, batch*head). The query tile stays in registers
# while K/V stream through in BLOCK_N-key tiles, so Q is read once and K/V once per query tile
# (Tq/BLOCK_M times); the Tq x Tk scores never leave the chip. Writes O once plus one fp32
# log-sum-exp per row. Causal programs skip key tiles above the diagonal and mask only the
# diagonal tiles; the heaviest (last) query tiles are scheduled first. With per-row lengths
# only the valid windows are read (padded query rows are written as zeros, LSE +inf).
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE2, QL, KL, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Tq, Tk, D, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_QL: tl.constexpr, HAS_KL: tl.constexpr, LEFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_lo, q_hi = _window(QL, off_b, Tq, HAS_QL, LEFT)
    k_lo, k_hi = _window(KL, off_b, Tk, HAS_KL, LEFT)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q_ptrs += _wide(offs_m)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh
    k_ptrs += _wide(offs_n)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh
    v_ptrs += _wide(offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd

    row_ok = (offs_m >= q_lo) & (offs_m < q_hi)
    d_ok = offs_d[None, :] < D
    q_mask = row_ok[:, None]
    if not EVEN_D:
        q_mask = q_mask & d_ok
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    key = _dropout_key(Seed, off_bh, DROPOUT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = k_hi - q_hi
    LOWER: tl.constexpr = HAS_KL and LEFT
    n_lo, n_full, n_end = _key_range(start_m, q_lo, q_hi, k_lo, k_hi, CAUSAL, LOWER, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_m, offs_d, n_lo,
        n_full, k_lo, k_hi, shift, Tk, D, qk_scale, key, dropout_p,
        False, LOWER, CAUSAL, DROPOUT, EVEN_D, BLOCK_N,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start_m, offs_d, n_full,
        n_end, k_lo, k_hi, shift, Tk, D, qk_scale, key, dropout_p,
        True, LOWER, CAUSAL, DROPOUT, EVEN_D, BLOCK_N,
    )

    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    # A valid row that saw at least one key. A NaN sum (a NaN or +inf score: NaN weights) is
    # live too (NaN != 0), so NaN reaches O and the LSE as in the exact math, not a zero row.
    live = row_ok & (l_i != 0.0)
    l_safe = tl.where(live, l_i, 1.0)
    o = tl.where(live[:, None], acc / l_safe[:, None], 0.0)
    # log-sum-exp of the scaled scores in base 2, as exp2 uses it; +inf gives weights 0.
    lse2 = tl.where(live, m_i + tl.log2(l_safe), float("inf"))
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh
    o_ptrs += _wide(offs_m)[:, None] * stride_om + offs_d[None, :] * stride_od
    in_t = offs_m < Tq
    o_mask = in_t[:, None]
    if not EVEN_D:
        o_mask = o_mask & d_ok
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE2 + off_bh.to(tl.int64) * Tq + offs_m, lse2, mask=in_t)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


# Blocking: one program per (BLOCK_M rows, batch*head); reads O and dO once, writes one fp32
# delta = rowsum(dO * O) per row, the softmax-backward correction term. Launched only when no dQ
# is wanted (the dQ kernel writes delta otherwise).
@triton.jit
def _bwd_preprocess_kernel(
    O, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq, D, delta_scale,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_m[:, None] < Tq
    if not EVEN_D:
        mask = mask & (offs_d[None, :] < D)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh
    o = tl.load(o_ptrs + _wide(offs_m)[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh
    do = tl.load(do_ptrs + _wide(offs_m)[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * delta_scale
    tl.store(Delta + off_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_ptrs, do_ptrs, lse2_ptrs, delta_ptrs, stride_qm, stride_dom,
    start_n, offs_n, offs_d, lo, hi, q_lo, q_hi, k_lo, shift, Tk, D, qk_scale, key, dropout_p,
    DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over the query tiles [lo, hi).

    With P the weights and Z the keep mask: dV += (P * Z)^T dO, dS = P * (Z * (dO V^T) - delta
    (1 - p)), dK += dS^T Q (delta = rowsum(dO * O) comes times 1 - p from the preprocess
    kernel); the kernel multiplies dK by scale / (1 - p) and dV by 1 / (1 - p) once at the end.
    The scores are computed transposed (keys x queries: S^T = K Q^T), so that their tiles feed
    the dV and dK products from registers, and every product is a key-tile-tall one (wgmma on
    sm_90). (A query-major form, S = Q K^T with P and dS transposed through shared memory, made
    Triton 3.6 and 3.9 pipeline Q and dO into 2-slot buffers read by both mma.sync and async
    wgmma: a slot was refilled while a wgmma still read it; see _dkdv_launch.)
    Rows outside [q_lo, q_hi) load q = dO = lse = delta = 0, which makes their dS and dO zero:
    they add nothing, so the query window needs no mask on the weights. DIAGONAL tiles
    (causal) mask the weights of keys a query may not see, and hold the query that sees only
    the first valid key: its weight is exactly 1, so its dS is exactly 0 (see _single_key).
    """
    offs_m = tl.arange(0, BLOCK_M)
    q_ptrs += _wide(lo) * stride_qm  # 64-bit: lo * row stride may pass 2^31
    do_ptrs += _wide(lo) * stride_dom
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = (rows >= q_lo) & (rows < q_hi)
        qo_mask = row_ok[:, None]
        if not EVEN_D:
            qo_mask = qo_mask & (offs_d[None, :] < D)
        q = tl.load(q_ptrs, mask=qo_mask, other=0.0)
        do = tl.load(do_ptrs, mask=qo_mask, other=0.0)
        lse2 = tl.load(lse2_ptrs + start_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptrs + start_m, mask=row_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32)) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        if DIAGONAL:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + shift, p_t, 0.0)
        dp_t = _mma(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32))
        if DROPOUT:
            keep = _dropout_keep(key, start_m, start_n, Tk, _dropout_threshold(dropout_p),
                                 BLOCK_M, k.shape[0], True)
            dv = _mma(tl.where(keep, p_t, 0.0).to(do.dtype), do, dv)
            dp_t = tl.where(keep, dp_t, 0.0)
        else:
            dv = _mma(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (dp_t - delta[None, :])
        if DIAGONAL:  # times 0, not 0: a NaN stays NaN (see _single_key)
            ds_t = ds_t * tl.where(rows + shift == k_lo, 0.0, 1.0)[None, :]
        dk = _mma(ds_t.to(q.dtype), q, dk)
        q_ptrs += _wide(BLOCK_M) * stride_qm
        do_ptrs += _wide(BLOCK_M) * stride_dom
    return dk, dv


# Blocking: one program per (BLOCK_N keys, batch*head). K and V of the tile and the fp32 dK/dV
# accumulators stay in registers while Q, dO (BLOCK_M rows), LSE and delta stream through; each
# program writes its dK/dV tile once, with no atomics (deterministic). Causal programs start at
# the first query tile that sees the key tile and mask only the diagonal query tiles. Reads Q
# and dO Tk/BLOCK_N times in total; with per-row lengths only the valid windows (padded keys
# get zero gradients).
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, Delta, DK, DV, QL, KL, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Tq, Tk, D, sm_scale, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_QL: tl.constexpr, HAS_KL: tl.constexpr, LEFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_lo, q_hi = _window(QL, off_b, Tq, HAS_QL, LEFT)
    k_lo, k_hi = _window(KL, off_b, Tk, HAS_KL, LEFT)

    key_ok = (offs_n >= k_lo) & (offs_n < k_hi)
    kv_mask = key_ok[:, None]
    if not EVEN_D:
        kv_mask = kv_mask & (offs_d[None, :] < D)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh
    k = tl.load(k_ptrs + _wide(offs_n)[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh
    v = tl.load(v_ptrs + _wide(offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q_ptrs += _wide(offs_m)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh
    do_ptrs += _wide(offs_m)[:, None] * stride_dom + offs_d[None, :] * stride_dod
    lse2_ptrs = LSE2 + off_bh.to(tl.int64) * Tq + offs_m
    delta_ptrs = Delta + off_bh.to(tl.int64) * Tq + offs_m

    key = _dropout_key(Seed, off_bh, DROPOUT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    c_lo = tl.maximum(start_n, k_lo)  # the tile's valid keys: [c_lo, c_hi)
    c_hi = tl.minimum(start_n + BLOCK_N, k_hi)
    m_end = tl.where(c_lo < c_hi, q_hi, 0)  # no valid key: no query tile to visit
    shift = k_hi - q_hi
    m_full = q_lo // BLOCK_M * BLOCK_M
    if CAUSAL:
        # Row i sees keys j <= i + shift: the tile's first valid key is seen from row
        # c_lo - shift on, all of its keys by rows past c_hi - 1 - shift (that row itself
        # stays diagonal: it may be the one that sees only the first key); in between:
        # diagonal tiles.
        m_lo = tl.maximum(c_lo - shift, q_lo) // BLOCK_M * BLOCK_M
        m_full = tl.maximum(tl.cdiv(tl.maximum(c_hi - shift, 0), BLOCK_M) * BLOCK_M, m_lo)
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_ptrs, do_ptrs, lse2_ptrs, delta_ptrs, stride_qm, stride_dom,
            start_n, offs_n, offs_d, m_lo, tl.minimum(m_full, m_end), q_lo, q_hi, k_lo, shift, Tk, D,
            qk_scale, key, dropout_p, True, DROPOUT, EVEN_D, BLOCK_M,
        )
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_ptrs, do_ptrs, lse2_ptrs, delta_ptrs, stride_qm, stride_dom,
        start_n, offs_n, offs_d, m_full, m_end, q_lo, q_hi, k_lo, shift, Tk, D, qk_scale, key, dropout_p,
        False, DROPOUT, EVEN_D, BLOCK_M,
    )

    if DROPOUT:  # the kept weights' 1 / (1 - p), left out of the tiles
        dk = dk * (1.0 / (1.0 - dropout_p))
        dv = dv * (1.0 / (1.0 - dropout_p))
    # One valid key: every weight is exactly 1 and dS exactly 0 (see _single_key).
    dk = tl.where(key_ok[:, None], dk * tl.where(k_hi - k_lo != 1, sm_scale, 0.0), 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    dk_offs = off_b * stride_dkb + off_h * stride_dkh + _wide(offs_n)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_offs = off_b * stride_dvb + off_h * stride_dvh + _wide(offs_n)[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    out_mask = offs_n[:, None] < Tk
    if not EVEN_D:
        out_mask = out_mask & (offs_d[None, :] < D)
    tl.store(DK + dk_offs, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + dv_offs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, start_m, offs_d, lo, hi,
    k_lo, k_hi, shift, Tk, D, qk_scale, key, dropout_p,
    MASKED: tl.constexpr, LOWER: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate dQ of one query tile over the key tiles [lo, hi): dQ += dS K, with dS as in
    _dkdv_tiles (delta comes in times 1 - p; the kernel applies scale / (1 - p) at the end)."""
    offs_m = start_m + tl.arange(0, q.shape[0])
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs += _wide(lo) * stride_kn  # 64-bit: lo * row stride may pass 2^31
    v_ptrs += _wide(lo) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_key_tile(k_ptrs, v_ptrs, start_n, stride_kn, stride_vn, cols, offs_d, k_lo,
                              k_hi, D, MASKED, LOWER, EVEN_D)
        s = _mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            visible = cols[None, :] < k_hi
            if LOWER:
                visible = visible & (cols[None, :] >= k_lo)
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        dp = _mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32))
        if DROPOUT:
            keep = _dropout_keep(key, start_m, start_n, Tk, _dropout_threshold(dropout_p),
                                 q.shape[0], BLOCK_N, False)
            dp = tl.where(keep, dp, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq)
        k_ptrs += _wide(BLOCK_N) * stride_kn
        v_ptrs += _wide(BLOCK_N) * stride_vn
    return dq


@triton.jit
def _single_key(rows, k_lo, k_hi, shift, CAUSAL: tl.constexpr):
    """Whether each query row sees exactly one key. Its softmax weight is then exactly 1 and
    the gradient of its score exactly 0 (dS = P (dP - delta) with delta = P dP = dP); the
    kernels multiply the fp32 rounding residue of dP - rowsum(dO * O) by 0 instead: exactly 0,
    or NaN where a NaN or inf input made it NaN (as the exact math does)."""
    if CAUSAL:
        return tl.minimum(k_hi, rows + shift + 1) - k_lo == 1
    return (k_hi - k_lo == 1) | (rows < 0)


# Blocking: one program per (BLOCK_M queries, batch*head). Q, dO, LSE, delta and the fp32 dQ
# accumulator stay in registers while K/V stream through in BLOCK_N-key tiles (same key ranges
# as the forward); dQ is written once, with no atomics. Reads K and V Tq/BLOCK_M times in total.
# With DELTA it also reads O once and writes delta = rowsum(dO * O) (1 - p) of its rows, which
# the dK/dV kernel launched after it reads: no separate preprocess launch (else it reads delta).
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE2, Delta, DQ, QL, KL, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Tq, Tk, D, sm_scale, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, DELTA: tl.constexpr,
    HAS_QL: tl.constexpr, HAS_KL: tl.constexpr, LEFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_lo, q_hi = _window(QL, off_b, Tq, HAS_QL, LEFT)
    k_lo, k_hi = _window(KL, off_b, Tk, HAS_KL, LEFT)

    row_ok = (offs_m >= q_lo) & (offs_m < q_hi)
    qo_mask = row_ok[:, None]
    if not EVEN_D:
        qo_mask = qo_mask & (offs_d[None, :] < D)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh
    q = tl.load(q_ptrs + _wide(offs_m)[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qo_mask, other=0.0)
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh
    do = tl.load(do_ptrs + _wide(offs_m)[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=qo_mask, other=0.0)
    lse2 = tl.load(LSE2 + off_bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    if DELTA:
        o_ptrs = O + off_b * stride_ob + off_h * stride_oh
        o = tl.load(o_ptrs + _wide(offs_m)[:, None] * stride_om + offs_d[None, :] * stride_od, mask=qo_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # 0 outside the query window
        if DROPOUT:
            delta = delta * (1.0 - dropout_p)
        tl.store(Delta + off_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)
    else:
        delta = tl.load(Delta + off_bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)

    k_ptrs = K + off_b * stride_kb + off_h * stride_kh
    k_ptrs += _wide(offs_n)[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh
    v_ptrs += _wide(offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd

    key = _dropout_key(Seed, off_bh, DROPOUT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = k_hi - q_hi
    LOWER: tl.constexpr = HAS_KL and LEFT
    n_lo, n_full, n_end = _key_range(start_m, q_lo, q_hi, k_lo, k_hi, CAUSAL, LOWER, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, start_m, offs_d, n_lo,
        n_full, k_lo, k_hi, shift, Tk, D, qk_scale, key, dropout_p,
        False, LOWER, CAUSAL, DROPOUT, EVEN_D, BLOCK_N,
    )
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, start_m, offs_d, n_full,
        n_end, k_lo, k_hi, shift, Tk, D, qk_scale, key, dropout_p,
        True, LOWER, CAUSAL, DROPOUT, EVEN_D, BLOCK_N,
    )
    if DROPOUT:
        dq = dq * (1.0 / (1.0 - dropout_p))
    dq = dq * tl.where(_single_key(offs_m, k_lo, k_hi, shift, CAUSAL), 0.0, sm_scale)[:, None]
    if HAS_QL:  # padded rows: 0, also where a NaN key or value made them NaN (rows >= Tq: unwritten)
        dq = tl.where(row_ok[:, None], dq, 0.0)
    out_mask = offs_m[:, None] < Tq
    if not EVEN_D:
        out_mask = out_mask & (offs_d[None, :] < D)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh
    tl.store(dq_ptrs + _wide(offs_m)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=out_mask)


# Blocking: one program per (BLOCK_M x BLOCK_N weights, batch*head); evaluates the same RNG as
# the attention kernels and writes the keep mask as int8. For tests and debugging only.
@triton.jit
def _dropout_mask_kernel(
    Mask, Seed, Tq, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    off_bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(_dropout_key(Seed, off_bh, True), tl.program_id(0) * BLOCK_M,
                         tl.program_id(1) * BLOCK_N, Tk, _dropout_threshold(dropout_p), BLOCK_M,
                         BLOCK_N, False)
    ptrs = Mask + off_bh.to(tl.int64) * Tq * Tk + rows[:, None] * Tk + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < Tq) & (cols[None, :] < Tk))


# --------------------------------------------------------------------------------------------
# Launch heuristics
# --------------------------------------------------------------------------------------------


# The kernels' names in the tuning tables
FWD_KERNEL, DKDV_KERNEL, DQ_KERNEL = "attention.fwd", "attention.dkdv", "attention.dq"


def _shape_class(dtype: torch.dtype, block_d: int, dropout: bool) -> str:
    """The tuning tables' shape class of a launch, e.g. "bf16-d64" or "bf16-d64-dropout"."""
    return f"{_TRITON_DTYPE[dtype]}-d{block_d}" + ("-dropout" if dropout else "")


def _tuned(kernel: str, block_d: int, dtype: torch.dtype, dropout: bool, device) -> Launch | None:
    """The device's tuning-table launch of ``kernel`` at this shape class, or None."""
    config = tuning.lookup(kernel, _shape_class(dtype, block_d, dropout), device)
    return None if config is None else Launch(**config)


def _fwd_launch(block_d: int, dtype: torch.dtype, dropout: bool = False, device=None) -> Launch:
    """Forward tiles: the device's tuning table's, else 128 queries x 64 keys for fp16/bf16
    (FlashAttention-2's shape), 128 x 32 at D=128 (x 64 spills on sm_80), with 8 warps (two
    warpgroups of 64 rows on sm_90): with 4, sm_80's mma.sync accumulators need 255 registers
    and spill. fp32 at D=128: 16 x 32 with 8 warps, 32 x 32 with dropout."""
    if tuned := _tuned(FWD_KERNEL, block_d, dtype, dropout, device):
        return tuned
    if plan_capability(device) is None:  # the interpreter's: little numpy work per program
        return Launch(32, 32, 4, 1)
    if dtype == torch.float32:  # exact fp32 products run on FMA units: small tiles
        if block_d == 128:  # 32 x 32 spills on sm_90, and 16 x 32 does with dropout
            return Launch(32 if dropout else 16, 32, 8, 2)
        return Launch(32, 32, 4, 2)
    return Launch(128, 32 if block_d == 128 else 64, 8, 3)


def _dkdv_launch(block_d: int, dtype: torch.dtype, dropout: bool = False, cc: int | None = 90,
                 device=None) -> Launch:
    """dK/dV tiles: a wide key tile (BLOCK_N) held in registers, thin query tiles streamed; the
    device's tuning table's without dropout, else 8 warps, 64 keys at D=128 (128 spill on sm_80
    under triton 3.6). With dropout (not tuned: the plan depends on the GPU): on sm_80 16-query
    tiles (the RNG's registers: 32 queries spill under triton 3.6); on sm_90 32 x 128 (16 x 128
    at D=128) in 2 stages: 1.97x the dropout-free kernel's SASS per score at D=64 (3 stages:
    2.04x), no spills. Its Q/dO buffers have 2 slots for a prefetch distance of 1, and its
    wgmma products are waited for in the iteration that issues them (the 3-stage query-major
    form that ran on the H200 refilled a slot under a pending wgmma: dK 10x outside the rule).
    """
    if not dropout and (tuned := _tuned(DKDV_KERNEL, block_d, dtype, dropout, device)):
        return tuned
    if cc is None:  # the interpreter's own
        return Launch(16, 32, 4, 1)
    if dtype == torch.float32:
        return Launch(32, 32, 8 if block_d == 128 else 4, 2)  # 4 warps spill at D=128 (3.6)
    if dropout and cc >= 90:
        return Launch(16 if block_d == 128 else 32, 128, 8, 2)
    if dropout:
        return Launch(16, 64 if block_d == 128 else 128, 8, 3)
    return Launch(32, 64 if block_d == 128 else 128, 8, 3)  # 4 warps spill at D=64


def _dq_launch(block_d: int, dtype: torch.dtype, dropout: bool = False, device=None) -> Launch:
    """dQ tiles: a tall query tile (BLOCK_M) held in registers, thin key tiles streamed; the
    device's tuning table's, else 8 warps at D=128 (4 spill on sm_80), 4 elsewhere (with
    dropout too: 1.9x the dropout-free SASS per score on sm_90, where 8 warps cost 2.3x)."""
    if tuned := _tuned(DQ_KERNEL, block_d, dtype, dropout, device):
        return tuned
    if plan_capability(device) is None:  # the interpreter's own
        return Launch(32, 32, 4, 1)
    if dtype == torch.float32:
        return Launch(16, 32, 4, 2)  # 32 x 32 spills on sm_80 (4 warps at D=64/128, 8 at D=32)
    return Launch(128, 32, 8 if block_d == 128 else 4, 3)


def _preprocess_launch(device=None) -> Launch:
    return Launch(32 if plan_capability(device) is None else 64, 0, 4, 1)


# Launches a tuning table may pick (bench/tune.py sweeps them), per kernel and shape class, each
# one compiled by aot_configs() and spill-free on sm_80 and sm_90: GPT-2's bf16 at D=64.
_TILES = {
    FWD_KERNEL: {"bf16-d64": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 3)],
                 "bf16-d64-dropout": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)]},
    DKDV_KERNEL: {"bf16-d64": [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3)]},  # 64 x 64 spills
    DQ_KERNEL: {cls: [(128, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)]
                for cls in ("bf16-d64", "bf16-d64-dropout")},
}
TUNING_SPACE = {kernel: {cls: [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
                               for m, n, w, st in tiles] for cls, tiles in classes.items()}
                for kernel, classes in _TILES.items()}
for _kernel, _space in TUNING_SPACE.items():
    tuning.register(_kernel, _space)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


_FWD, _DKDV, _DQ = Kernel(_fwd_kernel), Kernel(_bwd_dkdv_kernel), Kernel(_bwd_dq_kernel)
_PREPROCESS, _DROPOUT_MASK = Kernel(_bwd_preprocess_kernel), Kernel(_dropout_mask_kernel)


@functools.cache
def _stand_ins(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty int32 and int64 tensors that stand for absent lengths and seed: the kernels' flags
    keep them unread. Made once per device."""
    return (torch.empty(0, dtype=torch.int32, device=device),
            torch.empty(0, dtype=torch.int64, device=device))


def _pointers(device, query_lens, key_lens, seed) -> tuple:
    """The (QL, KL, Seed) pointer arguments, stand-ins where absent."""
    none32, none64 = _stand_ins(device)
    return (none32 if query_lens is None else query_lens, none32 if key_lens is None else key_lens,
            none64 if seed is None else seed)


def _seed_pointer(device, seed):
    """The Seed pointer argument alone (the Hopper variants take no lengths)."""
    return _pointers(device, None, None, seed)[2]


def _flags(causal, dropout, D, block_d, has_ql, has_kl, left) -> dict:
    return dict(CAUSAL=causal, DROPOUT=dropout, EVEN_D=D == block_d, HAS_QL=has_ql,
                HAS_KL=has_kl, LEFT=left, BLOCK_D=block_d)


@plan_cache
def _forward_plan(device, dtype, B, H, Tq, D, causal, dropout, has_ql, has_kl, left):
    """(config, grid) of the forward kernel."""
    block_d = _block_d(D)
    cfg = _fwd_launch(block_d, dtype, dropout, device)
    config = _FWD.config(**_flags(causal, dropout, D, block_d, has_ql, has_kl, left),
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return config, (cdiv(Tq, cfg.block_m), B * H)


def _dq_writes_delta(dtype: torch.dtype) -> bool:
    """Whether the dQ kernel computes delta itself (no preprocess launch): with fp16/bf16. fp32's
    dQ tiles are 16 queries of exact FMA products, and the delta's loads and cross-lane sum made
    sm_80's D=32 tile spill (4 bytes, triton 3.6 and 3.9): fp32 keeps the preprocess kernel."""
    return dtype != torch.float32


@dataclass(frozen=True)
class _BackwardPlan:
    dq: tuple  # (config, grid) of each kernel
    dkdv: tuple
    preprocess: tuple  # delta's own kernel: without a fused-delta dQ, or when no dQ is wanted
    fused_delta: bool  # the dQ kernel writes delta


@plan_cache
def _backward_plan(device, dtype, B, H, Tq, Tk, D, causal, dropout, has_ql, has_kl, left,
                   need_dq):
    block_d = _block_d(D)
    flags = _flags(causal, dropout, D, block_d, has_ql, has_kl, left)
    dq = _dq_launch(block_d, dtype, dropout, device)
    cc = plan_capability(device)
    dkdv = _dkdv_launch(block_d, dtype, dropout, cc, device)
    pre = _preprocess_launch(device)
    fused = need_dq and _dq_writes_delta(dtype)
    return _BackwardPlan(
        dq=(_DQ.config(**flags, DELTA=fused, BLOCK_M=dq.block_m, BLOCK_N=dq.block_n,
                       num_warps=dq.num_warps, num_stages=dq.num_stages),
            (cdiv(Tq, dq.block_m), B * H)),
        dkdv=(_DKDV.config(**flags, BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, num_warps=dkdv.num_warps,
                           num_stages=dkdv.num_stages), (cdiv(Tk, dkdv.block_n), B * H)),
        preprocess=(_PREPROCESS.config(EVEN_D=flags["EVEN_D"], BLOCK_M=pre.block_m,
                                       BLOCK_D=block_d, num_warps=pre.num_warps),
                    (cdiv(Tq, pre.block_m), B * H)),
        fused_delta=fused,
    )


def _forward(q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left):
    B, H, Tq, D = q.shape
    device = q.device
    o = torch.empty_like(q)  # q's memory layout: (B, T, H, D)-strided q gives such an o
    lse2 = torch.empty((B, H, Tq), device=device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse2
    config, grid = _forward_plan(device, q.dtype, B, H, Tq, D, causal, dropout_p > 0,
                                 query_lens is not None, key_lens is not None, left)
    if scale <= 0:  # the forward's row max needs a positive scale: q (-k)^T |scale| is the same
        k, scale = (-k, -scale) if scale < 0 else (torch.zeros_like(k), 1.0)
    padded = query_lens is not None or key_lens is not None
    block_d = _block_d(D)
    if sm90 := attention_sm90.plan(attention_sm90.FWD, q, block_d, dropout_p > 0, padded):
        attention_sm90.forward(sm90, q, k, v, o, lse2, causal, scale, _seed_pointer(device, seed),
                               dropout_p, block_d)
        return o, lse2
    _FWD(config, grid, (q, k, v, o, lse2, *_pointers(device, query_lens, key_lens, seed)),
         (*q.stride(), *k.stride(), *v.stride(), *o.stride(), H, Tq, k.shape[2], D,
          scale * LOG2E, dropout_p))
    return o, lse2


def _backward(do, q, k, v, o, lse2, causal, scale, dropout_p, seed, query_lens, key_lens, left,
              need_dq, need_dkdv):
    """dQ first: with fp16/bf16 its kernel also writes delta, which dK/dV reads (else, or when
    no dQ is wanted, the preprocess kernel writes it)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if q.numel() == 0 or k.numel() == 0:  # no query row: nothing flows back
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    device = q.device
    dq = torch.empty_like(q) if need_dq else None  # gradients in the layouts of q, k, v
    dk = torch.empty_like(k) if need_dkdv else None
    dv = torch.empty_like(v) if need_dkdv else None
    padded = query_lens is not None or key_lens is not None
    if need_dq and attention_sm90.backward(do, q, k, v, o, lse2, dq, dk, dv, causal, scale,
                                           _seed_pointer(device, seed), dropout_p, _block_d(D),
                                           padded):
        return dq, dk, dv
    delta = torch.empty_like(lse2)
    plan = _backward_plan(device, q.dtype, B, H, Tq, Tk, D, causal, dropout_p > 0,
                          query_lens is not None, key_lens is not None, left, need_dq)
    lens_seed = _pointers(device, query_lens, key_lens, seed)
    sizes = (H, Tq, Tk, D, scale, scale * LOG2E, dropout_p)
    if not plan.fused_delta:
        _PREPROCESS(*plan.preprocess, (o, do, delta),
                    (*o.stride(), *do.stride(), H, Tq, D, 1.0 - dropout_p))
    if need_dq:
        _DQ(*plan.dq, (q, k, v, o, do, lse2, delta, dq, *lens_seed),
            (*q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
             *sizes))
    if need_dkdv:
        _DKDV(*plan.dkdv, (q, k, v, do, lse2, delta, dk, dv, *lens_seed),
              (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
               *sizes))
    return dq, dk, dv


# gptfast::attention -> (o, lse2) and gptfast::attention_backward -> (dq, dk, dv): the ops
# torch.compile sees (see gptfast/kernels/__init__.py), over validated input. The dropout seed
# comes in as a (1,) int64 tensor on q's device, drawn by torch.randint outside the op (None
# without dropout), and the kernels load it: no host read, so a compiled graph draws it with its
# own RNG and a CUDA graph replays a fresh draw.


def _backward_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse2: torch.Tensor, causal: bool, scale: float,
                   dropout_p: float, seed: torch.Tensor | None, query_lens: torch.Tensor | None,
                   key_lens: torch.Tensor | None, left: bool, need_dq: bool, need_dkdv: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); a gradient not asked for is an empty placeholder."""
    with on_device(q.device):
        dq, dk, dv = _backward(do, q, k, v, o, lse2, causal, scale, dropout_p, seed, query_lens,
                               key_lens, left, need_dq, need_dkdv)
    return (dq if need_dq else q.new_empty(0), dk if need_dkdv else k.new_empty(0),
            dv if need_dkdv else v.new_empty(0))


def _backward_fake(do, q, k, v, o, lse2, causal, scale, dropout_p, seed, query_lens, key_lens,
                   left, need_dq, need_dkdv):
    def grad(t, needed):
        return torch.empty_like(t) if needed else t.new_empty(0)  # the real op's layouts
    return grad(q, need_dq), grad(k, need_dkdv), grad(v, need_dkdv)


_backward_op = library_op("attention_backward", _backward_body, _backward_fake)


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float, dropout_p: float, seed: torch.Tensor | None,
                       query_lens: torch.Tensor | None, key_lens: torch.Tensor | None, left: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(q.device):
        return _forward(q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left)


def _attention_fake(q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)  # o in q's layout


def _attention_setup(ctx, inputs, output):
    q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left = inputs
    o, lse2 = output
    ctx.mark_non_differentiable(lse2)
    ctx.set_materialize_grads(False)  # no zeros for lse2's (absent) gradient: one launch less
    ctx.save_for_backward(q, k, v, o, lse2, seed, query_lens, key_lens)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.left = causal, scale, dropout_p, left


@once_differentiable("attention")
def _attention_backward(ctx, do, _dlse2):
    q, k, v, o, lse2, seed, query_lens, key_lens = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = _backward_op(do, q, k, v, o, lse2, ctx.causal, ctx.scale, ctx.dropout_p, seed,
                              query_lens, key_lens, ctx.left, need_q, need_k or need_v)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            None, None, None, None, None, None, None)


_attention = library_op("attention", _attention_forward, _attention_fake, _attention_setup,
                        _attention_backward)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, causal, scale, dropout_p) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
    check_device(op, q=q, k=k, v=v)
    check_float(op, q=q, k=k, v=v)
    if causal not in (True, False):
        raise TypeError(f"{op}: causal must be True or False, got {causal!r}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, H, Tq, D), Tk = q.shape, k.shape[2]
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, heads and "
            "head_dim (layout (batch, heads, seq_len, head_dim); grouped-query heads are not supported)"
        )
    if B * H > MAX_BATCH_HEADS:
        raise ValueError(f"{op}: batch * heads must be at most {MAX_BATCH_HEADS} (a CUDA grid axis), got {B * H}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {D}")
    if causal and Tq > Tk:
        raise ValueError(
            f"{op}: causal attention with more queries ({Tq}) than keys ({Tk}): the causal mask is "
            "aligned to the end (query i sees keys j <= i + Tk - Tq), so the first queries would see no key"
        )
    if Tk == 0 and Tq > 0 and B * H > 0:
        raise ValueError(f"{op}: {Tq} queries but no keys (k/v have seq_len 0)")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and Tq * Tk > MAX_DROPOUT_SCORES:
        raise ValueError(
            f"{op}: dropout supports at most 2**31 weights per head (Tq * Tk), got {Tq} x {Tk}"
        )


def _check_lengths(q, k, key_lens, query_lens, padding) -> None:
    """Per-row lengths: (batch,) int32/int64 tensors on q's device. Their values are checked
    only for CPU tensors: reading GPU ones would synchronise (the kernels clamp to [0, T])."""
    op = "attention"
    if padding not in ("right", "left"):
        raise ValueError(f"{op}: padding must be 'right' or 'left', got {padding!r}")
    for name, lens, T in (("key_lens", key_lens, k.shape[2]), ("query_lens", query_lens, q.shape[2])):
        if lens is None:
            continue
        if not isinstance(lens, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(lens).__name__}")
        if lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {lens.dtype}")
        if lens.shape != (q.shape[0],):
            raise ValueError(f"{op}: {name} must have shape (batch,) = ({q.shape[0]},), got {tuple(lens.shape)}")
        if lens.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {lens.device}")
        if host_readable(lens) and lens.numel() and not (0 <= lens.min() and lens.max() <= T):
            raise ValueError(f"{op}: {name} must be in [0, {T}], got values {lens.min().item()}..{lens.max().item()}")


def effective_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels apply for ``dropout_p``: the nearest multiple of 2^-16
    (the RNG compares 16-bit draws with a threshold), at most 1 - 2^-16; within 2^-17 of
    ``dropout_p`` for every p <= 1 - 2^-16. Kept weights are scaled by 1 / (1 - that)."""
    return min(round(float(dropout_p) * 65536), 65535) / 65536


def _random_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    source = device if generator is None else generator.device
    return torch.randint(0, 2**31 - 1, (1,), generator=generator, device=source)


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The kernels' (1,) int64 seed on ``device``, drawn from ``generator`` (default: the
    default generator of ``device``). A CUDA generator draws it on the GPU, with no host sync:
    captured in a CUDA graph, each replay draws anew (torch's graph-safe Philox state); a CPU
    generator's seed is copied over, which a graph cannot replay."""
    seed = _random_seed(generator, device)
    if seed.device != device:
        if seed.device.type == "cpu" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "attention: a CPU generator cannot drive dropout inside a CUDA graph: its seed "
                "would be copied once, when the graph is recorded, and every replay would drop "
                "the same weights; pass generator=None (the GPU's default generator) or a CUDA "
                "torch.Generator")
        seed = seed.to(device, non_blocking=True)
    return seed


def dropout_seed(generator: torch.Generator | None = None, device="cpu") -> int:
    """The kernel seed that ``attention`` draws from ``generator`` for inputs on ``device``
    (default: that device's default generator, as ``attention`` draws it), as an int."""
    return int(_random_seed(generator, torch.device(device)).item())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    key_lens: torch.Tensor | None = None,
    query_lens: torch.Tensor | None = None,
    padding: str = "right",
) -> torch.Tensor:
    """Flash attention: ``dropout(softmax(q @ k^T * scale + mask)) @ v``, differentiable.

    q: (batch, heads, Tq, head_dim); k, v: (batch, heads, Tk, head_dim); any strides; fp32,
    fp16 or bf16 (one dtype); 16 <= head_dim <= 128. Returns a (batch, heads, Tq, head_dim)
    tensor in q's memory layout (``torch.empty_like(q)``: a (B, T, H, D)-strided q gives a
    (B, T, H, D)-strided output, whose ``transpose(1, 2)`` is contiguous); the gradients come
    in the layouts of q, k and v. ``scale`` defaults to 1/sqrt(head_dim).

    ``causal``: query i attends keys j <= i + (Tk - Tq), the mask aligned to the bottom-right
    corner as for queries that continue a KV cache (Tq == Tk: the usual lower triangle; unlike
    SDPA's top-left ``is_causal`` when Tq < Tk). Causal needs Tq <= Tk.

    ``dropout_p``: probability of dropping each attention weight (kept ones scaled by
    1/(1-p)); the kernel seed is drawn from ``generator`` (default: the default generator of
    q's device, so ``torch.manual_seed`` repeats a run), into device memory where the kernels
    read it: no host sync, and a CUDA graph that captured the call draws a fresh mask per
    replay. No RNG state is consumed when dropout_p == 0.

    ``key_lens`` / ``query_lens``: optional (batch,) int32/int64 tensors on q's device, the
    number of valid keys / queries of each batch row (None: all). ``padding="right"``: the
    valid ones are the first n positions (fine-tuning batches); ``"left"``: the last n (HF's
    left-padded prompts and their cached decode steps). The causal mask is aligned bottom-right
    on each row's valid windows (its last valid query sees every valid key). Padded query rows
    return zeros, as does a valid query with no visible key; padded positions are never read
    and get zero gradients. GPU lengths are read by the kernels (no host synchronisation);
    CPU ones are checked to lie in [0, T].
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    _check_inputs(q, k, v, causal, scale, dropout_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        what = type(generator).__name__
        raise TypeError(f"attention: generator must be a torch.Generator or None, got {what}")
    if key_lens is not None or query_lens is not None or padding != "right":
        _check_lengths(q, k, key_lens, query_lens, padding)
        key_lens = None if key_lens is None else key_lens.to(torch.int32)
        query_lens = None if query_lens is None else query_lens.to(torch.int32)
    seed = None
    if dropout_p:
        dropout_p = effective_dropout_p(dropout_p)
        seed = _draw_seed(generator, q.device)
    return _attention(q, k, v, bool(causal), float(scale), float(dropout_p), seed, query_lens,
                      key_lens, padding == "left")[0]


def attention_dropout_mask(
    seed: int, batch: int, heads: int, q_len: int, k_len: int, dropout_p: float, device="cpu"
) -> torch.Tensor:
    """The keep mask (bool, (batch, heads, q_len, k_len)) that the kernels use for ``seed``.

    For tests and debugging: with ``seed = dropout_seed(g, q.device)`` drawn from a generator in
    the state that ``attention(..., generator=g)`` sees (g None: the device's default generator),
    this is the mask that call applies.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention_dropout_mask: dropout_p must be in [0, 1), got {dropout_p!r}")
    if q_len * k_len > MAX_DROPOUT_SCORES:
        raise ValueError("attention_dropout_mask: at most 2**31 weights per head")
    mask = torch.empty((batch, heads, q_len, k_len), device=device, dtype=torch.int8)
    check_device("attention_dropout_mask", mask=mask)
    if mask.numel() == 0:
        return mask.bool()
    block = 32
    grid = (cdiv(q_len, block), cdiv(k_len, block), batch * heads)
    seed = torch.tensor([seed], dtype=torch.int64, device=mask.device)
    with on_device(mask.device):
        _DROPOUT_MASK(_DROPOUT_MASK.config(BLOCK_M=block, BLOCK_N=block, num_warps=4), grid,
                      (mask, seed), (q_len, k_len, effective_dropout_p(dropout_p)))
    return mask.bool()


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation check (gptfast/kernels/testing.py)
# --------------------------------------------------------------------------------------------

_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p", "delta_scale"}
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = "*" + _TRITON_DTYPE[dtype]
        elif name in ("LSE2", "Delta"):
            sig[name] = "*fp32"
        elif name == "Mask":
            sig[name] = "*i8"
        elif name in ("QL", "KL"):
            sig[name] = "*i32"
        elif name == "Seed":
            sig[name] = "*i64"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisibility(fn, signature: dict) -> dict:
    """The divisibility hints the JIT gives a typical launch (16-byte aligned tensors, strides
    and head dim multiples of 16; sequence lengths not), as ``ASTSource`` attrs. Without them
    the compiler cannot prove alignment and skips the pipelined (cp.async / TMA) loads, and
    the shared memory it reports understates real launches."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (signature[name] == "i32" and (name.startswith("stride") or name == "D"))
    }


def aot_configs():
    """Every tile/warp/stage config the GPU heuristics can pick, for a compile check.

    The heuristics pick one tile config per (kernel, dtype, BLOCK_D); every one of them is
    listed, for BLOCK_D 16, 32, 64 and 128 and fp16, bf16, fp32, compiled as launches with a
    contiguous head dim are (Triton specializes strides equal to 1). The flags (CAUSAL,
    DROPOUT, EVEN_D, and the length flags HAS_QL, HAS_KL, LEFT) only add register-level
    masking, window and RNG code and do not change shared
    memory (checked on D=64: equal with all flags on and off), so they are rotated over the
    head-dim buckets instead of multiplied in: CAUSAL and EVEN_D take both values for every
    (kernel, dtype). Dropout (Philox, most of the compile time) is compiled once per kernel,
    on the GPT-2 training path (fp16, causal, D=64), where both the masked and the unmasked
    loops carry it: its integer/fp32 code depends on neither the dtype nor BLOCK_D. One more
    variant per kernel has Tq = Tk = H = 1, which Triton also specializes (T=1 decoding).
    (The full product would take ~10 minutes to compile.)
    """
    if INTERPRETING:
        raise RuntimeError("aot_configs() describes GPU launches; call it with TRITON_INTERPRET unset")
    # BLOCK_D -> (CAUSAL, DROPOUT, EVEN_D, (HAS_QL, HAS_KL, LEFT)); BLOCK_D=16 is always even
    # (head_dim >= 16). The lengths only add scalar window code and masks.
    no_lens, right_both, left_keys = (False, False, False), (True, True, False), (False, True, True)
    rotation = {16: (False, False, True, no_lens), 32: (True, False, False, right_both),
                64: (True, True, True, no_lens), 128: (False, False, False, left_keys)}
    configs = []

    def add(name, fn, dtype, launch, constexprs, ccs=None):
        unit_strides = {a: 1 for a in fn.arg_names if a.startswith("stride") and a.endswith("d")}
        constexprs = {**unit_strides, **constexprs}
        signature = _signature(fn, dtype, constexprs)
        configs.append({
            "name": name, "fn": fn, "signature": signature, "attrs": _divisibility(fn, signature),
            "constexprs": constexprs, "num_warps": launch.num_warps, "num_stages": launch.num_stages,
            **({"ccs": ccs} if ccs else {}),
        })

    def attention_kernels(dtype, block_d, dropout=False):
        """(name, kernel, launch, its own constexprs, the ccs it is picked on or None for all,
        their name suffix)."""
        kernels = [("fwd", _fwd_kernel, _fwd_launch(block_d, dtype, dropout), {}, None),
                   ("dq", _bwd_dq_kernel, _dq_launch(block_d, dtype, dropout),
                    {"DELTA": _dq_writes_delta(dtype)}, None)]
        dkdv = {cc: _dkdv_launch(block_d, dtype, dropout, cc) for cc in (80, 90)}
        shared = dkdv[80] == dkdv[90]
        for cc in (90,) if shared else (80, 90):
            kernels.append(("dkdv", _bwd_dkdv_kernel, dkdv[cc], {}, None if shared else (cc,)))
        return [(*kernel, "".join(f"-sm{cc}" for cc in kernel[-1] or ())) for kernel in kernels]

    def flags(launch, block_d, causal, dropout, even_d, lens=no_lens):
        has_ql, has_kl, left = lens
        return dict(CAUSAL=causal, DROPOUT=dropout, EVEN_D=even_d, HAS_QL=has_ql, HAS_KL=has_kl,
                    LEFT=left, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d)

    for dtype, tname in _TRITON_DTYPE.items():
        for block_d, (causal, dropout, even_d, lens) in rotation.items():
            dropout = dropout and dtype == torch.float16
            for kname, fn, launch, own, ccs, on in attention_kernels(dtype, block_d, dropout):
                add(f"{kname}-{tname}-d{block_d}-{launch.block_m}x{launch.block_n}"
                    f"-w{launch.num_warps}s{launch.num_stages}"
                    f"-causal{int(causal)}-dropout{int(dropout)}-even{int(even_d)}"
                    f"-lens{''.join(str(int(f)) for f in lens)}{on}",
                    fn, dtype, launch, flags(launch, block_d, causal, dropout, even_d, lens) | own,
                    ccs)
            pre = _preprocess_launch()
            add(f"preprocess-{tname}-d{block_d}-even{int(even_d)}", _bwd_preprocess_kernel, dtype, pre,
                dict(EVEN_D=even_d, BLOCK_M=pre.block_m, BLOCK_D=block_d))
    # dropout's tiles at the head dims the rotation lacks, and fp32's at D=128
    for dtype, block_d in ((torch.float16, 16), (torch.float16, 32), (torch.float16, 128),
                           (torch.float32, 128)):
        for kname, fn, launch, own, ccs, on in attention_kernels(dtype, block_d, dropout=True):
            add(f"{kname}-{_TRITON_DTYPE[dtype]}-d{block_d}-{launch.block_m}x{launch.block_n}"
                f"-w{launch.num_warps}s{launch.num_stages}-causal1-dropout1-even1-lens000{on}",
                fn, dtype, launch, flags(launch, block_d, True, True, True) | own, ccs)
    for kname, fn, launch, own, ccs, on in attention_kernels(torch.float16, 64):
        add(f"{kname}-fp16-d64-length1-head1{on}", fn, torch.float16, launch,
            flags(launch, 64, True, False, True) | own | dict(Tq=1, Tk=1, H=1), ccs)
    kernel_fns = {FWD_KERNEL: _fwd_kernel, DKDV_KERNEL: _bwd_dkdv_kernel, DQ_KERNEL: _bwd_dq_kernel}
    for kernel, classes in TUNING_SPACE.items():  # what a tuning table may pick
        for cls, space in classes.items():
            tname, d, *dropout = cls.split("-")
            dtype, block_d = {v: k for k, v in _TRITON_DTYPE.items()}[tname], int(d[1:])
            for config in space:
                launch = Launch(**config)
                own = {"DELTA": _dq_writes_delta(dtype)} if kernel == DQ_KERNEL else {}
                add(f"tuning-{kernel}-{cls}-{launch.block_m}x{launch.block_n}-w{launch.num_warps}"
                    f"s{launch.num_stages}", kernel_fns[kernel], dtype, launch,
                    flags(launch, block_d, True, bool(dropout), True) | own)
    add("dropout_mask", _dropout_mask_kernel, torch.float16, Launch(32, 32, 4, 1),
        dict(BLOCK_M=32, BLOCK_N=32))
    from gptfast.kernels.testing import config_key

    unique = {}  # each compiled code once, under its first name
    for cfg in configs:
        unique.setdefault(config_key(cfg), cfg)
    return list(unique.values())


def report_cases(cc: int = 90):
    """GPT-2's attention launches at 8 x 1024 tokens (head dim 64, causal), for the static report
    (gptfast/kernels/report.py): 124M (12 heads) and 1558M (25 heads), fp32 and bf16, without and with
    dropout 0.1. Per launch a label, its aot config (specialised as the JIT specialises the
    model's call: q/k/v are (B, T, H, D) memory seen as (B, H, T, D)) and its grid size in
    programs, from the launch plans the op uses on a GPU of compute capability ``cc``."""
    from gptfast.kernels.testing import launch_config

    if INTERPRETING:
        raise RuntimeError("report_cases() describes GPU launches; call it with TRITON_INTERPRET unset")
    B, T, D = 8, 1024, 64
    block_d = _block_d(D)
    cases = []
    for model, H in (("124M", 12), ("1558M", 25)):
        for dtype in (torch.float32, torch.bfloat16):
            t = "*" + _TRITON_DTYPE[dtype]
            qkv = (T * H * D, D, H * D, 1)  # every tensor: (B, T, H, D) memory seen as (B, H, T, D)
            lens = ("*i32", "*i32")  # the absent lengths' stand-ins
            for p in (0.0, 0.1):
                label = f"{model} B{B} T{T} {_TRITON_DTYPE[dtype]}" + (f" p={p}" if p else "")
                flags = dict(CAUSAL=True, DROPOUT=p > 0, EVEN_D=D == block_d, HAS_QL=False,
                             HAS_KL=False, LEFT=False, BLOCK_D=block_d)
                scale = (D ** -0.5) * LOG2E
                launches = [
                    (_fwd_kernel, _fwd_launch(block_d, dtype, p > 0), "block_m",
                     (t, t, t, t, "*fp32", *lens, "*i64", *qkv * 4, H, T, T, D, scale, p)),
                    (_bwd_dkdv_kernel, _dkdv_launch(block_d, dtype, p > 0, cc), "block_n",
                     (t, t, t, t, "*fp32", "*fp32", t, t, *lens, "*i64", *qkv * 6,
                      H, T, T, D, D ** -0.5, scale, p)),
                    (_bwd_dq_kernel, _dq_launch(block_d, dtype, p > 0), "block_m",
                     (t, t, t, t, t, "*fp32", "*fp32", t, *lens, "*i64", *qkv * 6,
                      H, T, T, D, D ** -0.5, scale, p)),
                ]
                for fn, launch, rows, values in launches:
                    own = dict(BLOCK_M=launch.block_m, BLOCK_N=launch.block_n)
                    if fn is _bwd_dq_kernel:
                        own["DELTA"] = _dq_writes_delta(dtype)
                    cfg = launch_config(f"{fn.__name__} {label}", fn, dict(zip(fn.arg_names, values)),
                                        flags | own, launch.num_warps, launch.num_stages)
                    cases.append({"label": label, "config": cfg,
                                  "grid": triton.cdiv(T, getattr(launch, rows)) * B * H})
            pre = _preprocess_launch()
            values = (t, t, "*fp32", *qkv * 2, H, T, D, 1.0)
            fn = _bwd_preprocess_kernel
            cfg = launch_config(f"{fn.__name__} {model} {_TRITON_DTYPE[dtype]}", fn,
                                dict(zip(fn.arg_names, values)),
                                dict(EVEN_D=D == block_d, BLOCK_M=pre.block_m, BLOCK_D=block_d),
                                pre.num_warps)
            cases.append({"label": f"{model} B{B} T{T} {_TRITON_DTYPE[dtype]}", "config": cfg,
                          "grid": triton.cdiv(T, pre.block_m) * B * H})
    return cases


from gptfast.kernels import attention_sm90  # noqa: E402  (its kernels use the helpers above)
