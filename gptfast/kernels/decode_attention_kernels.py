"""The decode-attention kernels: the split kernel (a block of queries over one chunk of the KV
cache, with an online softmax; optionally appending the new keys and values first) and the merge
kernel (the chunks' partial results combined by their log-sum-exps). Each states its
memory-traffic plan above it; the op, its launch plans and checks are in decode_attention.py.
"""

import triton
import triton.language as tl

from gptfast.kernels.attention_tiles import _mma


@triton.jit
def _attend_one(
    q, k_ptrs, v_ptrs, stride_kn, stride_vn, d_ok, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Online softmax of one query (q: [BLOCK_D]) over the keys [lo, hi), all of them visible.

    Each of the BLOCK_N key slots keeps its own running max, sum and [BLOCK_D] output over the
    keys lo + slot, lo + slot + BLOCK_N, ...: the loop body is elementwise plus the q.k sum
    over D (within a warp), with no cross-warp reduction per tile; the slots are merged once
    at the end. Slots that saw no key keep max -inf, sum 0, output 0.
    """
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, q.shape[0]], dtype=tl.float32)
    q = q.to(tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        key_ok = start_n + offs_n < hi
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        # Scores in log2 units: exp2(s * scale * log2(e)) == exp(s * scale).
        s = tl.where(key_ok, tl.sum(q[None, :] * k.to(tl.float32), 1) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slot without keys yet
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new
    m_all = tl.max(m_i, 0)
    w = tl.exp2(m_i - tl.where(m_all == float("-inf"), 0.0, m_all))
    return tl.sum(acc * w[:, None], 0), tl.sum(l_i * w, 0), m_all


@triton.jit
def _append_key(acc, l_i, m_i, q, KN, VN, K, V, kn_off, vn_off, k_off, v_off, offs_d, d_ok,
                stride_knd, stride_vnd, stride_kd, stride_vd, own, qk_scale):
    """The step's new key and value (read from KN, VN) into one query's online softmax (q, acc:
    [BLOCK_D] fp32; l_i, m_i: scalars) and into the cache at its position, if this program
    ``own``s that position (otherwise a no-op: its weight is exp2(-inf) = 0)."""
    mask = tl.where(own, d_ok, False)  # (not d_ok & own: the interpreter makes that int32)
    kn = tl.load(KN + kn_off + offs_d * stride_knd, mask=mask, other=0.0)
    vn = tl.load(VN + vn_off + offs_d * stride_vnd, mask=mask, other=0.0)
    tl.store(K + k_off + offs_d * stride_kd, kn, mask=mask)
    tl.store(V + v_off + offs_d * stride_vd, vn, mask=mask)
    s = tl.where(own, tl.sum(q * kn.to(tl.float32), 0) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, s)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref)
    return acc * alpha + p * vn.to(tl.float32), l_i * alpha + p, m_new


@triton.jit
def _attend_block(
    q, k_ptrs, v_ptrs, stride_kn, stride_vn, d_ok, offs_m, shift, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Online softmax of a query block (q: [BLOCK_M, BLOCK_D]) over the keys [lo, hi), with
    the causal mask: row i sees keys j <= i + shift. Scores and P @ V use tl.dot."""
    BLOCK_M: tl.constexpr = q.shape[0]
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, q.shape[1]], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < hi) & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * qk_scale
        visible = (cols[None, :] < hi) & (cols[None, :] <= offs_m[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps max -inf; shift by 0 instead (its p are all 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


# Blocking: one program per (batch*head, key chunk, block of BLOCK_M queries). The query block
# stays in registers while the chunk's keys and values stream through in BLOCK_N-row tiles: each
# cached K/V row of [0, cache_len) is read from HBM exactly once per query block (once in all for
# Tq <= BLOCK_M), rows at or past cache_len never (masked loads, so the tail may hold NaN). Per
# query row the program writes BLOCK_D fp32 partial outputs plus a running max and sum (two
# fp32), i.e. num_splits * (D + 2) * 4 bytes per row in total, far below the K/V traffic of
# cache_len * D * 2 * itemsize bytes per head; with one chunk (DIRECT) it writes the normalised
# output instead. BLOCK_M == 1 (one query) uses elementwise products and sums; BLOCK_M >= 16
# uses tl.dot. Both key loops are software-pipelined (NUM_STAGES tiles in flight: cp.async into
# shared memory on sm_80/sm_90 when the head dim is 16-byte aligned). The merge reads the
# partials in a fixed order: bitwise deterministic. The lengths are not specialised on (they
# change every decode step). APPEND (one query): the step's new key and value come from KN, VN
# (D elements each, read once) instead of the cache, and the program whose chunk holds their
# position writes them there (2 D more elements); no other program reads that position.
@triton.jit(do_not_specialize=["seq_len", "chunk", "num_splits"])
def _split_kernel(
    Q, K, V, O, Acc, Max, Sum, Lens, KN, VN,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd,
    H, Tq, D, seq_len, chunk, num_splits, qk_scale,
    PER_ROW: tl.constexpr, DIRECT: tl.constexpr, APPEND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    tl.static_assert(BLOCK_M == 1 or not APPEND, "APPEND takes one query")
    off_bh = tl.program_id(0)
    split = tl.program_id(1)
    start_m = tl.program_id(2) * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    if PER_ROW:
        n_keys = tl.load(Lens + off_b)
    else:
        n_keys = seq_len
    shift = n_keys - Tq  # query i sees keys j <= i + shift
    # Keys of this program: its chunk, cut where the last query of the block stops seeing keys.
    lo = split * chunk
    hi = tl.minimum(lo + chunk, shift + tl.minimum(start_m + BLOCK_M, Tq))
    last = n_keys - 1  # APPEND: the new key's position, which the owner takes from KN, VN
    own = (lo <= last) & (last < hi)
    if APPEND:
        hi = tl.where(own, last, hi)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < Tq
    q_ptrs = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    k_ptrs += lo.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    v_ptrs += lo.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    if BLOCK_M == 1:  # Tq == 1: the query sees every key below n_keys, hi <= n_keys
        q = tl.sum(q, 0)
        acc, l_i, m_i = _attend_one(
            q, k_ptrs, v_ptrs, stride_kn, stride_vn, d_ok, lo, hi, qk_scale, BLOCK_N, NUM_STAGES,
        )
        if APPEND:
            b, h, n = off_b.to(tl.int64), off_h.to(tl.int64), last.to(tl.int64)
            acc, l_i, m_i = _append_key(
                acc, l_i, m_i, q.to(tl.float32), KN, VN, K, V, b * stride_knb + h * stride_knh,
                b * stride_vnb + h * stride_vnh, b * stride_kb + h * stride_kh + n * stride_kn,
                b * stride_vb + h * stride_vh + n * stride_vn, offs_d, d_ok, stride_knd,
                stride_vnd, stride_kd, stride_vd, own, qk_scale,
            )
        acc = acc[None, :]
        l_i = l_i + tl.zeros([1], dtype=tl.float32)
        m_i = m_i + tl.zeros([1], dtype=tl.float32)
    else:
        acc, l_i, m_i = _attend_block(
            q, k_ptrs, v_ptrs, stride_kn, stride_vn, d_ok, offs_m, shift, lo, hi, qk_scale, BLOCK_N,
            NUM_STAGES,
        )

    rows = off_bh.to(tl.int64) * Tq + offs_m  # row of (batch*head, query) in the outputs
    if DIRECT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + rows[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = rows * num_splits + split
        tl.store(Acc + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Max + part, m_i, mask=row_ok)
        tl.store(Sum + part, l_i, mask=row_ok)


# Blocking: one program per (batch*head, query) row. Pass 1 reads the row's num_splits running
# maxima (fp32) to find the global max M; pass 2 reads, BLOCK_S chunks at a time, the maxima m_s,
# sums l_s and partial outputs acc_s and forms O = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
# Traffic: num_splits * (D + 3) * 4 bytes read and D * itemsize written per row. Chunks that saw
# no key of the row (m_s = -inf, l_s = 0, acc_s = 0) get weight 0; the first chunk always holds
# key 0, which every query sees, so M is finite.
@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    Acc, Max, Sum, O, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    first = row * num_splits

    m_max = tl.full([], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.load(Max + first + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"))
        m_max = tl.maximum(m_max, tl.max(m, 0))

    l_total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        m = tl.load(Max + first + s0 + offs_s, mask=s_ok, other=float("-inf"))
        l = tl.load(Sum + first + s0 + offs_s, mask=s_ok, other=0.0)
        w = tl.exp2(m - m_max)
        l_total += tl.sum(w * l, 0)
        part = tl.load(Acc + (first + s0 + offs_s)[:, None] * D + offs_d[None, :],
                       mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
    tl.store(O + row * D + offs_d, (acc / l_total).to(O.dtype.element_ty), mask=d_ok)
