"""The flash-attention kernels, FlashAttention-2's way: the forward over key tiles with an online
softmax; the backward as dK/dV by key tiles and dQ by query tiles (the dQ kernel writing the
softmax correction delta itself with fp16/bf16), the preprocess kernel that writes delta alone
(fp32), and the dropout-mask kernel for tests. Each states its memory-traffic plan above it. The
host side, autograd and op are in attention.py, the launch plans in attention_plans.py.
"""

import triton
import triton.language as tl

from gptfast.kernels.attention_tiles import (
    _dropout_keep, _dropout_key, _dropout_threshold, _key_range, _load_key_tile, _mma,
    _single_key, _wide, _window,
)


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
