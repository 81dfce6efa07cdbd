"""Launch plans of the Hopper attention variants (``attention_sm90_fwd``, ``attention_sm90_bwd``,
``attention_sm90_bwd1``).

A variant runs only where a plan names it: a device's tuning table (``gptfast.kernels.tuning``)
or ``tuning.use`` (tests, ``bench/experiments/attention_sm90.py``) maps one of the tuning
kernels below and a shape class to a config; without one, ``attention`` keeps its generic
kernels. Each config is a dict of ints: the tile (``block_m`` x ``block_n``), ``num_warps``,
``num_stages``, ``tma`` (1: tensor-descriptor tiles, where the tensors allow them: 16-byte
aligned, unit last stride, 16-byte multiples for the others; else pointer loads),
``programs_per_sm`` (0: one program per tile, heaviest first; n: a persistent grid of n
programs per SM). dK/dV computes its scores keys-major only: a query-major form (the
forward's orientation) raced on sm_90 (see the generic ``_dkdv_tiles``), and the static gate
rejects any config whose pending wgmma reads a pipelined buffer with fewer slots than stages.
The backward takes the one-pass kernel (``bwd1``: its preprocess, then dK, dV and dQ in one
launch, with an fp32 dQ workspace of B * H * T * block_d * 4 bytes) where a plan names it and
dK, dV are wanted; else the pair when plans name both of its kernels: the dQ kernel (which
also computes the preprocess's delta) runs first, then dK/dV.

The variants serve bf16 (the chapter model's training dtype under autocast) with a head dim
that the launch pads to 64 or 128, without per-row lengths; anything else keeps the generic
kernels, as does a backward that needs no dQ (its dK/dV would wait on dQ's delta).
"""

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from gptfast.kernels import tuning
from gptfast.kernels._common import INTERPRETING, plan_capability, plan_sm_count
from gptfast.kernels.attention_sm90_bwd import _bwd_dkdv_sm90_kernel, _bwd_dq_sm90_kernel
from gptfast.kernels.attention_sm90_bwd1 import (
    _bwd1_preprocess_kernel, _bwd1_sm90_kernel,
)
from gptfast.kernels.attention_sm90_fwd import _fwd_sm90_kernel

FWD, DQ, DKDV = "attention_sm90.fwd", "attention_sm90.dq", "attention_sm90.dkdv"
BWD1 = "attention_sm90.bwd1"  # the one-pass backward (attention_sm90_bwd1), tried first
LOG2E = 1.4426950408889634
# The interpreter's own plans (no GPU named): a persistent program loops over several tiles.
_INTERPRETER_SMS = 2

# The tiles each kernel may take per shape class, (block_m, block_n, warps, stages, tma,
# programs per SM); every one compiled by aot_configs() for sm_90 and spill-free. Registers per
# thread and resident programs per SM (triton 3.6): the README's table.
_TILES = {
    FWD: {
        "bf16-d64": [(128, 64, 8, 3, 1, 0), (64, 64, 4, 3, 1, 0), (128, 128, 8, 2, 1, 0),
                     (128, 64, 8, 3, 0, 0), (128, 64, 8, 3, 1, 2)],
        "bf16-d128": [(128, 32, 8, 2, 1, 0), (64, 64, 4, 2, 1, 0), (128, 64, 8, 2, 1, 0),
                      (128, 32, 8, 3, 0, 0)],
        "bf16-d64-dropout": [(64, 64, 4, 3, 1, 0), (128, 64, 8, 3, 1, 0), (128, 64, 8, 3, 0, 0)],
        "bf16-d128-dropout": [(64, 64, 4, 2, 1, 0), (128, 32, 8, 2, 1, 0)],
    },
    DQ: {
        "bf16-d64": [(128, 32, 4, 3, 1, 0), (128, 64, 8, 3, 1, 0), (64, 64, 4, 3, 1, 0)],
        "bf16-d128": [(128, 32, 8, 2, 1, 0), (64, 64, 4, 2, 1, 0)],
        # (128, 32, 4, 3, 1, 0) spilled 8 B under triton 3.9 once the seed came from memory
        "bf16-d64-dropout": [(64, 64, 4, 3, 1, 0)],
        "bf16-d128-dropout": [(128, 32, 8, 2, 1, 0)],
    },
    DKDV: {
        "bf16-d64": [(64, 128, 8, 3, 1, 0), (32, 128, 8, 3, 1, 0), (64, 64, 4, 3, 1, 0),
                     (64, 128, 8, 3, 1, 1)],
        "bf16-d128": [(32, 64, 8, 3, 1, 0), (32, 128, 8, 2, 1, 0)],
        "bf16-d64-dropout": [(32, 128, 8, 3, 1, 0)],
        "bf16-d128-dropout": [(32, 64, 8, 3, 1, 0)],
    },
    # one program per tile only (programs_per_sm 0): its dQ order needs program-id dispatch
    BWD1: {
        "bf16-d64": [(64, 128, 8, 2, 1, 0), (64, 128, 8, 3, 1, 0), (64, 128, 8, 2, 0, 0)],
        "bf16-d128": [(64, 32, 8, 2, 1, 0)],  # 64x64 spilled (triton 3.6)
        "bf16-d64-dropout": [(64, 32, 8, 2, 1, 0), (64, 32, 4, 2, 1, 0)],  # 64x128, 64x64 spilled
        "bf16-d128-dropout": [(64, 32, 8, 2, 1, 0)],
    },
}
_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "tma", "programs_per_sm")
SPACE = {kernel: {cls: [dict(zip(_KEYS, tile)) for tile in tiles] for cls, tiles in classes.items()}
         for kernel, classes in _TILES.items()}
