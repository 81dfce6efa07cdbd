"""The Triton kernels of LayerNorm and residual add + LayerNorm (see gptfast/kernels/layer_norm.py
for the op, gptfast/kernels/layer_norm_plans.py for how they are launched).

Shapes: M rows of N elements; x (and the residual, dy, the sum's grad) are read through a row
stride with a unit column stride; y, the sum and dx are written as contiguous (M, N) rows.
Statistics (mean, rstd: fp32, one of each per row) are written by the forward for the backward.
"""

import triton
import triton.language as tl


# Forward, whole rows in registers (padded width BLOCK_N <= 8192). Each program normalizes ROWS
# consecutive rows as one [ROWS, BLOCK_N] tile: x (and the residual) are read once, y (and the sum)
# written once, plus 8 bytes of mean/rstd per row when STATS (training), so HBM traffic is that of
# a copy. ROWS packs narrow rows (768 -> 4 rows, 1600 -> 2 rows) into ~4096-element tiles, 16
# elements (bf16: two 128-bit loads) per thread. Mean and variance are two passes over the
# registers (exact centring, no E[x^2] - E[x]^2).
@triton.jit
def _fwd_rows_kernel(
    X, R, S, Y, W, B, MEAN, RSTD,
    M, N, stride_x, stride_r, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows64 * N + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STATS:
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


# Forward, wide rows (padded width > 8192): one program per row, looping over BLOCK_N columns.
# Pass 1 reads x (and the residual, writing the rounded sum) and merges each block's mean and
# squared deviations into the row's with Chan's parallel formula. Pass 2 re-reads the row (x, or
# the stored sum) -- still in L2, this program just read it -- and writes y. HBM traffic stays
# close to a copy's; statistics are as exact as the single-block path.
@triton.jit
def _fwd_wide_kernel(
    X, R, S, Y, W, B, MEAN, RSTD,
    N, stride_x, stride_r, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    r_row = R + row.to(tl.int64) * stride_r
    s_row = S + row.to(tl.int64) * N
    y_row = Y + row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    count = tl.zeros([], tl.float32)  # elements merged so far
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for start in range(0, N, BLOCK_N):
        ok = start + cols < N
        x = tl.load(x_row + start + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_row + start + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
            tl.store(s_row + start + cols, x, mask=ok)
        x = x.to(tl.float32)
        n_b = tl.sum(ok.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=0) / n_b
        dev = tl.where(ok, x - mean_b, 0.0)
        delta = mean_b - mean
        mean += delta * (n_b / (count + n_b))
        m2 += tl.sum(dev * dev, axis=0) + delta * delta * (count * n_b / (count + n_b))
        count += n_b
    rstd = tl.rsqrt(m2 / N + eps)
    if STATS:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # the sum written above is read back by other threads of this program
    for start in range(0, N, BLOCK_N):
        ok = start + cols < N
        if HAS_RESIDUAL:
            x = tl.load(s_row + start + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row + start + cols, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + start + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + start + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=ok)


# Backward row sums, wide rows only: one program per row loops over BLOCK_N columns, reading x and
# dy once, and stores c1 = mean(xhat * w*dy) and c2 = mean(w*dy) (fp32, 8 bytes per row) for the
# dx pass, which needs them before it can write any column of the row.
@triton.jit
def _bwd_row_sums_kernel(
    X, DY, W, MEAN, RSTD, SUMS,
    M, N, stride_x, stride_dy,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    dy_row = DY + row.to(tl.int64) * stride_dy
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    cols = tl.arange(0, BLOCK_N)
    c1 = tl.zeros([BLOCK_N], tl.float32)
    c2 = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        ok = start + cols < N
        x = tl.load(x_row + start + cols, mask=ok, other=0.0).to(tl.float32)
        wdy = tl.load(dy_row + start + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            wdy = wdy * tl.load(W + start + cols, mask=ok, other=0.0).to(tl.float32)
        c1 += (x - mean) * rstd * wdy
        c2 += wdy
    tl.store(SUMS + row, tl.sum(c1, axis=0) / N)
    tl.store(SUMS + M + row, tl.sum(c2, axis=0) / N)


# Backward dx and partial dweight/dbias, persistent: grid (G, C). Program (g, c) owns the
# rows_per_program consecutive rows of group g and column block c (C = 1 when the row fits in
# registers: WHOLE_ROW, c1 and c2 are row sums of the tile; else they come from the row-sums
# kernel). G x C is exactly the programs all SMs hold at once (within the register budget of
# layer_norm_plans._bwd_max_registers, which the static gate checks): one wave, no tail. Each
# program walks its rows ROWS at a time, reading x and dy (and the sum's grad) once and writing
# dx once (128-bit accesses), and accumulates dy*xhat and dy in fp32 register tiles. At the end
# it writes one fp32 row of partials per parameter: 8*N bytes per program, against ~6*N*rows of
# main traffic per program in bf16 (~21 rows per program at 8192 rows on 132 SMs x 3). No
# atomics, no locks.
# Latency: the row loop is software-pipelined (NUM_STAGES: the x/dy/ds tiles of the next
# iterations are in flight as cp.async copies into shared memory while one is computed): at
# N=768 in bf16, 3 programs x 2 tiles x 2 rows x 768 x 2 tensors x 2 B = 37 KB of loads in
# flight per SM, against the ~29 KB an H200 needs (4.8 TB/s / 132 SMs x ~0.8 us).
@triton.jit
def _bwd_kernel(
    X, DY, DS, DX, W, MEAN, RSTD, SUMS, PART_W, PART_B,
    M, N, stride_x, stride_dy, stride_ds, rows_per_program,
    HAS_DSUM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    WHOLE_ROW: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    if not WHOLE_ROW:
        cols += tl.program_id(1) * BLOCK_N
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc_w = tl.zeros([ROWS, BLOCK_N], tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_N], tl.float32)
    first = group * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in tl.range(first, last, ROWS, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        xhat = (x - mean) * rstd
        wdy = dy * w if HAS_W else dy
        if WHOLE_ROW:  # padded columns have dy = 0, so they add nothing
            c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
            c2 = tl.sum(wdy, axis=1)[:, None] / N
        else:
            c1 = tl.load(SUMS + rows, mask=row_ok, other=0.0)[:, None]
            c2 = tl.load(SUMS + M + rows, mask=row_ok, other=0.0)[:, None]
        dx = (wdy - xhat * c1 - c2) * rstd
        if HAS_DSUM:
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            acc_w += dy * xhat
        if HAS_B:
            acc_b += dy
    if HAS_W:
        tl.store(PART_W + group * N + cols, tl.sum(acc_w, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(PART_B + group * N + cols, tl.sum(acc_b, axis=0), mask=col_ok)


# dweight/dbias from the (G, N) fp32 partial rows: program j adds up column block j over all G
# rows, BLOCK_G rows at a time in a register tile, in a fixed order (deterministic), and stores
# the sums in the parameters' dtypes. Reads 8*G*N bytes; G is a few hundred at most. BLOCK_N is
# the narrowest power of 2 that keeps the grid within ~4 programs per SM (32 columns at least:
# 128-byte segments of each partial row).
@triton.jit
def _sum_partials_kernel(
    PART_W, PART_B, DW, DB, G, N,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc_w = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    acc_b = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for start in range(0, G, BLOCK_G):
        groups = start + tl.arange(0, BLOCK_G)
        mask = (groups < G)[:, None] & col_ok[None, :]
        offsets = groups[:, None] * N + cols[None, :]
        if HAS_W:
            acc_w += tl.load(PART_W + offsets, mask=mask, other=0.0)
        if HAS_B:
            acc_b += tl.load(PART_B + offsets, mask=mask, other=0.0)
    if HAS_W:
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    if HAS_B:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=col_ok)
