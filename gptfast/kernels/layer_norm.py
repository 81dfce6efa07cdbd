"""Fused LayerNorm, and residual add + LayerNorm, over the last dimension (Triton).

``layer_norm(x, weight, bias, eps)`` matches ``torch.nn.functional.layer_norm(x, (N,), ...)``:
y = (x - mean) / sqrt(var + eps) * weight + bias with the biased variance, per row of N elements.
``add_layer_norm(x, residual, ...)`` returns ``(layer_norm(s), s)`` for s = x + residual, the
pre-LN transformer step ``x = x + attn_out; h = norm2(x)`` in one pass over memory, both ways.

Numerics: x may be fp32, fp16 or bf16; statistics and accumulation are fp32, outputs are stored in
x's dtype. weight/bias may have another float dtype (e.g. fp32 parameters with bf16 activations);
their gradients come back in their own dtype. The fused sum is rounded like eager PyTorch:
s = fp32(x) + fp32(residual) rounded once to x's dtype, stored, and that stored value is normalized.

Backward: dx = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy)), with mean and rstd saved (fp32)
by the forward. dweight = sum_rows(dy * xhat), dbias = sum_rows(dy): every backward program
accumulates its own rows in fp32 registers and writes one row of fp32 partial sums; a second small
kernel adds the partial rows in a fixed order. No atomics, no locks: bitwise deterministic.

Inputs may be non-contiguous: rows with a unit-stride last dimension are read in place through a
row stride (e.g. a column slice); anything else is copied to contiguous rows first (by the
forward and again by the backward, which keeps x itself rather than a copy). Widths 1..MAX_N.
Rows up to 8192 wide (padded to a power of 2) are held in registers; wider rows loop over
4096-column blocks.

torch.compile sees the ops gptfast::layer_norm, gptfast::add_layer_norm and
gptfast::layer_norm_backward (see gptfast/kernels/__init__.py).
"""

import math
import numbers

import torch
import triton
import triton.language as tl

from gptfast.kernels import tuning
from gptfast.kernels._common import check_device, check_float, library_op, on_device, plan_sm_count

