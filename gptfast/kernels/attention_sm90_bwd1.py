"""Hopper (sm_90) backward of flash attention in one pass over the scores: dK, dV and dQ from
one recomputation of S and dP per (query tile, key tile), deterministic. Selected by plan
(``attention_sm90``, kernel ``attention_sm90.bwd1``); off by default.

The two-launch pair (``attention_sm90_bwd``) recomputes S = Q K^T and dP = dO V^T twice, once
in the dK/dV kernel and once in the dQ kernel: 7 tile products per (query tile, key tile) where
this kernel does 5 (S, dP, dV += P^T dO, dK += dS^T Q, dQ_part = dS K). Each program owns one
key tile, as the dK/dV kernel does (keys-major scores), and adds its part of each query tile's
dQ into an fp32 accumulator in a FIXED order, FlashAttention-3's deterministic mode:

- A per-(batch*head, query tile) int32 counter says how many warps of key tiles have added.
  Key tile n waits (every thread spins on its own acquire load of it) until it reads
  n * num_warps, loads the accumulator (fp32 loads past L1: it is the only writer now), adds its
  part, stores it, and each warp passes its turn: its lanes meet (bar.warp.sync), its lane 0
  adds 1 with release semantics. The additions thus happen in key-tile order, so the result is
  bitwise the same on every run. (A block barrier and a Triton spin loop would be simpler, but
  either in the loop stops Triton from software-pipelining it.)
- The key tiles that visit query tile m are 0 .. last(m), all of them, in both masks: key tile 0
  first (every row sees key 0: no per-row lengths here; it stores, the accumulator needs no
  zeroing), and last(m) = the final key tile (non-causal) or the one holding key
  min(start_m + BLOCK_M - 1 + Tk - Tq, Tk - 1) (causal, aligned bottom-right, Tq <= Tk), which
  writes the finished dQ rows in the output dtype instead (no conversion launch; it passes its
  turn too, unread). A query tile that only key tile 0 visits never touches the accumulator.
- Deadlock freedom: program id = key tile * BH + batch*head, so a program waits only on programs
  with lower ids (the same head's earlier key tiles). ASSUMPTION: the GPU dispatches blocks in
  program-id order (a block starts only once every lower one has started), as FlashAttention-3's
  deterministic mode also assumes; then every spinning block's predecessors are resident or done
  and the lowest unfinished one never waits. Hence one program per tile only (no persistent grid:
  it would also need every program resident at once). Every head's key tile 0 goes first, which
  are causal's heaviest tiles too.
- Each key tile walks its query tiles from the last one down, so that concurrent key tiles of one
  head form a staircase (key tile n reaches a query tile one step after key tile n - 1) instead
  of the later ones waiting on the first at every step.

Triton's interpreter runs the programs one at a time in id order: there a read of a counter that
is not yet n can never change, so instead of spinning the program marks the counter (negative)
and the launch raises (``attention_sm90.backward1``); a wrong order fails a CPU test instead of
hanging it. On the GPU the spin has no bound (a bounded one could silently give a wrong dQ).

Two launches: the preprocess (delta = rowsum(dO * O) * (1 - p) per row: reads O and dO once,
writes 4 bytes a row; and it zeroes the counters, 4 bytes a query tile: no memset), then this
kernel (reads K, V once, Q, dO, LSE, delta once per key tile that sees them, reads and writes the
fp32 dQ accumulator once per (query tile, key tile) but the first and last, writes dQ, dK, dV).
"""

import triton
import triton.language as tl

from gptfast.kernels.attention_sm90_fwd import _head, _load_rows, _store_rows
from gptfast.kernels.attention_tiles import (
    _INTERPRETED, _dropout_keep, _dropout_key, _dropout_threshold, _mma, _single_key, _wide,
)

# the counter of a query tile whose key tiles ran out of order (interpreter only; the launch
# raises on a negative counter)
OUT_OF_ORDER = tl.constexpr(-(1 << 30))


