"""Launch plans of the LayerNorm kernels (gptfast/kernels/layer_norm_kernels.py): tiles, warps,
the backward's persistent grid and register cap, the tuning space, and the ahead-of-time configs
and static-report cases that the gate compiles.

A plan depends on the row width, the activation dtype, the device (its compute capability and
SM count, or the named capability off CUDA, see gptfast.kernels._common) and the device's tuning
table; ``fwd_plan``/``bwd_plan`` cache it per those and the call's flags (``plan_cache``), with
the kernels' direct launchers (``_common.Kernel``) configured, so that a call pays a dict lookup
and a few integer operations for its grid.
"""

from dataclasses import dataclass

import torch

from gptfast.kernels import tuning
from gptfast.kernels._common import (
    Kernel, LaunchConfig, cdiv, next_power_of_2, plan_cache, plan_capability, plan_sm_count,
)
from gptfast.kernels.layer_norm_kernels import (
    _bwd_kernel, _bwd_row_sums_kernel, _fwd_rows_kernel, _fwd_wide_kernel, _sum_partials_kernel,
)

_MIN_BLOCK = 256  # narrowest padded row (narrower rows are packed many per tile instead)
_FUSED_MAX_BLOCK = 8192  # rows whose padded width fits this are held whole in registers
_WIDE_BLOCK = 4096  # column block of the looping kernels for wider rows
# [ROWS, BLOCK_N] register tiles: (elements, elements per thread). The backward keeps ~7 live
# values per element (x, dy, xhat, w*dy, dx, two accumulators), the forward ~3.
_FWD_TILE = (4096, 16)
_BWD_TILE = (2048, 8)
_BWD_MAX_ROWS = 2  # a backward tile holds at most 2 rows: each costs registers (statistics, row
# masks), and 4 or 8 rows spill under the register cap (_bwd_max_registers)
# Resident warps per SM of the persistent backward (see _bwd_kernel), by compute capability:
# 3 programs of 8 warps on Hopper (~37 KB of loads in flight per SM at GPT-2 widths in bf16),
# 2 on an A100 (~25 KB, against the ~15 KB its 2 TB/s needs), whose compiler gives the
# half-precision tiles 94-99 registers (80 on sm_90). Unnamed (the interpreter's plans): sm_90's.
_WARPS_PER_SM = {80: 16, 90: 24}
_BWD_STAGES = 3  # row tiles of the backward in flight per program (cp.async; see _bwd_kernel)
_BWD_PREFETCH_BYTES = 64 * 1024  # ... within this much shared memory per program (3 per SM fit
# an A100's 164 KB): 3 stages up to 2048-wide fp32 tiles, fewer for wider rows
_SUM_TILE = 4096  # elements per [BLOCK_G, BLOCK_N] tile of the partial-sum reduction
_SUM_WARPS = 8
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Registers per thread (the hardware's): 64K per SM, in 4 sub-partitions holding whole warps,
# allocated 8 per thread at a time; 255 at most.
_REGS_PER_SUB_PARTITION, _REG_STEP, _MAX_REGS = 65536 // 4, 8, 255


def _row_block(n: int) -> int | None:
    """Padded width of a row held whole in registers, or None: the row needs the looping kernels."""
    block = max(_MIN_BLOCK, next_power_of_2(n))
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
    width = block or _WIDE_BLOCK
    elements = min(_BWD_TILE[0], _BWD_MAX_ROWS * width)
    rows, warps = _tile(width, (elements, _BWD_TILE[1]), max_warps=16)
    # Shared memory: NUM_STAGES - 1 prefetched tiles of x, dy and ds, in their dtype.
    stage_bytes = rows * width * 3 * dtype.itemsize
    stages = max(1, min(_BWD_STAGES, 1 + _BWD_PREFETCH_BYTES // stage_bytes))
    return dict(WHOLE_ROW=block is not None, BLOCK_N=width, ROWS=rows, NUM_STAGES=stages), warps


def _programs_per_sm(num_warps: int, cc: int | None) -> int:
    return max(1, _WARPS_PER_SM.get(cc, _WARPS_PER_SM[90]) // num_warps)


def _bwd_max_registers(num_warps: int, cc: int | None) -> int:
    """Registers per thread within which _programs_per_sm programs of the backward are resident
    on one SM at once, so that its persistent grid is one wave. The static gate checks every
    compiled backward config against it (tests/test_static.py): the kernel before this one took
    90 registers under triton 3.9 (80 under 3.6), 2 programs per SM for a grid planned for 3,
    i.e. 1.41 waves. (A ptxas ``maxnreg`` cap at this count made configs that need 64-80
    registers spill: the budget is checked, not imposed.)"""
    warps = _programs_per_sm(num_warps, cc) * num_warps
    per_warp = _REGS_PER_SUB_PARTITION // cdiv(warps, 4)
    return min(_MAX_REGS, per_warp // 32 // _REG_STEP * _REG_STEP)


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
    block_n = min(1024, max(32, next_power_of_2(cdiv(n, 4 * _sm_count(device)))))
    return dict(BLOCK_G=_SUM_TILE // block_n, BLOCK_N=block_n)


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device, or of the planned GPU; 4 for the interpreter's own plans (few
    programs keep CPU runs fast)."""
    return plan_sm_count(device) or 4


def _resident_groups(col_blocks: int, num_warps: int, sms: int, cc: int | None) -> int:
    """Row groups G such that the G x col_blocks programs of the backward are the resident
    programs of all ``sms`` SMs (``_programs_per_sm`` each): one wave."""
    return max(1, sms * _programs_per_sm(num_warps, cc) // col_blocks)


def bwd_grid(m: int, rows: int, groups: int) -> tuple[int, int]:
    """(G, rows_per_program) for m rows over at most ``groups`` row groups, each owning a run of
    rows that is a multiple of ROWS (fewer groups when m is small)."""
    per_program = cdiv(cdiv(m, groups), rows) * rows
    return cdiv(m, per_program), per_program


def _bwd_groups(m: int, col_blocks: int, rows: int, num_warps: int, device) -> tuple[int, int]:
    """(G, rows_per_program) of the backward's grid on ``device``."""
    groups = _resident_groups(col_blocks, num_warps, _sm_count(device), plan_capability(device))
    return bwd_grid(m, rows, groups)


# ---- plans cached per shape class ------------------------------------------------------------
# The launchers of the kernels (``_common.Kernel``: no Triton dispatch per call) and their configs,
# made once per (width, dtype, device, flags) by ``plan_cache`` (which also keys on the named
# capability and the tuning tables' generation); a call adds its grid (a few integer operations).

FWD_ROWS, FWD_WIDE = Kernel(_fwd_rows_kernel), Kernel(_fwd_wide_kernel)
BWD, ROW_SUMS, SUM_PARTIALS = Kernel(_bwd_kernel), Kernel(_bwd_row_sums_kernel), Kernel(_sum_partials_kernel)


@plan_cache
def fwd_plan(n: int, dtype: torch.dtype, device: torch.device, residual: bool, has_w: bool,
             has_b: bool, stats: bool) -> tuple:
    """(launcher, config, ROWS) of the forward: ROWS rows per program, 0 for the wide kernel
    (one program per row, which takes no M)."""
    kernel, tile, warps = _fwd_plan(n, dtype, device)
    launcher = FWD_ROWS if kernel is _fwd_rows_kernel else FWD_WIDE
    config = launcher.config(HAS_RESIDUAL=residual, HAS_W=has_w, HAS_B=has_b, STATS=stats, **tile,
                             num_warps=warps)
    return launcher, config, tile.get("ROWS", 0)


@dataclass(frozen=True, slots=True)
class BackwardPlan:
    main: LaunchConfig  # _bwd_kernel's
    row_sums: LaunchConfig | None  # _bwd_row_sums_kernel's, for rows that do not fit registers
    reduce: LaunchConfig | None  # _sum_partials_kernel's, with a weight or a bias
    rows: int  # ROWS of the main kernel's tile
    col_blocks: int  # its grid's second dimension
    groups: int  # row groups at most (``bwd_grid``): the resident programs of all SMs
    reduce_grid: tuple  # the reduction's grid


@plan_cache
def bwd_plan(n: int, dtype: torch.dtype, device: torch.device, dsum: bool, has_w: bool,
             has_b: bool) -> BackwardPlan:
    """The backward's launches for rows of n elements of ``dtype`` (the normalized input's)."""
    tile, warps = _bwd_plan(n, dtype, device)
    col_blocks = cdiv(n, tile["BLOCK_N"])
    groups = _resident_groups(col_blocks, warps, _sm_count(device), plan_capability(device))
    sum_tile = _sum_plan(n, device)
    return BackwardPlan(
        main=BWD.config(HAS_DSUM=dsum, HAS_W=has_w, HAS_B=has_b, **tile, num_warps=warps,
                        num_stages=tile["NUM_STAGES"]),
        row_sums=None if tile["WHOLE_ROW"] else ROW_SUMS.config(
            HAS_W=has_w, BLOCK_N=tile["BLOCK_N"], num_warps=warps),
        reduce=SUM_PARTIALS.config(HAS_W=has_w, HAS_B=has_b, **sum_tile, num_warps=_SUM_WARPS)
        if has_w or has_b else None,
        rows=tile["ROWS"], col_blocks=col_blocks, groups=groups,
        reduce_grid=(cdiv(n, sum_tile["BLOCK_N"]),))


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


def _fwd_config(t, p, residual, n, plan, affine, tag, stats=True):
    kernel, tile, warps = plan
    rows = f"/r{tile['ROWS']}" if "ROWS" in tile else ""
    name = f"{kernel.__name__}/{tag}/{tile['BLOCK_N']}{rows}w{warps}{'' if stats else '/nostats'}"
    return _config(name, kernel, _types(t, p), dict(HAS_RESIDUAL=residual, **affine, STATS=stats, **tile),
                   warps, n=n)


def _bwd_config(t, p, residual, n, plan, affine, tag):
    tile, warps = plan
    kind = "whole" if tile["WHOLE_ROW"] else "wide"
    return _config(f"_bwd_kernel/{tag}/{kind}/{tile['BLOCK_N']}/r{tile['ROWS']}w{warps}s{tile['NUM_STAGES']}",
                   _bwd_kernel, _types(t, p), dict(HAS_DSUM=residual, **affine, **tile), warps,
                   tile["NUM_STAGES"], n=n)


def _sum_config(p: str, block_n: int, has_b=True):
    name = f"_sum_partials_kernel/{p}/b{has_b:d}/{block_n}"
    return _config(name, _sum_partials_kernel, {"*": "fp32", "DW": p, "DB": p},
                   dict(HAS_W=True, HAS_B=has_b, BLOCK_G=_SUM_TILE // block_n, BLOCK_N=block_n),
                   _SUM_WARPS)


def aot_configs():
    """Every (kernel, BLOCK_N, ROWS, num_warps) the heuristics can pick, for fp32/fp16/bf16
    activations with weight and bias of their dtype, as add_layer_norm launches them (residual
    in, sum's grad in: the most registers), and every reduction tile for fp32 parameters. The
    other flag and dtype variants only drop code or change a pointer type; they are compiled at
    GPT-2 small's width (and some at the looping path): plain layer_norm, inference (no
    statistics stored), fp32 parameters with bf16 activations, weight only, neither weight nor
    bias, fp16/bf16 parameter grads. Then every tile of TUNING_SPACE, in its class, with the
    residual. Records are named by their tile (ROWS, warps, stages); duplicates compile once."""
    configs = [_sum_config("fp32", block_n) for block_n in (32, 64, 128, 256, 512, 1024)]
    configs += [_sum_config(p, 32) for p in ("fp16", "bf16")] + [_sum_config("fp16", 32, has_b=False)]
    for t in ("fp32", "fp16", "bf16"):
        configs += _configs(t, t, True, _plan_widths())
        configs += _configs(t, t, False, [768])
    configs += _configs("bf16", "fp32", False, [768])
    configs += _configs("fp16", "fp16", False, [768], has_b=False)
    configs += _configs("fp16", "fp16", False, [768, _FUSED_MAX_BLOCK + 1], has_w=False, has_b=False)
    affine = dict(HAS_W=True, HAS_B=True)
    for n in (768, _FUSED_MAX_BLOCK + 1):  # inference: no statistics
        configs.append(_fwd_config("bf16", "bf16", False, n, _fwd_plan(n, torch.bfloat16), affine,
                                   "bf16/bf16/plain/w1b1", stats=False))
    for t in ("fp16", "bf16"):  # autocast: a half-precision branch added to an fp32 residual stream
        kernel, tile, warps = _fwd_plan(768)
        configs.append(_config(f"{kernel.__name__}/{t}+fp32/add/768", kernel, {"*": "fp32", "X": t},
                               dict(HAS_RESIDUAL=True, **affine, STATS=True, **tile), warps))
    tag = "add/w1b1"  # named like the defaults: no twins
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
    size in programs, from the launch plans the op uses."""
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
            flags = dict(HAS_RESIDUAL=True, HAS_W=True, HAS_B=True, STATS=True)
            grid = cdiv(m, tile["ROWS"]) if kernel is _fwd_rows_kernel else m
            cfg = launch_config(f"{kernel.__name__} {label}", kernel, args, flags | tile, warps)
            cases.append({"label": label, "config": cfg, "grid": grid})
            tile, warps = _bwd_plan(n, dtype)
            col_blocks = cdiv(n, tile["BLOCK_N"])
            groups = _resident_groups(col_blocks, warps, SM_COUNT[cc], cc)
            groups, per_program = bwd_grid(m, tile["ROWS"], groups)
            with sm_count_of(__name__, SM_COUNT[cc]):
                sum_tile = _sum_plan(n, cuda)
            args = dict(X=p, DY=p, DS=p, DX=p, W=p, MEAN=f, RSTD=f, SUMS=f, PART_W=f, PART_B=f,
                        M=m, N=n, stride_x=n, stride_dy=n, stride_ds=n, rows_per_program=per_program)
            flags = dict(HAS_DSUM=True, HAS_W=True, HAS_B=True)
            cfg = launch_config(f"_bwd_kernel {label}", _bwd_kernel, args, flags | tile, warps,
                                tile["NUM_STAGES"])
            cases.append({"label": label, "config": cfg, "grid": groups * col_blocks})
            args = dict(PART_W=f, PART_B=f, DW=p, DB=p, G=groups, N=n)
            cfg = launch_config(f"_sum_partials_kernel {label}", _sum_partials_kernel, args,
                                dict(HAS_W=True, HAS_B=True, **sum_tile), _SUM_WARPS)
            cases.append({"label": label, "config": cfg, "grid": cdiv(n, sum_tile["BLOCK_N"])})
    return cases