for _kernel, _space in SPACE.items():
    tuning.register(_kernel, _space)


def shape_class(dtype: torch.dtype, block_d: int, dropout: bool) -> str | None:
    """The shape class of a launch ("bf16-d64", "bf16-d128-dropout", ...), None if no variant
    serves it."""
    if dtype != torch.bfloat16 or block_d not in (64, 128):
        return None
    return f"bf16-d{block_d}" + ("-dropout" if dropout else "")


def plan(kernel: str, q: torch.Tensor, block_d: int, dropout: bool, lengths: bool) -> dict | None:
    """The config a plan names for ``kernel`` at this launch, or None (the generic kernels).
    Never on GPUs before sm_90 (the interpreter's own plans run them)."""
    cls = shape_class(q.dtype, block_d, dropout)
    cc = plan_capability(q.device)
    if cls is None or lengths or (cc is not None and cc < 90):
        return None
    return tuning.lookup(kernel, cls, q.device)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can address every (B, H, T, D) tensor: 16-byte aligned base,
    unit last stride, 16-byte multiples for the other strides."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _operands(cfg: dict, block_d: int, tensors: dict[str, tuple[torch.Tensor, int]]) -> tuple[list, bool]:
    """The kernel's tensor arguments: tensor descriptors of (rows x block_d) tiles if the config
    asks for them and every tensor allows them, else the tensors (pointer loads); and TMA."""
    tma = bool(cfg["tma"]) and _tma_ok(*(t for t, _ in tensors.values()))
    if not tma:
        return [t for t, _ in tensors.values()], False
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])
            for t, rows in tensors.values()], True


def _grid(cfg: dict, tiles: int, device: torch.device) -> tuple[int]:
    """One program per tile, or the persistent grid: programs_per_sm per SM (at most one a tile)."""
    if not cfg["programs_per_sm"]:
        return (tiles,)
    sms = plan_sm_count(device) or _INTERPRETER_SMS
    return (min(tiles, sms * cfg["programs_per_sm"]),)


def _launch(fn, cfg, block_d, tensors, stats, tiled_by, scales, causal, seed, dropout_p, **own):
    """Launch a variant kernel with its tensor operands (``tensors``: name -> (tensor, the config
    key of its tile rows), in the kernel's order; descriptors of (rows x block_d) tiles or the
    tensors), the fp32 per-row statistics, every operand's strides, then the scalars all take.
    ``tiled_by``: the tile rows that split the grid, block_m (queries) or block_n (keys);
    ``own``: the kernel's own constexprs."""
    q, k = tensors["q"][0], tensors["k"][0]
    (B, H, Tq, D), Tk = q.shape, k.shape[2]
    operands, tma = _operands(cfg, block_d, {n: (t, cfg[rows]) for n, (t, rows) in tensors.items()})
    tiles = triton.cdiv(Tq if tiled_by == "block_m" else Tk, cfg[tiled_by]) * B * H
    strides = [s for t, _ in tensors.values() for s in t.stride()]
    fn[_grid(cfg, tiles, q.device)](
        *operands, *stats, *strides, B * H, H, Tq, Tk, D, *scales, seed, dropout_p,
        CAUSAL=causal, DROPOUT=dropout_p > 0, EVEN_D=D == block_d, TMA=tma, BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **own,
    )


