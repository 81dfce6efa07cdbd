"""The Triton kernel of ``gptfast.kernels.linear`` (see gptfast/kernels/linear.py for the op and
its launch plans)."""

import triton
import triton.language as tl

from gptfast.kernels.attention_tiles import _mma

TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi)


# One program per BLOCK_N output features of every row (M <= BLOCK_M = 16 rows: a decode step's
# tokens), looping over K in BLOCK_K steps. The weight's BLOCK_N rows are read once, K
# contiguous elements each (16-byte loads), and so is x: N x K + M x K elements in, M x N out, the
# traffic of the product itself; at M <= 16 the weight is all of it (memory-bound: the rows are
# padded to 16 in registers for the tensor cores, masked loads leave the padding 0). fp32
# accumulation; the bias and the tanh GELU (``GELU``: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715
# z^3))) = z sigmoid(2 sqrt(2/pi) (z + 0.044715 z^3))) are applied to the fp32 sums, rounded once
# into Y. No atomics: each output belongs to one program.
@triton.jit
def _linear_kernel(
    X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    row_ok = rows[:, None] < M
    col_ok = cols[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            w = tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=col_ok, other=0.0)
        else:
            k_ok = (k + ks)[None, :] < K
            x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        acc = _mma(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        if EVEN_N:
            acc += tl.load(B + cols).to(tl.float32)[None, :]
        else:
            acc += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = acc * tl.sigmoid((acc + 0.044715 * acc * acc * acc) * TWO_SQRT_2_OVER_PI)
    out = Y + rows[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=row_ok & (cols[None, :] < N))
