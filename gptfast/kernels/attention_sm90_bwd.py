"""Hopper (sm_90) backward of flash attention: two launches instead of three, TMA tiles and a
heavy-first or persistent grid. Selected by plan (``attention_sm90``); off by default.

The gradients are those of ``attention``'s backward for inputs without per-row lengths, with
the same exactness rules (a query that sees one key gets dq = 0 and gives that key dk = 0),
deterministic (no atomics). The split is FlashAttention-2's: dK/dV by key tiles, dQ by query
tiles, each recomputing the weights from the log-sum-exp. What differs from the generic path:

- The preprocess is fused away: the dQ kernel runs first and computes delta = rowsum(dO * O)
  (times 1 - p) of its own query tile from the O and dO tiles it loads anyway, and writes it for
  the dK/dV kernel that follows. One launch and one pass over O and dO fewer.
- ``TMA`` tiles (see ``attention_sm90_fwd``), and the same heavy-first tile order: dQ's causal
  query tiles with the most keys first, dK/dV's key tiles with the most queries (the first
  ones) first; or a persistent grid taking them round-robin.
- dK/dV streams 64-query tiles where the generic kernel streams 32 (its registers under
  cp.async did not fit 64); like it, keys-major scores (a query-major form raced on sm_90).
"""

import triton
import triton.language as tl

from gptfast.kernels.attention_tiles import (
    _dropout_keep, _dropout_key, _dropout_threshold, _key_range, _mma, _single_key,
)
from gptfast.kernels.attention_sm90_fwd import _head, _load_rows, _store_rows