def forward(cfg, q, k, v, o, lse2, causal, scale, seed, dropout_p, block_d):
    """Fill o and lse2 (base-2 log-sum-exp) as ``attention._forward`` does, with the variant
    ``cfg``; scale > 0 (the caller negates K otherwise)."""
    tensors = {"q": (q, "block_m"), "k": (k, "block_n"), "v": (v, "block_n"), "o": (o, "block_m")}
    _launch(_fwd_sm90_kernel, cfg, block_d, tensors, (lse2,), "block_m", (scale * LOG2E,), causal,
            seed, dropout_p)


def backward(do, q, k, v, o, lse2, dq, dk, dv, causal, scale, seed, dropout_p, block_d,
             lengths) -> bool:
    """Fill dq (and dk, dv unless None): through the one-pass backward if a plan names it (and
    dk, dv are wanted), else the dQ and dK/dV variants if plans name both for this launch; False
    (nothing done: the generic kernels) otherwise. dQ runs first: it writes the delta that
    dK/dV reads."""
    dropout = dropout_p > 0
    one_pass = plan(BWD1, q, block_d, dropout, lengths) if dk is not None else None
    if one_pass is not None:
        backward1(one_pass, do, q, k, v, o, lse2, dq, dk, dv, causal, scale, seed, dropout_p,
                  block_d)
        return True
    dq_cfg = plan(DQ, q, block_d, dropout, lengths)
    dkdv_cfg = plan(DKDV, q, block_d, dropout, lengths)
    if dq_cfg is None or dkdv_cfg is None:
        return False
    delta = torch.empty_like(lse2)
    backward_dq(dq_cfg, do, q, k, v, o, lse2, dq, delta, causal, scale, seed, dropout_p, block_d)
    if dk is not None:
        backward_dkdv(dkdv_cfg, do, q, k, v, lse2, delta, dk, dv, causal, scale, seed, dropout_p,
                      block_d)
    return True


def backward_dq(cfg, do, q, k, v, o, lse2, dq, delta, causal, scale, seed, dropout_p, block_d):
    """Fill dq and delta = rowsum(dO * O) * (1 - p) (what the dK/dV kernels read)."""
    tensors = {"q": (q, "block_m"), "k": (k, "block_n"), "v": (v, "block_n"), "o": (o, "block_m"),
               "do": (do, "block_m"), "dq": (dq, "block_m")}
    _launch(_bwd_dq_sm90_kernel, cfg, block_d, tensors, (lse2, delta), "block_m",
            (scale, scale * LOG2E), causal, seed, dropout_p)


def backward_dkdv(cfg, do, q, k, v, lse2, delta, dk, dv, causal, scale, seed, dropout_p, block_d):
    """Fill dk and dv from delta (times 1 - p) and the forward's lse2."""
    tensors = {"q": (q, "block_m"), "k": (k, "block_n"), "v": (v, "block_n"), "do": (do, "block_m"),
               "dk": (dk, "block_n"), "dv": (dv, "block_n")}
    _launch(_bwd_dkdv_sm90_kernel, cfg, block_d, tensors, (lse2, delta), "block_n",
            (scale, scale * LOG2E), causal, seed, dropout_p)


