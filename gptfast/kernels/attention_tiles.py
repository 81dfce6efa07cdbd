"""The flash-attention kernels' shared device functions: the tensor-core product, the dropout RNG
(Philox4x32-7 keyed by seed and batch*head, and its mapping of weights to counters and bits), the
key-tile loads, the per-row windows of padded batches, the causal key ranges and the single-key
rows. Used by attention_kernels.py and the Hopper variants (attention_sm90_fwd.py, _bwd.py).
"""

import triton
import triton.language as tl

from gptfast.kernels._common import INTERPRETING

_INTERPRETED = tl.constexpr(INTERPRETING)
PHILOX_ROUNDS = tl.constexpr(7)  # of the dropout RNG (see attention.py's docstring)


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


@triton.jit
def _single_key(rows, k_lo, k_hi, shift, CAUSAL: tl.constexpr):
    """Whether each query row sees exactly one key. Its softmax weight is then exactly 1 and
    the gradient of its score exactly 0 (dS = P (dP - delta) with delta = P dP = dP); the
    kernels multiply the fp32 rounding residue of dP - rowsum(dO * O) by 0 instead: exactly 0,
    or NaN where a NaN or inf input made it NaN (as the exact math does)."""
    if CAUSAL:
        return tl.minimum(k_hi, rows + shift + 1) - k_lo == 1
    return (k_hi - k_lo == 1) | (rows < 0)