@triton.jit
def _bwd1_preprocess_kernel(
    O, DO, Delta, Count,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq, D, dropout_p,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) * (1 - p) of one (query tile, batch*head), and its counter = 0."""
    m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    start_m = m * BLOCK_M
    o = _load_rows(O, _head(O, stride_ob, stride_oh, off_b, off_h, False), stride_om, stride_od,
                   off_b, off_h, start_m, Tq, D, BLOCK_M, BLOCK_D, False, True, EVEN_D)
    do = _load_rows(DO, _head(DO, stride_dob, stride_doh, off_b, off_h, False), stride_dom,
                    stride_dod, off_b, off_h, start_m, Tq, D, BLOCK_M, BLOCK_D, False, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * (1.0 - dropout_p)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(Delta + off_bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)
    tl.store(Count + off_bh * tl.num_programs(0) + m, 0)


@triton.jit
def _wait_turn(counter, turn):
    """Wait until the counter reads ``turn``, then return 0. Every thread spins on its own
    acquire load (what the releasers wrote before their releases is visible to it after), in an
    assembly loop: a Triton loop (scf.while) or barrier in the per-tile loop stops triton from
    software-pipelining it. The interpreter reads once: a wrong turn would spin forever, it flags
    the counter instead."""
    if _INTERPRETED:
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.atomic_xchg(counter, OUT_OF_ORDER, mask=seen != turn)
        waited = seen - seen
    else:
        waited = tl.inline_asm_elementwise(
            """{
            .reg .pred %p<1>;
            .reg .b32 %r<1>;
            $$spin:
            ld.acquire.gpu.global.b32 %r0, [$1];
            setp.ne.s32 %p0, %r0, $2;
            @%p0 bra $$spin;
            sub.s32 $0, %r0, $2;
            }""", "=r,l,r", [counter, turn], dtype=tl.int32, is_pure=False, pack=1)
    return waited


@triton.jit
def _pass_turn(counter, after, NUM_WARPS: tl.constexpr):
    """Add 1 to the counter per warp, after this thread's stores (``after``: a value that the last
    of them produced, to keep the order): the warp's lanes meet (bar.warp.sync orders their
    stores), then its lane 0 adds with release semantics. Per warp, not per block: a block
    barrier would stop the loop's pipelining; a turn is thus num_warps counts."""
    if _INTERPRETED:  # the programs run one at a time: the whole turn at once
        tl.atomic_add(counter, NUM_WARPS, sem="release", scope="gpu")
    else:
        tl.inline_asm_elementwise(
            """{
            .reg .pred %p<1>;
            .reg .b32 %r<1>;
            bar.warp.sync 0xffffffff;
            mov.u32 %r0, %laneid;
            setp.eq.u32 %p0, %r0, 0;
            @%p0 red.release.gpu.global.add.u32 [$1], 1;
            mov.u32 $0, 0;
            }""", "=r,l,r", [counter, after], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _add_dq(dq, counter, acc_ptrs, dq_ptrs, n, last, rows, Tq, Tk, D, shift, out_scale,
            CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, NUM_WARPS: tl.constexpr):
    """Key tile n's part ``dq`` of one query tile into the accumulator, in key-tile order: the
    first (n = 0) stores it, the last writes dQ = out_scale * sum in bf16 (the variants' dtype;
    0 where a row sees one key). Branch-free (masked loads and stores: an scf.if of stores in
    the loop crashed triton 3.6's pipeliner). Key tile 0 waits too (for the preprocess's 0: at
    once); the accumulator's address depends on the wait's result (0), so no compiler may load
    it before the wait ends."""
    waited = _wait_turn(counter, n * NUM_WARPS)
    in_t = rows[:, None] < Tq
    none = tl.zeros_like(in_t)  # (a mask from a scalar: the interpreter needs it broadcast)
    dq += tl.load(acc_ptrs + waited * dq.shape[1], mask=in_t & (none | (n > 0)), other=0.0,
                  cache_modifier=".cg")  # (times the row length: the loads stay 16-byte wide)
    tl.store(acc_ptrs, dq, mask=in_t & (none | ~last), cache_modifier=".cg")
    dq = dq * tl.where(_single_key(rows, 0, Tk, shift, CAUSAL), 0.0, out_scale)[:, None]
    out = in_t & (none | last)
    if not EVEN_D:
        out = out & (tl.arange(0, dq.shape[1])[None, :] < D)
    tl.store(dq_ptrs, dq.to(tl.bfloat16), mask=out)
    _pass_turn(counter, waited, NUM_WARPS)


@triton.jit
def _bwd1_steps(dk, dv, k, v, Qd, DOd, Q, DO, dq_head, stride_qm, stride_qd, stride_dom,
                stride_dod, stride_dqm, stride_dqd, lse2_ptrs, delta_ptrs, acc_head, count_head,
                off_b, off_h, n, start_n, hi, m_full, steps, n_k, Tq, Tk, D, shift, qk_scale,
                out_scale, key, dropout_p, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                EVEN_D: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                NUM_WARPS: tl.constexpr):
    """The query tiles hi - BLOCK_M, hi - 2 BLOCK_M, ... (``steps`` of them, downward): dV += (P *
    Z)^T dO and dK += dS^T Q as the dK/dV kernel's keys-major steps (rows past Tq load zeros and
    add nothing), and each tile's dQ part dS K added in order (``_add_dq``). Causal tiles below
    m_full are diagonal: masked, by a branch in the one loop (two loops, as the dK/dV kernel
    has, took 255 registers and spilled at D=128 where one takes 184)."""
    BLOCK_N: tl.constexpr = k.shape[0]
    BLOCK_D: tl.constexpr = k.shape[1]
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for i in range(steps):
        start_m = hi - BLOCK_M - i * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Qd, Q, stride_qm, stride_qd, off_b, off_h, start_m, Tq, D, BLOCK_M,
                       BLOCK_D, TMA, True, EVEN_D)
        do = _load_rows(DOd, DO, stride_dom, stride_dod, off_b, off_h, start_m, Tq, D, BLOCK_M,
                        BLOCK_D, TMA, True, EVEN_D)
        lse2 = tl.load(lse2_ptrs + rows, mask=rows < Tq, other=0.0)
        delta = tl.load(delta_ptrs + rows, mask=rows < Tq, other=0.0)
        qk = _mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))  # (keys, queries)
        p = tl.exp2(qk * qk_scale - lse2[None, :])
        dp = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        diagonal = False
        if CAUSAL:
            diagonal = start_m < m_full
        if diagonal:
            p = tl.where(cols[:, None] <= rows[None, :] + shift, p, 0.0)
        p_kept = p
        if DROPOUT:
            keep = _dropout_keep(key, start_m, start_n, Tk, _dropout_threshold(dropout_p), BLOCK_M,
                                 BLOCK_N, True)
            p_kept, dp = tl.where(keep, p, 0.0), tl.where(keep, dp, 0.0)
        ds = p * (dp - delta[None, :])
        if diagonal:  # the row that sees key 0 only: its weight is exactly 1, dS exactly 0
            ds = ds * tl.where(rows[None, :] + shift == 0, 0.0, 1.0)  # a NaN stays NaN
        ds = ds.to(q.dtype)
        dv = _mma(p_kept.to(do.dtype), do, dv)
        dk = _mma(ds, q, dk)
        dq = _mma(tl.trans(ds), k, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32))
        last = n == n_k - 1
        if CAUSAL:
            last = n == tl.minimum(n_k - 1, (start_m + BLOCK_M - 1 + shift) // BLOCK_N)
        acc_ptrs = acc_head + _wide(rows)[:, None] * BLOCK_D + offs_d[None, :]
        dq_ptrs = dq_head + _wide(rows)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
        _add_dq(dq, count_head + start_m // BLOCK_M, acc_ptrs, dq_ptrs, n, last, rows, Tq, Tk, D,
                shift, out_scale, CAUSAL, EVEN_D, NUM_WARPS)
    return dk, dv


# Blocking: one (BLOCK_N keys, batch*head) tile per program, program id = key tile * BH + bh (the
# order the dQ additions rely on, see the docstring). K and V of the tile and the fp32 dK/dV
# accumulators stay in registers while Q, dO (BLOCK_M rows), LSE and delta stream through, last
# query tile first; causal tiles start at the first query tile that sees a key of theirs and
# mask only the diagonal ones. dK/dV are written once; dQ once per (query tile, key tile) into
# the fp32 accumulator DQacc ((BH, n_m * BLOCK_M, BLOCK_D), contiguous) and by the last key tile
# (pointer stores: the one masked store of the loop).
@triton.jit
def _bwd1_sm90_kernel(
    Q, K, V, DO, DK, DV, LSE2, Delta, DQacc, Count, DQ,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
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
    NUM_WARPS: tl.constexpr = 4 if _INTERPRETED else tl.extra.cuda.num_warps()
    n_k = tl.cdiv(Tk, BLOCK_N)
    n_m = tl.cdiv(Tq, BLOCK_M)
    shift = Tk - Tq
    m_end = n_m * BLOCK_M
    off_bh = tl.program_id(0) % BH
    n = tl.program_id(0) // BH
    start_n = n * BLOCK_N
    off_b = off_bh // H
    off_h = off_bh % H
    k = _load_rows(K, _head(K, stride_kb, stride_kh, off_b, off_h, TMA), stride_kn, stride_kd,
                   off_b, off_h, start_n, Tk, D, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
    v = _load_rows(V, _head(V, stride_vb, stride_vh, off_b, off_h, TMA), stride_vn, stride_vd,
                   off_b, off_h, start_n, Tk, D, BLOCK_N, BLOCK_D, TMA, True, EVEN_D)
    q_head = _head(Q, stride_qb, stride_qh, off_b, off_h, TMA)
    do_head = _head(DO, stride_dob, stride_doh, off_b, off_h, TMA)
    dq_head = _head(DQ, stride_dqb, stride_dqh, off_b, off_h, False)
    lse2_ptrs = LSE2 + off_bh.to(tl.int64) * Tq
    delta_ptrs = Delta + off_bh.to(tl.int64) * Tq
    acc_head = DQacc + off_bh.to(tl.int64) * m_end * BLOCK_D
    count_head = Count + off_bh * n_m
    key = _dropout_key(Seed, off_bh, DROPOUT)
    out_scale = sm_scale
    if DROPOUT:  # the kept weights' 1 / (1 - p), left out of the tiles
        out_scale = sm_scale / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_lo = 0
    m_full = 0
    if CAUSAL:  # as the dK/dV kernel: diagonal tiles [m_lo, m_full), full ones [m_full, m_end)
        c_hi = tl.minimum(start_n + BLOCK_N, Tk)
        m_lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        m_full = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(c_hi - shift, 0), BLOCK_M) * BLOCK_M,
                                       m_lo), m_end)
    dk, dv = _bwd1_steps(dk, dv, k, v, Q, DO, q_head, do_head, dq_head, stride_qm, stride_qd,
                         stride_dom, stride_dod, stride_dqm, stride_dqd, lse2_ptrs, delta_ptrs,
                         acc_head, count_head, off_b, off_h, n, start_n, m_end, m_full,
                         (m_end - m_lo) // BLOCK_M, n_k, Tq, Tk, D, shift, qk_scale, out_scale,
                         key, dropout_p, CAUSAL, DROPOUT, EVEN_D, TMA, BLOCK_M, NUM_WARPS)
    if DROPOUT:
        dk = dk * (1.0 / (1.0 - dropout_p))
        dv = dv * (1.0 / (1.0 - dropout_p))
    dk = dk * tl.where(Tk != 1, sm_scale, 0.0)  # one key: every weight 1, dS exactly 0
    _store_rows(DK, _head(DK, stride_dkb, stride_dkh, off_b, off_h, TMA), stride_dkn,
                stride_dkd, off_b, off_h, start_n, Tk, D, dk.to(k.dtype), TMA, EVEN_D)
    _store_rows(DV, _head(DV, stride_dvb, stride_dvh, off_b, off_h, TMA), stride_dvn,
                stride_dvd, off_b, off_h, start_n, Tk, D, dv.to(k.dtype), TMA, EVEN_D)