def backward1(cfg, do, q, k, v, o, lse2, dq, dk, dv, causal, scale, seed, dropout_p, block_d):
    """Fill dq, dk, dv in two launches: the preprocess (delta, the counters reset), then the
    one-pass kernel (dQ added in key-tile order into an fp32 accumulator, see
    ``attention_sm90_bwd1``). Under the interpreter a launch whose programs would have waited on
    a later one raises."""
    if cfg["programs_per_sm"]:
        raise ValueError(f"cfg: the one-pass backward takes one program per tile (programs_per_sm "
                         f"0), not {cfg['programs_per_sm']}: its dQ order relies on dispatch order")
    B, H, Tq, D = q.shape
    n_m = triton.cdiv(Tq, cfg["block_m"])
    delta = torch.empty_like(lse2)
    count = torch.empty((B * H, n_m), dtype=torch.int32, device=q.device)
    acc = torch.empty((B * H, n_m * cfg["block_m"], block_d), dtype=torch.float32, device=q.device)
    _bwd1_preprocess_kernel[(n_m, B * H)](
        o, do, delta, count, *o.stride(), *do.stride(), H, Tq, D, dropout_p, EVEN_D=D == block_d,
        BLOCK_M=cfg["block_m"], BLOCK_D=block_d, num_warps=4)
    tensors = {"q": (q, "block_m"), "k": (k, "block_n"), "v": (v, "block_n"), "do": (do, "block_m"),
               "dk": (dk, "block_n"), "dv": (dv, "block_n")}
    _launch(_bwd1_sm90_kernel, cfg, block_d, tensors, (lse2, delta, acc, count, dq, *dq.stride()),
            "block_n", (scale, scale * LOG2E), causal, seed, dropout_p)
    if INTERPRETING and bool((count < 0).any()):
        raise RuntimeError("attention_sm90 one-pass backward: a key tile's program ran before "
                           "the key tiles it adds its dQ after (it would spin forever on a GPU)")


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation check and static report (gptfast/kernels/testing.py, report.py)
# --------------------------------------------------------------------------------------------

_KERNEL_FNS = {FWD: _fwd_sm90_kernel, DQ: _bwd_dq_sm90_kernel, DKDV: _bwd_dkdv_sm90_kernel,
               BWD1: _bwd1_sm90_kernel}
# each kernel's tile rows per tensor argument (block_m or block_n), for the descriptors' blocks
_ROWS = {"Q": "block_m", "O": "block_m", "DO": "block_m", "DQ": "block_m", "K": "block_n",
         "V": "block_n", "DK": "block_n", "DV": "block_n"}


def _variant(cfg: dict) -> str:
    grid = f"persistent{cfg['programs_per_sm']}" if cfg["programs_per_sm"] else "tiles"
    return (f"{'tma' if cfg['tma'] else 'ptr'} {cfg['block_m']}x{cfg['block_n']} "
            f"w{cfg['num_warps']}s{cfg['num_stages']} {grid}")