@triton.jit
def _dq_steps(dq, q, do, lse2, delta, Kd, Vd, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
              off_b, off_h, start_m, lo, hi, Tk, D, shift, qk_scale, key, dropout_p,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              EVEN_D: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ += dS K over the key tiles [lo, hi), with dS = P * (Z * (dO V^T) - delta)."""
    BLOCK_M: tl.constexpr = q.shape[0]
    BLOCK_D: tl.constexpr = q.shape[1]
    rows = start_m + tl.arange(0, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_rows(Kd, K, stride_kn, stride_kd, off_b, off_h, start_n, Tk, D, BLOCK_N,
                       BLOCK_D, TMA, MASKED, EVEN_D)
        v = _load_rows(Vd, V, stride_vn, stride_vd, off_b, off_h, start_n, Tk, D, BLOCK_N,
                       BLOCK_D, TMA, MASKED, EVEN_D)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            visible = cols[None, :] < Tk
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        dp = _mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if DROPOUT:
            keep = _dropout_keep(key, start_m, start_n, Tk, _dropout_threshold(dropout_p), BLOCK_M,
                                 BLOCK_N, False)
            dp = tl.where(keep, dp, 0.0)
        dq = _mma((p * (dp - delta[:, None])).to(k.dtype), k, dq)
    return dq


# Blocking: one (BLOCK_M queries, batch*head) tile per loop step of a program (one program per
# tile, or a persistent few per SM), heaviest causal tiles first. Q, dO, O of the tile are read
# once; O only for delta = rowsum(dO * O), which is written (one fp32 per row) for the dK/dV
# kernel. K/V stream through in BLOCK_N-key tiles (Tq/BLOCK_M reads in total, the forward's key
# ranges); the fp32 dQ accumulator stays in registers and is written once, without atomics.
@triton.jit
def _bwd_dq_sm90_kernel(
    Q, K, V, O, DO, DQ, LSE2, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    BH, H, Tq, Tk, D, sm_scale, qk_scale, Seed, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_m = tl.cdiv(Tq, BLOCK_M)
    shift = Tk - Tq
    for tile in range(tl.program_id(0), n_m * BH, tl.num_programs(0)):
        off_bh = tile % BH
        start_m = (n_m - 1 - tile // BH if CAUSAL else tile // BH) * BLOCK_M
        off_b = off_bh // H
        off_h = off_bh % H
        rows = start_m + tl.arange(0, BLOCK_M)
        in_t = rows < Tq
        q = _load_rows(Q, _head(Q, stride_qb, stride_qh, off_b, off_h, TMA), stride_qm, stride_qd,
                       off_b, off_h, start_m, Tq, D, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        do = _load_rows(DO, _head(DO, stride_dob, stride_doh, off_b, off_h, TMA), stride_dom,
                        stride_dod, off_b, off_h, start_m, Tq, D, BLOCK_M, BLOCK_D, TMA, True,
                        EVEN_D)
        o = _load_rows(O, _head(O, stride_ob, stride_oh, off_b, off_h, TMA), stride_om, stride_od,
                       off_b, off_h, start_m, Tq, D, BLOCK_M, BLOCK_D, TMA, True, EVEN_D)
        # the preprocess: delta times 1 - p, as the dS rule takes it
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * (1.0 - dropout_p)
        row_offs = off_bh.to(tl.int64) * Tq + rows
        tl.store(Delta + row_offs, delta, mask=in_t)
        lse2 = tl.load(LSE2 + row_offs, mask=in_t, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_head = _head(K, stride_kb, stride_kh, off_b, off_h, TMA)
        v_head = _head(V, stride_vb, stride_vh, off_b, off_h, TMA)
        key = _dropout_key(Seed, off_bh, DROPOUT)
        n_lo, n_full, n_end = _key_range(start_m, 0, Tq, 0, Tk, CAUSAL, False, BLOCK_M, BLOCK_N)
        dq = _dq_steps(dq, q, do, lse2, delta, K, V, k_head, v_head, stride_kn, stride_kd,
                       stride_vn, stride_vd, off_b, off_h, start_m, n_lo, n_full, Tk, D, shift,
                       qk_scale, key, dropout_p, False, CAUSAL, DROPOUT, EVEN_D, TMA, BLOCK_N)
        dq = _dq_steps(dq, q, do, lse2, delta, K, V, k_head, v_head, stride_kn, stride_kd,
                       stride_vn, stride_vd, off_b, off_h, start_m, n_full, n_end, Tk, D, shift,
                       qk_scale, key, dropout_p, True, CAUSAL, DROPOUT, EVEN_D, TMA, BLOCK_N)
        if DROPOUT:
            dq = dq * (1.0 / (1.0 - dropout_p))
        # times 0, not 0: a NaN stays NaN (see _single_key)
        dq = dq * tl.where(_single_key(rows, 0, Tk, shift, CAUSAL), 0.0, sm_scale)[:, None]
        _store_rows(DQ, _head(DQ, stride_dqb, stride_dqh, off_b, off_h, TMA), stride_dqm,
                    stride_dqd, off_b, off_h, start_m, Tq, D, dq.to(q.dtype), TMA, EVEN_D)


@triton.jit
def _dkdv_steps(dk, dv, k, v, Qd, DOd, Q, DO, stride_qm, stride_qd, stride_dom, stride_dod,
                lse2_ptrs, delta_ptrs, off_b, off_h, start_n, lo, hi, Tq, Tk, D, shift, qk_scale,
                key, dropout_p, DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr,
                EVEN_D: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr):
    """dV += (P * Z)^T dO and dK += dS^T Q over the query tiles [lo, hi). The scores are computed
    keys-major (S^T = K Q^T: its tiles feed the two products from registers; the query-major
    form raced on sm_90, see the generic kernel's _dkdv_tiles). Rows past Tq
    load q = dO = lse = delta = 0: their dS and dO are zero, they add nothing. DIAGONAL tiles
    mask the keys a query may not see and hold the query that sees only key 0 (its weight is
    exactly 1, its dS exactly 0)."""
    BLOCK_N: tl.constexpr = k.shape[0]
    BLOCK_D: tl.constexpr = k.shape[1]
    cols = start_n + tl.arange(0, BLOCK_N)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Qd, Q, stride_qm, stride_qd, off_b, off_h, start_m, Tq, D, BLOCK_M,
                       BLOCK_D, TMA, True, EVEN_D)
        do = _load_rows(DOd, DO, stride_dom, stride_dod, off_b, off_h, start_m, Tq, D, BLOCK_M,
                        BLOCK_D, TMA, True, EVEN_D)
        lse2 = tl.load(lse2_ptrs + rows, mask=rows < Tq, other=0.0)
        delta = tl.load(delta_ptrs + rows, mask=rows < Tq, other=0.0)
        qk = _mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))  # (keys, queries)
        p = tl.exp2(qk * qk_scale - lse2[None, :])
        seen = cols[:, None] <= rows[None, :] + shift
        dp = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        row_delta = delta[None, :]
        first_key_only = rows[None, :] + shift == 0
        if DIAGONAL:
            p = tl.where(seen, p, 0.0)
        p_kept = p
        if DROPOUT:
            keep = _dropout_keep(key, start_m, start_n, Tk, _dropout_threshold(dropout_p), BLOCK_M,
                                 BLOCK_N, True)
            p_kept, dp = tl.where(keep, p, 0.0), tl.where(keep, dp, 0.0)
        ds = p * (dp - row_delta)
        if DIAGONAL:
            ds = ds * tl.where(first_key_only, 0.0, 1.0)  # a NaN stays NaN
        dv = _mma(p_kept.to(do.dtype), do, dv)
        dk = _mma(ds.to(q.dtype), q, dk)
    return dk, dv


# Blocking: one (BLOCK_N keys, batch*head) tile per loop step of a program (one program per
# tile, or a persistent few per SM), the key tiles that the most queries see first. K and V of
# the tile and the fp32 dK/dV accumulators stay in registers while Q, dO (BLOCK_M rows), LSE and
# delta stream through (Tk/BLOCK_N reads of Q and dO in total); causal tiles start at the first
# query tile that sees a key of theirs and mask only the diagonal ones. dK/dV are written once,
# without atomics.
@triton.jit
def _bwd_dkdv_sm90_kernel(
    Q, K, V, DO, DK, DV, LSE2, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    BH, H, Tq, Tk, D, sm_scale, qk_scale, Seed, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_n = tl.cdiv(Tk, BLOCK_N)
    shift = Tk - Tq
    m_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    for tile in range(tl.program_id(0), n_n * BH, tl.num_programs(0)):
        off_bh = tile % BH
        start_n = tile // BH * BLOCK_N
        off_b = off_bh // H
        off_h = off_bh % H
        k = _load_rows(K, _head(K, stride_kb, stride_kh, off_b, off_h, TMA), stride_kn, stride_kd,
                       off_b, off_h, start_n, Tk, D, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        v = _load_rows(V, _head(V, stride_vb, stride_vh, off_b, off_h, TMA), stride_vn, stride_vd,
                       off_b, off_h, start_n, Tk, D, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
        q_head = _head(Q, stride_qb, stride_qh, off_b, off_h, TMA)
        do_head = _head(DO, stride_dob, stride_doh, off_b, off_h, TMA)
        lse2_ptrs = LSE2 + off_bh.to(tl.int64) * Tq
        delta_ptrs = Delta + off_bh.to(tl.int64) * Tq
        key = _dropout_key(Seed, off_bh, DROPOUT)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        m_full = 0
        if CAUSAL:
            # Row i sees keys j <= i + shift: the tile's first key from row start_n - shift on,
            # all of them past row c_hi - 1 - shift (that row stays diagonal: it may see key 0
            # only); in between, diagonal tiles.
            c_hi = tl.minimum(start_n + BLOCK_N, Tk)
            m_lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
            m_full = tl.maximum(tl.cdiv(tl.maximum(c_hi - shift, 0), BLOCK_M) * BLOCK_M, m_lo)
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, q_head, do_head, stride_qm, stride_qd,
                                 stride_dom, stride_dod, lse2_ptrs, delta_ptrs, off_b, off_h,
                                 start_n, m_lo, tl.minimum(m_full, m_end), Tq, Tk, D, shift,
                                 qk_scale, key, dropout_p, True, DROPOUT, EVEN_D, TMA, BLOCK_M)
        dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, q_head, do_head, stride_qm, stride_qd,
                             stride_dom, stride_dod, lse2_ptrs, delta_ptrs, off_b, off_h, start_n,
                             m_full, m_end, Tq, Tk, D, shift, qk_scale, key, dropout_p, False,
                             DROPOUT, EVEN_D, TMA, BLOCK_M)
        if DROPOUT:  # the kept weights' 1 / (1 - p), left out of the tiles
            dk = dk * (1.0 / (1.0 - dropout_p))
            dv = dv * (1.0 / (1.0 - dropout_p))
        dk = dk * tl.where(Tk != 1, sm_scale, 0.0)  # one key: every weight 1, dS exactly 0
        _store_rows(DK, _head(DK, stride_dkb, stride_dkh, off_b, off_h, TMA), stride_dkn,
                    stride_dkd, off_b, off_h, start_n, Tk, D, dk.to(k.dtype), TMA, EVEN_D)
        _store_rows(DV, _head(DV, stride_dvb, stride_dvh, off_b, off_h, TMA), stride_dvn,
                    stride_dvd, off_b, off_h, start_n, Tk, D, dv.to(k.dtype), TMA, EVEN_D)