MAX_N = 1 << 20  # widest row accepted; the looping kernels themselves have no lower limit
_MIN_BLOCK = 256  # narrowest padded row (narrower rows are packed many per tile instead)
_FUSED_MAX_BLOCK = 8192  # rows whose padded width fits this are held whole in registers
_WIDE_BLOCK = 4096  # column block of the looping kernels for wider rows
# [ROWS, BLOCK_N] register tiles: (elements, elements per thread). The backward keeps ~7 live
# values per element (x, dy, xhat, w*dy, dx, two accumulators), the forward ~3.
_FWD_TILE = (4096, 16)
_BWD_TILE = (2048, 8)
_WARPS_PER_SM = 24  # resident warps per SM that sizes the persistent backward grid (see _bwd_kernel)
_BWD_STAGES = 3  # row tiles of the backward in flight per program (cp.async; see _bwd_kernel)
_BWD_PREFETCH_BYTES = 64 * 1024  # ... within this much shared memory per program (3 per SM fit
# an A100's 164 KB): 3 stages up to 2048-wide fp32 tiles, fewer for wider rows (1 at 8192)
_SUM_TILE = 4096  # elements per [BLOCK_G, BLOCK_N] tile of the partial-sum reduction
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# Forward, whole rows in registers (padded width BLOCK_N <= 8192). Each program normalizes ROWS
# consecutive rows as one [ROWS, BLOCK_N] tile: x (and the residual) are read once, y (and the sum)
# written once, plus 8 bytes of mean/rstd per row, so HBM traffic is that of a copy. ROWS packs
# narrow rows (768 -> 4 rows, 1600 -> 2 rows) into ~4096-element tiles, 16 elements per thread.
# Mean and variance are two passes over the registers (exact centring, no E[x^2] - E[x]^2).
@triton.jit
def _fwd_rows_kernel(
    X, R, S, Y, W, B, MEAN, RSTD,
    M, N, stride_x, stride_r, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
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
    HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
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
# rows_per_program consecutive rows of group g (G ~ 24 warps per SM in all) and column block c
# (C = 1 when the row fits in registers; then c1, c2 are row sums of the tile, else they come from
# the row-sums kernel). It walks its rows ROWS at a time, reading x and dy (and the sum's grad)
# once and writing dx once, and accumulates dy*xhat and dy in fp32 register tiles. At the end it
# writes one fp32 row of partials per parameter: 8*N bytes per program, against ~6*N*rows of
# main traffic per program in fp16 (dozens of rows per program at GPT-2 sizes).
# Latency: the row loop is software-pipelined (NUM_STAGES=3: the x/dy/ds tiles of the next two
# iterations are in flight as cp.async copies into shared memory while one is computed). At
# 80 registers/thread (sm_80/90) an SM holds 3 programs of 8 warps (24 warps, the grid's size):
# at N=768 in bf16 that is 3 programs x 2 tiles x 2 rows x 768 x 2 tensors x 2 B = 37 KB of
# loads in flight per SM (55 KB with ds), at N=1600 (1 row) 38 KB, against the ~29 KB an H200
# needs (4.8 TB/s / 132 SMs x ~0.8 us). Before: 2 programs, unpipelined, ~12 KB.
@triton.jit
def _bwd_kernel(
    X, DY, DS, DX, W, MEAN, RSTD, SUMS, PART_W, PART_B,
    M, N, stride_x, stride_dy, stride_ds, rows_per_program,
    HAS_DSUM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    WHOLE_ROW: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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


# ---- launch heuristics ---------------------------------------------------------------------


def _row_block(n: int) -> int | None:
    """Padded width of a row held whole in registers, or None: the row needs the looping kernels."""
    block = max(_MIN_BLOCK, triton.next_power_of_2(n))
    return block if block <= _FUSED_MAX_BLOCK else None


def _tile(block_n: int, tile: tuple[int, int], max_warps: int = 32) -> tuple[int, int]:
    """(ROWS, num_warps) of a [ROWS, block_n] register tile of ``tile`` = (elements, per thread),
    at most ``max_warps`` warps (more elements per thread beyond)."""
    elements, per_thread = tile
    rows = max(1, elements // block_n)
    return rows, min(max_warps, rows * block_n // (32 * per_thread))


def _shape_class(dtype: torch.dtype, block_n: int) -> str:
    """The tuning tables' shape class: activation dtype and padded width, e.g. "bf16-1024"."""
    return f"{_TRITON_DTYPE[dtype]}-{block_n}"


def _fwd_plan(n: int, dtype: torch.dtype = torch.float16, device=None) -> tuple[object, dict, int]:
    """(kernel, tile constexprs, num_warps) of the forward for rows of n elements: the device's
    tuning table for this shape class, else the static tile."""
    block = _row_block(n)
    if block is None:
        return _fwd_wide_kernel, dict(BLOCK_N=_WIDE_BLOCK), _tile(_WIDE_BLOCK, _FWD_TILE)[1]
    tuned = tuning.lookup(FWD_KERNEL, _shape_class(dtype, block), device)
    if tuned is not None:
        return _fwd_rows_kernel, dict(BLOCK_N=block, ROWS=tuned["rows"]), tuned["num_warps"]
    rows, warps = _tile(block, _FWD_TILE)
    return _fwd_rows_kernel, dict(BLOCK_N=block, ROWS=rows), warps


def _bwd_plan(n: int, dtype: torch.dtype = torch.float16, device=None) -> tuple[dict, int]:
    """(tile constexprs, num_warps) of the backward kernels for rows of n elements: the
    device's tuning table for this shape class (whole rows only), else the static tile."""
    block = _row_block(n)
    tuned = None if block is None else tuning.lookup(BWD_KERNEL, _shape_class(dtype, block), device)
    if tuned is not None:
        return dict(WHOLE_ROW=True, BLOCK_N=block, ROWS=tuned["rows"],
                    NUM_STAGES=tuned["num_stages"]), tuned["num_warps"]
    # At most 16 warps: 32 would cap registers at 64 per thread, and the 8192-wide tile spills.
    rows, warps = _tile(block or _WIDE_BLOCK, _BWD_TILE, max_warps=16)
    # Shared memory: NUM_STAGES - 1 prefetched tiles of x, dy and ds in fp32 (the widest case).
    stage_bytes = rows * (block or _WIDE_BLOCK) * 3 * 4
    stages = max(1, min(_BWD_STAGES, 1 + _BWD_PREFETCH_BYTES // stage_bytes))
    return dict(WHOLE_ROW=block is not None, BLOCK_N=block or _WIDE_BLOCK, ROWS=rows,
                NUM_STAGES=stages), warps


# Tiles a tuning table may pick (bench/tune.py sweeps them) at GPT-2's widths (768..1600 pad to
# 1024 and 2048), for bf16 activations and fp32 ones (autocast keeps LayerNorm in fp32); each
# is compiled by aot_configs(). Forward: ROWS x BLOCK_N tiles of 8 or 16 elements per thread.
# Backward: the static tile with 1-3 stages, and 4 or 8 elements per thread with 2 stages
# (at most 16 warps: a 32-warp program has 64 registers per thread, and spills).
def _tuning_space(block: int) -> tuple[list[dict], list[dict]]:
    fwd, bwd = [], []
    for rows in (1, 2, 4):
        for per_thread in (8, 16):
            fwd.append(dict(rows=rows, num_warps=rows * block // (32 * per_thread)))
    rows, warps = _tile(block, _BWD_TILE)
    bwd += [dict(rows=rows, num_warps=warps, num_stages=s) for s in (1, 2, 3)]
    for rows in (1, 2, 4):
        for per_thread in (4, 8):
            warps = rows * block // (32 * per_thread)  # 32 warps cap registers at 64: spills
            config = dict(rows=rows, num_warps=warps, num_stages=2)
            bwd += [config] if warps <= 16 and config not in bwd else []
    return fwd, bwd


FWD_KERNEL, BWD_KERNEL = "layer_norm.fwd", "layer_norm.bwd"  # names in the tuning tables
TUNING_SPACE = {FWD_KERNEL: {}, BWD_KERNEL: {}}
for _t in ("bf16", "fp32"):
    for _block in (1024, 2048):
        TUNING_SPACE[FWD_KERNEL][f"{_t}-{_block}"], TUNING_SPACE[BWD_KERNEL][f"{_t}-{_block}"] = (
            _tuning_space(_block))
for _kernel, _space in TUNING_SPACE.items():
    tuning.register(_kernel, _space)


def _sum_plan(n: int, device) -> dict:
    """Tile of the partial-sum reduction: ~4 programs per SM, 4096 elements per tile."""
    block_n = min(1024, max(32, triton.next_power_of_2(triton.cdiv(n, 4 * _sm_count(device)))))
    return dict(BLOCK_G=_SUM_TILE // block_n, BLOCK_N=block_n)


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device, or of the planned GPU; 4 for the interpreter's own plans (few
    programs keep CPU runs fast)."""
    return plan_sm_count(device) or 4


def _bwd_groups(m: int, col_blocks: int, rows: int, num_warps: int, device) -> tuple[int, int]:
    """(G, rows_per_program): ~_WARPS_PER_SM resident warps per SM over all G x col_blocks
    programs, each owning a run of rows that is a multiple of ROWS."""
    programs_per_sm = max(1, _WARPS_PER_SM // num_warps)
    groups = max(1, _sm_count(device) * programs_per_sm // col_blocks)
    per_program = triton.cdiv(triton.cdiv(m, groups), rows) * rows
    return triton.cdiv(m, per_program), per_program


# ---- host side -----------------------------------------------------------------------------


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) view of t when its last dimension has unit stride (any row stride), else a copy."""
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 or n == 1 else rows.contiguous()


def _forward(x, residual, weight, bias, eps):
    """Returns y and the stored sum (or None) as (M, N) rows, mean, rstd."""
    n = x.shape[-1]
    xr = _as_rows(x, n)
    rr = xr if residual is None else _as_rows(residual, n)
    m = xr.shape[0]
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((m, n), dtype=dtype, device=x.device)
    s = None if residual is None else torch.empty_like(y)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if m > 0:
        kernel, tile, warps = _fwd_plan(n, dtype, x.device)
        tensors = (xr, rr, _or(s, y), y, _or(weight, y), _or(bias, y), mean, rstd)
        flags = dict(HAS_RESIDUAL=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None)
        with on_device(x.device):
            if kernel is _fwd_rows_kernel:
                grid, sizes = (triton.cdiv(m, tile["ROWS"]),), (m, n)
            else:
                grid, sizes = (m,), (n,)
            kernel[grid](*tensors, *sizes, xr.stride(0), rr.stride(0), eps, **flags, **tile, num_warps=warps)
    return y, s, mean, rstd


def _backward(dy, dsum, xn, weight, bias, mean, rstd):
    """dx (+ dsum) as (M, N) rows, dweight, dbias; xn are the rows that were normalized."""
    m, n = xn.shape
    dyr = _as_rows(dy, n)
    dsr = dyr if dsum is None else _as_rows(dsum, n)
    dx = torch.empty((m, n), dtype=xn.dtype, device=xn.device)
    dw = None if weight is None else torch.empty(n, dtype=weight.dtype, device=xn.device)
    db = None if bias is None else torch.empty(n, dtype=bias.dtype, device=xn.device)
    if m == 0:
        return dx, _zero(dw), _zero(db)
    tile, warps = _bwd_plan(n, xn.dtype, xn.device)
    col_blocks = triton.cdiv(n, tile["BLOCK_N"])
    groups, per_program = _bwd_groups(m, col_blocks, tile["ROWS"], warps, xn.device)
    has_w, has_b = weight is not None, bias is not None
    partials = torch.empty((2, groups, n) if has_w or has_b else (2, 1, 1), dtype=torch.float32, device=xn.device)
    sums = mean if tile["WHOLE_ROW"] else torch.empty((2, m), dtype=torch.float32, device=xn.device)
    with on_device(xn.device):
        if not tile["WHOLE_ROW"]:
            _bwd_row_sums_kernel[(m,)](
                xn, dyr, _or(weight, dx), mean, rstd, sums, m, n, xn.stride(0), dyr.stride(0),
                HAS_W=has_w, BLOCK_N=tile["BLOCK_N"], num_warps=warps,
            )
        _bwd_kernel[(groups, col_blocks)](
            xn, dyr, dsr, dx, _or(weight, dx), mean, rstd, sums, partials[0], partials[1],
            m, n, xn.stride(0), dyr.stride(0), dsr.stride(0), per_program,
            HAS_DSUM=dsum is not None, HAS_W=has_w, HAS_B=has_b, **tile, num_warps=warps,
            num_stages=tile["NUM_STAGES"],
        )
        if has_w or has_b:
            sum_tile = _sum_plan(n, xn.device)
            _sum_partials_kernel[(triton.cdiv(n, sum_tile["BLOCK_N"]),)](
                partials[0], partials[1], _or(dw, dx), _or(db, dx), groups, n,
                HAS_W=has_w, HAS_B=has_b, **sum_tile, num_warps=8,
            )
    return dx, dw, db


def _or(t, dummy):
    """A pointer for an absent optional tensor; the kernel's HAS_* flag keeps it unread."""
    return dummy if t is None else t


def _zero(t):
    return None if t is None else t.zero_()


# ---- autograd, and the torch.library ops torch.compile sees ---------------------------------
# gptfast::layer_norm -> (y, mean, rstd) and gptfast::add_layer_norm -> (y, s, mean, rstd) are
# opaque ops (see gptfast/kernels/__init__.py) over validated input (the public functions check it):
# they also return the fp32 row statistics the backward needs, which the public functions drop.
# gptfast::layer_norm_backward serves both; it has no autograd (no double backward).


def _rows(x: torch.Tensor):
    """M, the number of rows of N = x.shape[-1] elements (symbolic under dynamic shapes)."""
    return math.prod(x.shape[:-1])


@torch.library.custom_op("gptfast::layer_norm_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, dsum: torch.Tensor | None, x: torch.Tensor,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx + dsum, dweight, dbias) for the normalized input x (add_layer_norm: the sum s);
    an absent weight or bias gets an empty placeholder gradient."""
    dx, dw, db = _backward(dy, dsum, _as_rows(x, x.shape[-1]), weight, bias, mean, rstd)
    return dx.view(x.shape), _or(dw, dx.new_empty(0)), _or(db, dx.new_empty(0))


@_backward_op.register_fake
def _(dy, dsum, x, weight, bias, mean, rstd):
    def grad(p):
        return x.new_empty(0) if p is None else torch.empty_like(p)
    return x.new_empty(x.shape), grad(weight), grad(bias)


def _param_grads(ctx, dw, db):
    return dw if ctx.has_weight else None, db if ctx.has_bias else None


def _layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _forward(x, None, weight, bias, eps)
    return y.view(x.shape), mean, rstd


def _layer_norm_fake(x, weight, bias, eps):
    stats = x.new_empty(_rows(x), dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _backward_op(dy, None, x, weight, bias, mean, rstd)
    return dx, *_param_grads(ctx, dw, db), None


def _add_layer_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, mean, rstd = _forward(x, residual, weight, bias, eps)
    return y.view(x.shape), s.view(x.shape), mean, rstd


def _add_layer_norm_fake(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    stats = x.new_empty(_rows(x), dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), stats,
            torch.empty_like(stats))


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.dtypes = x.dtype, residual.dtype
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(s, weight, bias, mean, rstd)


def _add_layer_norm_backward(ctx, dy, dsum, _dmean, _drstd):
    x_dtype, r_dtype = ctx.dtypes
    if dy is None:  # only the sum was used downstream
        return dsum.to(x_dtype), dsum.to(r_dtype), None, None, None
    s, weight, bias, mean, rstd = ctx.saved_tensors
    ds, dw, db = _backward_op(dy, dsum, s, weight, bias, mean, rstd)
    return ds.to(x_dtype), ds.to(r_dtype), *_param_grads(ctx, dw, db), None


_layer_norm = library_op("layer_norm", _layer_norm_forward, _layer_norm_fake, _layer_norm_setup,
                         _layer_norm_backward)
_add_layer_norm = library_op("add_layer_norm", _add_layer_norm_forward, _add_layer_norm_fake,
                             _add_layer_norm_setup, _add_layer_norm_backward)


def _check(op, x, residual, weight, bias, eps) -> None:
    """Every input problem named in Python, before any launch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if op == "add_layer_norm" and not isinstance(residual, torch.Tensor):
        raise TypeError(
            f"{op}: residual must be a torch.Tensor shaped like x, got {type(residual).__name__} "
            "(without a residual, call layer_norm)"
        )
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_device(op, x=x, residual=residual, weight=weight, bias=bias)
    check_float(op, x=x, residual=residual, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (the normalized last one)")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"{op}: the normalized (last) dimension must have 1 to {MAX_N} elements, got {n}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"{op}: {name} must have shape ({n},) like the last dimension of x, got {tuple(p.shape)}")
    # Any finite eps, as torch's: eps = 0 on a constant row gives NaN there, as torch does.
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"{op}: eps must be a finite number, got {eps!r}")


def _contiguous(p):
    return None if p is None else p.contiguous()


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x (any leading dims), like F.layer_norm(x, (N,), ...).

    x: fp32/fp16/bf16, N = x.shape[-1] in 1..MAX_N. weight, bias: optional, shape (N,), any float
    dtype. Returns a tensor shaped like x, in x's dtype. Differentiable in x, weight and bias.
    """
    _check("layer_norm", x, None, weight, bias, eps)
    return _layer_norm(x, _contiguous(weight), _contiguous(bias), float(eps))[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(s, weight, bias, eps), s) with s = x + residual, in one pass each way.

    s is x + residual computed in fp32 and rounded once to their promoted dtype (what eager
    ``x + residual`` gives: e.g. fp32 for a bf16 branch output added to an fp32 residual stream
    under autocast); that rounded s is what gets normalized, and the output has s's dtype.
    residual must have x's shape. Gradients reach x and residual (the grad of s plus the norm's
    input grad, cast to each input's dtype).
    """
    _check("add_layer_norm", x, residual, weight, bias, eps)
    y, s, _, _ = _add_layer_norm(x, residual, _contiguous(weight), _contiguous(bias), float(eps))
    return y, s


# ---- ahead-of-time compile configs -----------------------------------------------------------

def _config(name, fn, types, constexprs, num_warps, num_stages=3, n=768):
    """One AOT record: pointers typed by ``types`` (default: the activation dtype, key "*"), with
    the divisibility hints a launch at width ``n`` gets (16-byte aligned pointers and row
    strides; N itself when a multiple of 16), so that loads vectorise as they will on the GPU."""
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "eps":
            signature[arg] = "fp32"
        elif arg.isupper() and arg not in ("M", "N", "G"):  # pointers are upper case
            signature[arg] = "*" + types.get(arg, types["*"])
        else:
            signature[arg] = "i32"
    aligned = {a for a in fn.arg_names if signature[a].startswith("*") or a.startswith("stride")}
    if n % 16 == 0:
        aligned.add("N")
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in aligned}
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "attrs": attrs,
            "num_warps": num_warps, "num_stages": num_stages}


def _plan_widths() -> list[int]:
    """One width per distinct plan: each padded register width, and one past them (looping)."""
    return [1 << k for k in range(_MIN_BLOCK.bit_length() - 1, _FUSED_MAX_BLOCK.bit_length())] + [_FUSED_MAX_BLOCK + 1]


def _configs(t: str, p: str, residual: bool, widths, has_w=True, has_b=True):
    """Launch configs of the plans for ``widths``: activations of type t, parameters of type p,
    with the residual (and its grad) or without, with or without weight and bias."""
    types = _types(t, p)
    affine = dict(HAS_W=has_w, HAS_B=has_b)
    tag = f"{t}/{p}/{'add' if residual else 'plain'}/w{has_w:d}b{has_b:d}"
    dtype = {v: k for k, v in _TRITON_DTYPE.items()}[t]
    for n in widths:
        yield _fwd_config(t, p, residual, n, _fwd_plan(n, dtype), affine, tag)
        yield _bwd_config(t, p, residual, n, _bwd_plan(n, dtype), affine, tag)
        tile, warps = _bwd_plan(n, dtype)
        if not tile["WHOLE_ROW"]:
            yield _config(f"_bwd_row_sums_kernel/{t}/{p}/w{has_w:d}", _bwd_row_sums_kernel, types,
                          dict(HAS_W=has_w, BLOCK_N=tile["BLOCK_N"]), warps, n=n)


def _types(t: str, p: str) -> dict:
    return {"*": t, "W": p, "B": p, "MEAN": "fp32", "RSTD": "fp32", "SUMS": "fp32", "PART_W": "fp32",
            "PART_B": "fp32"}


def _fwd_config(t, p, residual, n, plan, affine, tag):
    kernel, tile, warps = plan
    rows = f"/r{tile['ROWS']}" if "ROWS" in tile else ""
    return _config(f"{kernel.__name__}/{tag}/{tile['BLOCK_N']}{rows}w{warps}", kernel, _types(t, p),
                   dict(HAS_RESIDUAL=residual, **affine, **tile), warps, n=n)


def _bwd_config(t, p, residual, n, plan, affine, tag):
    tile, warps = plan
    kind = "whole" if tile["WHOLE_ROW"] else "wide"
    return _config(f"_bwd_kernel/{tag}/{kind}/{tile['BLOCK_N']}/r{tile['ROWS']}w{warps}s{tile['NUM_STAGES']}",
                   _bwd_kernel, _types(t, p), dict(HAS_DSUM=residual, **affine, **tile), warps,
                   tile["NUM_STAGES"], n=n)


def _sum_config(p: str, block_n: int, has_b=True):
    name = f"_sum_partials_kernel/{p}/b{has_b:d}/{block_n}"
    return _config(name, _sum_partials_kernel, {"*": "fp32", "DW": p, "DB": p},
                   dict(HAS_W=True, HAS_B=has_b, BLOCK_G=_SUM_TILE // block_n, BLOCK_N=block_n), 8)


def aot_configs():
    """Every (kernel, BLOCK_N, ROWS, num_warps) the heuristics can pick, for fp32/fp16/bf16
    activations with weight and bias of their dtype, as add_layer_norm launches them (residual
    in, sum's grad in: the most registers), and every reduction tile for fp32 parameters. The
    other flag and dtype variants only drop code or change a pointer type; they are compiled at
    GPT-2 small's width (and some at the looping path): plain layer_norm, fp32 parameters with
    bf16 activations, weight only, neither weight nor bias, fp16/bf16 parameter grads. Then
    every tile of TUNING_SPACE, in its class, with the residual. Records are named by their
    tile (ROWS, warps, stages); duplicates compile once."""
    configs = [_sum_config("fp32", block_n) for block_n in (32, 64, 128, 256, 512, 1024)]
    configs += [_sum_config(p, 32) for p in ("fp16", "bf16")] + [_sum_config("fp16", 32, has_b=False)]
    for t in ("fp32", "fp16", "bf16"):
        configs += _configs(t, t, True, _plan_widths())
        configs += _configs(t, t, False, [768])
    configs += _configs("bf16", "fp32", False, [768])
    configs += _configs("fp16", "fp16", False, [768], has_b=False)
    configs += _configs("fp16", "fp16", False, [768, _FUSED_MAX_BLOCK + 1], has_w=False, has_b=False)
    for t in ("fp16", "bf16"):  # autocast: a half-precision branch added to an fp32 residual stream
        kernel, tile, warps = _fwd_plan(768)
        configs.append(_config(f"{kernel.__name__}/{t}+fp32/add/768", kernel, {"*": "fp32", "X": t},
                               dict(HAS_RESIDUAL=True, HAS_W=True, HAS_B=True, **tile), warps))
    affine, tag = dict(HAS_W=True, HAS_B=True), "add/w1b1"  # named like the defaults: no twins
    for cls, space in TUNING_SPACE[FWD_KERNEL].items():  # what a tuning table may pick
        t, block = cls.split("-")
        for c in space:
            plan = (_fwd_rows_kernel, dict(BLOCK_N=int(block), ROWS=c["rows"]), c["num_warps"])
            configs.append(_fwd_config(t, t, True, int(block), plan, affine, f"{t}/{t}/{tag}"))
    for cls, space in TUNING_SPACE[BWD_KERNEL].items():
        t, block = cls.split("-")
        for c in space:
            plan = (dict(WHOLE_ROW=True, BLOCK_N=int(block), ROWS=c["rows"], NUM_STAGES=c["num_stages"]),
                    c["num_warps"])
            configs.append(_bwd_config(t, t, True, int(block), plan, affine, f"{t}/{t}/{tag}"))
    return list({c["name"]: c for c in configs}.values())


def report_cases(cc: int = 90):
    """GPT-2's add_layer_norm forward and backward at 8 x 1024 tokens, for the static report
    (gptfast/kernels/report.py): widths 768, 1024, 1280, 1600 (124M..1558M), fp32 and bf16 activations
    with parameters of their dtype, on a GPU of compute capability ``cc`` (its SM count). Per
    launch a label, its aot config (specialised as the JIT specialises the call) and its grid
    size in programs, from the launch plans ``_forward``/``_backward`` use."""
    from gptfast.kernels.testing import SM_COUNT, launch_config, sm_count_of

    m, cuda = 8 * 1024, torch.device("cuda")
    cases = []
    for model, n in (("124M", 768), ("355M", 1024), ("774M", 1280), ("1558M", 1600)):
        for t, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            label = f"{model} {m}x{n} {t}"
            p, f = "*" + t, "*fp32"
            kernel, tile, warps = _fwd_plan(n, dtype)
            args = dict(X=p, R=p, S=p, Y=p, W=p, B=p, MEAN=f, RSTD=f, M=m, N=n, stride_x=n,
                        stride_r=n, eps=1e-5)
            flags = dict(HAS_RESIDUAL=True, HAS_W=True, HAS_B=True)
            grid = triton.cdiv(m, tile["ROWS"]) if kernel is _fwd_rows_kernel else m
            cfg = launch_config(f"{kernel.__name__} {label}", kernel, args, flags | tile, warps)
            cases.append({"label": label, "config": cfg, "grid": grid})
            tile, warps = _bwd_plan(n, dtype)
            col_blocks = triton.cdiv(n, tile["BLOCK_N"])
            with sm_count_of(__name__, SM_COUNT[cc]):
                groups, per_program = _bwd_groups(m, col_blocks, tile["ROWS"], warps, cuda)
                sum_tile = _sum_plan(n, cuda)
            args = dict(X=p, DY=p, DS=p, DX=p, W=p, MEAN=f, RSTD=f, SUMS=f, PART_W=f, PART_B=f,
                        M=m, N=n, stride_x=n, stride_dy=n, stride_ds=n, rows_per_program=per_program)
            flags = dict(HAS_DSUM=True, HAS_W=True, HAS_B=True)
            cfg = launch_config(f"_bwd_kernel {label}", _bwd_kernel, args, flags | tile, warps,
                                tile["NUM_STAGES"])
            cases.append({"label": label, "config": cfg, "grid": groups * col_blocks})
            args = dict(PART_W=f, PART_B=f, DW=p, DB=p, G=groups, N=n)
            cfg = launch_config(f"_sum_partials_kernel {label}", _sum_partials_kernel, args,
                                dict(HAS_W=True, HAS_B=True, **sum_tile), 8)
            cases.append({"label": label, "config": cfg, "grid": triton.cdiv(n, sum_tile["BLOCK_N"])})
    return cases