def _aot_config(kernel: str, cfg: dict, block_d: int, causal: bool, dropout: bool, heads=12,
                T=1024, name=None) -> dict:
    """The aot config of a launch of ``kernel`` with ``cfg`` on (B, T, H, D)-strided bf16
    tensors seen as (B, H, T, D), the head dim padded to block_d, as the JIT specialises it."""
    fn = _KERNEL_FNS[kernel]
    flags = dict(CAUSAL=causal, DROPOUT=dropout, EVEN_D=True, TMA=bool(cfg["tma"]),
                 BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=block_d)
    signature, constexprs, attrs = {}, dict(flags), {}
    for i, arg in enumerate(fn.arg_names):
        if arg in flags:
            signature[arg] = "constexpr"
        elif arg == "DQ" and kernel == BWD1:  # the one-pass kernel's masked pointer stores
            signature[arg], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
        elif arg in _ROWS:
            rows = cfg[_ROWS[arg]]
            signature[arg] = f"tensordesc<bf16[1, 1, {rows}, {block_d}]>" if cfg["tma"] else "*bf16"
            if not cfg["tma"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in ("LSE2", "Delta", "DQacc", "Count"):
            signature[arg] = "*i32" if arg == "Count" else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "Seed":  # the dropout seed in device memory (a (1,) int64 tensor)
            signature[arg], attrs[(i,)] = "*i64", [["tt.divisibility", 16]]
        elif arg.startswith("stride") and arg.endswith("d"):
            signature[arg], constexprs[arg] = "constexpr", 1
        elif arg.startswith("stride") or arg in ("Tq", "Tk", "D", "BH"):
            signature[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        elif arg in ("qk_scale", "sm_scale", "dropout_p"):
            signature[arg] = "fp32"
        else:  # H
            signature[arg] = "i32"
    name = name or (f"{kernel}-{_variant(cfg).replace(' ', '-')}-d{block_d}-causal{int(causal)}"
                    f"-dropout{int(dropout)}-sm90")
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "attrs": attrs,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "ccs": (90,)}


def _preprocess_aot_config(block_m: int, block_d: int, name=None) -> dict:
    """The aot config of the one-pass backward's preprocess (pointer loads of bf16 O and dO)."""
    fn = _bwd1_preprocess_kernel
    constexprs = dict(EVEN_D=True, BLOCK_M=block_m, BLOCK_D=block_d)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs or (arg.startswith("stride") and arg.endswith("d")):
            signature[arg] = "constexpr"
            constexprs.setdefault(arg, 1)
        elif arg in ("O", "DO", "Delta", "Count"):
            signature[arg] = {"O": "*bf16", "DO": "*bf16", "Delta": "*fp32", "Count": "*i32"}[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg.startswith("stride") or arg in ("Tq", "D"):
            signature[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        else:  # H, dropout_p
            signature[arg] = "fp32" if arg == "dropout_p" else "i32"
    return {"name": name or f"{BWD1}-preprocess-{block_m}-d{block_d}-sm90", "fn": fn,
            "signature": signature, "constexprs": constexprs, "attrs": attrs, "num_warps": 4,
            "num_stages": 1, "ccs": (90,)}


def aot_configs():
    """Every config of the plans' spaces, for sm_90 only (the plans never pick them on older
    GPUs), at its shape class's head dim and dropout, causal, plus each class's first config
    non-causal (the causal code without the diagonal loop, but registers differ)."""
    if INTERPRETING:
        raise RuntimeError("aot_configs() describes GPU launches; call it with TRITON_INTERPRET unset")
    configs = []
    for kernel, classes in SPACE.items():
        for cls, space in classes.items():
            block_d, dropout = int(cls.split("-")[1][1:]), cls.endswith("dropout")
            configs += [_aot_config(kernel, cfg, block_d, True, dropout) for cfg in space]
            configs.append(_aot_config(kernel, space[0], block_d, False, dropout))
    block_ms = {cfg["block_m"] for space in SPACE[BWD1].values() for cfg in space}
    return configs + [_preprocess_aot_config(m, d) for m in sorted(block_ms) for d in (64, 128)]


def report_cases(cc: int = 90):
    """GPT-2 124M's attention at 8 x 1024 tokens (12 heads of 64, causal, bf16), without and
    with dropout 0.1, for every config of the variants' spaces: the static evidence of each
    (sm_90 only: none before)."""
    if INTERPRETING:
        raise RuntimeError("report_cases() describes GPU launches; call it with TRITON_INTERPRET unset")
    if cc < 90:
        return []
    from gptfast.kernels._common import SM_COUNTS

    B, H, T = 8, 12, 1024
    cases = []
    for kernel, classes in SPACE.items():
        for cls in ("bf16-d64", "bf16-d64-dropout"):
            dropout = cls.endswith("dropout")
            for cfg in classes[cls]:
                label = f"124M B{B} T{T} bf16{' p=0.1' if dropout else ''} {_variant(cfg)}"
                rows = cfg["block_n" if kernel in (DKDV, BWD1) else "block_m"]
                tiles = triton.cdiv(T, rows) * B * H
                grid = min(tiles, SM_COUNTS[cc] * cfg["programs_per_sm"]) if cfg["programs_per_sm"] else tiles
                cases.append({"label": label, "grid": grid,
                              "config": _aot_config(kernel, cfg, 64, True, dropout, H, T,
                                                    name=f"{kernel} {label}")})
    for block_m in sorted({cfg["block_m"] for cfg in SPACE[BWD1]["bf16-d64"]}):
        label = f"124M B{B} T{T} bf16 {block_m} rows"
        cases.append({"label": label, "grid": triton.cdiv(T, block_m) * B * H,
                      "config": _preprocess_aot_config(block_m, 64, f"{BWD1} preprocess {label}")})
    return cases
