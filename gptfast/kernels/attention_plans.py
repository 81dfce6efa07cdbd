"""Launch plans of the flash-attention kernels: tiles, warps and stages per kernel, dtype and
head-dim block and GPU generation (and the interpreter's own), read from the device's tuning table
where it has one; the space bench/tune.py sweeps; the configs the static gate compiles
(``aot_configs``) and the launches the static report shows (``report_cases``).
"""

import torch
import triton

from gptfast.kernels import tuning
from gptfast.kernels._common import INTERPRETING, Launch, next_power_of_2, plan_capability
from gptfast.kernels.attention_kernels import (
    _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel, _dropout_mask_kernel, _fwd_kernel,
)

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Launch heuristics
# --------------------------------------------------------------------------------------------


# The kernels' names in the tuning tables
FWD_KERNEL, DKDV_KERNEL, DQ_KERNEL = "attention.fwd", "attention.dkdv", "attention.dq"


def _shape_class(dtype: torch.dtype, block_d: int, dropout: bool) -> str:
    """The tuning tables' shape class of a launch, e.g. "bf16-d64" or "bf16-d64-dropout"."""
    return f"{_TRITON_DTYPE[dtype]}-d{block_d}" + ("-dropout" if dropout else "")


def _tuned(kernel: str, block_d: int, dtype: torch.dtype, dropout: bool, device) -> Launch | None:
    """The device's tuning-table launch of ``kernel`` at this shape class, or None."""
    config = tuning.lookup(kernel, _shape_class(dtype, block_d, dropout), device)
    return None if config is None else Launch(**config)


def _fwd_launch(block_d: int, dtype: torch.dtype, dropout: bool = False, device=None) -> Launch:
    """Forward tiles: the device's tuning table's, else 128 queries x 64 keys for fp16/bf16
    (FlashAttention-2's shape), 128 x 32 at D=128 (x 64 spills on sm_80), with 8 warps (two
    warpgroups of 64 rows on sm_90): with 4, sm_80's mma.sync accumulators need 255 registers
    and spill. fp32 at D=128: 16 x 32 with 8 warps, 32 x 32 with dropout."""
    if tuned := _tuned(FWD_KERNEL, block_d, dtype, dropout, device):
        return tuned
    if plan_capability(device) is None:  # the interpreter's: little numpy work per program
        return Launch(32, 32, 4, 1)
    if dtype == torch.float32:  # exact fp32 products run on FMA units: small tiles
        if block_d == 128:  # 32 x 32 spills on sm_90, and 16 x 32 does with dropout
            return Launch(32 if dropout else 16, 32, 8, 2)
        return Launch(32, 32, 4, 2)
    return Launch(128, 32 if block_d == 128 else 64, 8, 3)


def _dkdv_launch(block_d: int, dtype: torch.dtype, dropout: bool = False, cc: int | None = 90,
                 device=None) -> Launch:
    """dK/dV tiles: a wide key tile (BLOCK_N) held in registers, thin query tiles streamed; the
    device's tuning table's without dropout, else 8 warps, 64 keys at D=128 (128 spill on sm_80
    under triton 3.6). With dropout (not tuned: the plan depends on the GPU): on sm_80 16-query
    tiles (the RNG's registers: 32 queries spill under triton 3.6); on sm_90 32 x 128 (16 x 128
    at D=128) in 2 stages: 1.97x the dropout-free kernel's SASS per score at D=64 (3 stages:
    2.04x), no spills. Its Q/dO buffers have 2 slots for a prefetch distance of 1, and its
    wgmma products are waited for in the iteration that issues them (the 3-stage query-major
    form that ran on the H200 refilled a slot under a pending wgmma: dK 10x outside the rule).
    """
    if not dropout and (tuned := _tuned(DKDV_KERNEL, block_d, dtype, dropout, device)):
        return tuned
    if cc is None:  # the interpreter's own
        return Launch(16, 32, 4, 1)
    if dtype == torch.float32:
        return Launch(32, 32, 8 if block_d == 128 else 4, 2)  # 4 warps spill at D=128 (3.6)
    if dropout and cc >= 90:
        return Launch(16 if block_d == 128 else 32, 128, 8, 2)
    if dropout:
        return Launch(16, 64 if block_d == 128 else 128, 8, 3)
    return Launch(32, 64 if block_d == 128 else 128, 8, 3)  # 4 warps spill at D=64


def _dq_launch(block_d: int, dtype: torch.dtype, dropout: bool = False, device=None) -> Launch:
    """dQ tiles: a tall query tile (BLOCK_M) held in registers, thin key tiles streamed; the
    device's tuning table's, else 8 warps at D=128 (4 spill on sm_80), 4 elsewhere (with
    dropout too: 1.9x the dropout-free SASS per score on sm_90, where 8 warps cost 2.3x)."""
    if tuned := _tuned(DQ_KERNEL, block_d, dtype, dropout, device):
        return tuned
    if plan_capability(device) is None:  # the interpreter's own
        return Launch(32, 32, 4, 1)
    if dtype == torch.float32:
        return Launch(16, 32, 4, 2)  # 32 x 32 spills on sm_80 (4 warps at D=64/128, 8 at D=32)
    return Launch(128, 32, 8 if block_d == 128 else 4, 3)


def _preprocess_launch(device=None) -> Launch:
    return Launch(32 if plan_capability(device) is None else 64, 0, 4, 1)


# Launches a tuning table may pick (bench/tune.py sweeps them), per kernel and shape class, each
# one compiled by aot_configs() and spill-free on sm_80 and sm_90: GPT-2's bf16 at D=64.
_TILES = {
    FWD_KERNEL: {"bf16-d64": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 3)],
                 "bf16-d64-dropout": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)]},
    DKDV_KERNEL: {"bf16-d64": [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3)]},  # 64 x 64 spills
    DQ_KERNEL: {cls: [(128, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)]
                for cls in ("bf16-d64", "bf16-d64-dropout")},
}
TUNING_SPACE = {kernel: {cls: [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
                               for m, n, w, st in tiles] for cls, tiles in classes.items()}
                for kernel, classes in _TILES.items()}
for _kernel, _space in TUNING_SPACE.items():
    tuning.register(_kernel, _space)


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _dq_writes_delta(dtype: torch.dtype) -> bool:
    """Whether the dQ kernel computes delta itself (no preprocess launch): with fp16/bf16. fp32's
    dQ tiles are 16 queries of exact FMA products, and the delta's loads and cross-lane sum made
    sm_80's D=32 tile spill (4 bytes, triton 3.6 and 3.9): fp32 keeps the preprocess kernel."""
    return dtype != torch.float32


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation check (gptfast/kernels/testing.py)
# --------------------------------------------------------------------------------------------

_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p", "delta_scale"}
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = "*" + _TRITON_DTYPE[dtype]
        elif name in ("LSE2", "Delta"):
            sig[name] = "*fp32"
        elif name == "Mask":
            sig[name] = "*i8"
        elif name in ("QL", "KL"):
            sig[name] = "*i32"
        elif name == "Seed":
            sig[name] = "*i64"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisibility(fn, signature: dict) -> dict:
    """The divisibility hints the JIT gives a typical launch (16-byte aligned tensors, strides
    and head dim multiples of 16; sequence lengths not), as ``ASTSource`` attrs. Without them
    the compiler cannot prove alignment and skips the pipelined (cp.async / TMA) loads, and
    the shared memory it reports understates real launches."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (signature[name] == "i32" and (name.startswith("stride") or name == "D"))
    }


def aot_configs():
    """Every tile/warp/stage config the GPU heuristics can pick, for a compile check.

    The heuristics pick one tile config per (kernel, dtype, BLOCK_D); every one of them is
    listed, for BLOCK_D 16, 32, 64 and 128 and fp16, bf16, fp32, compiled as launches with a
    contiguous head dim are (Triton specializes strides equal to 1). The flags (CAUSAL,
    DROPOUT, EVEN_D, and the length flags HAS_QL, HAS_KL, LEFT) only add register-level
    masking, window and RNG code and do not change shared
    memory (checked on D=64: equal with all flags on and off), so they are rotated over the
    head-dim buckets instead of multiplied in: CAUSAL and EVEN_D take both values for every
    (kernel, dtype). Dropout (Philox, most of the compile time) is compiled once per kernel,
    on the GPT-2 training path (fp16, causal, D=64), where both the masked and the unmasked
    loops carry it: its integer/fp32 code depends on neither the dtype nor BLOCK_D. One more
    variant per kernel has Tq = Tk = H = 1, which Triton also specializes (T=1 decoding).
    (The full product would take ~10 minutes to compile.)
    """
    if INTERPRETING:
        raise RuntimeError("aot_configs() describes GPU launches; call it with TRITON_INTERPRET unset")
    # BLOCK_D -> (CAUSAL, DROPOUT, EVEN_D, (HAS_QL, HAS_KL, LEFT)); BLOCK_D=16 is always even
    # (head_dim >= 16). The lengths only add scalar window code and masks.
    no_lens, right_both, left_keys = (False, False, False), (True, True, False), (False, True, True)
    rotation = {16: (False, False, True, no_lens), 32: (True, False, False, right_both),
                64: (True, True, True, no_lens), 128: (False, False, False, left_keys)}
    configs = []

    def add(name, fn, dtype, launch, constexprs, ccs=None):
        unit_strides = {a: 1 for a in fn.arg_names if a.startswith("stride") and a.endswith("d")}
        constexprs = {**unit_strides, **constexprs}
        signature = _signature(fn, dtype, constexprs)
        configs.append({
            "name": name, "fn": fn, "signature": signature, "attrs": _divisibility(fn, signature),
            "constexprs": constexprs, "num_warps": launch.num_warps, "num_stages": launch.num_stages,
            **({"ccs": ccs} if ccs else {}),
        })

    def attention_kernels(dtype, block_d, dropout=False):
        """(name, kernel, launch, its own constexprs, the ccs it is picked on or None for all,
        their name suffix)."""
        kernels = [("fwd", _fwd_kernel, _fwd_launch(block_d, dtype, dropout), {}, None),
                   ("dq", _bwd_dq_kernel, _dq_launch(block_d, dtype, dropout),
                    {"DELTA": _dq_writes_delta(dtype)}, None)]
        dkdv = {cc: _dkdv_launch(block_d, dtype, dropout, cc) for cc in (80, 90)}
        shared = dkdv[80] == dkdv[90]
        for cc in (90,) if shared else (80, 90):
            kernels.append(("dkdv", _bwd_dkdv_kernel, dkdv[cc], {}, None if shared else (cc,)))
        return [(*kernel, "".join(f"-sm{cc}" for cc in kernel[-1] or ())) for kernel in kernels]

    def flags(launch, block_d, causal, dropout, even_d, lens=no_lens):
        has_ql, has_kl, left = lens
        return dict(CAUSAL=causal, DROPOUT=dropout, EVEN_D=even_d, HAS_QL=has_ql, HAS_KL=has_kl,
                    LEFT=left, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=block_d)

    for dtype, tname in _TRITON_DTYPE.items():
        for block_d, (causal, dropout, even_d, lens) in rotation.items():
            dropout = dropout and dtype == torch.float16
            for kname, fn, launch, own, ccs, on in attention_kernels(dtype, block_d, dropout):
                add(f"{kname}-{tname}-d{block_d}-{launch.block_m}x{launch.block_n}"
                    f"-w{launch.num_warps}s{launch.num_stages}"
                    f"-causal{int(causal)}-dropout{int(dropout)}-even{int(even_d)}"
                    f"-lens{''.join(str(int(f)) for f in lens)}{on}",
                    fn, dtype, launch, flags(launch, block_d, causal, dropout, even_d, lens) | own,
                    ccs)
            pre = _preprocess_launch()
            add(f"preprocess-{tname}-d{block_d}-even{int(even_d)}", _bwd_preprocess_kernel, dtype, pre,
                dict(EVEN_D=even_d, BLOCK_M=pre.block_m, BLOCK_D=block_d))
    # dropout's tiles at the head dims the rotation lacks, and fp32's at D=128
    for dtype, block_d in ((torch.float16, 16), (torch.float16, 32), (torch.float16, 128),
                           (torch.float32, 128)):
        for kname, fn, launch, own, ccs, on in attention_kernels(dtype, block_d, dropout=True):
            add(f"{kname}-{_TRITON_DTYPE[dtype]}-d{block_d}-{launch.block_m}x{launch.block_n}"
                f"-w{launch.num_warps}s{launch.num_stages}-causal1-dropout1-even1-lens000{on}",
                fn, dtype, launch, flags(launch, block_d, True, True, True) | own, ccs)
    for kname, fn, launch, own, ccs, on in attention_kernels(torch.float16, 64):
        add(f"{kname}-fp16-d64-length1-head1{on}", fn, torch.float16, launch,
            flags(launch, 64, True, False, True) | own | dict(Tq=1, Tk=1, H=1), ccs)
    kernel_fns = {FWD_KERNEL: _fwd_kernel, DKDV_KERNEL: _bwd_dkdv_kernel, DQ_KERNEL: _bwd_dq_kernel}
    for kernel, classes in TUNING_SPACE.items():  # what a tuning table may pick
        for cls, space in classes.items():
            tname, d, *dropout = cls.split("-")
            dtype, block_d = {v: k for k, v in _TRITON_DTYPE.items()}[tname], int(d[1:])
            for config in space:
                launch = Launch(**config)
                own = {"DELTA": _dq_writes_delta(dtype)} if kernel == DQ_KERNEL else {}
                add(f"tuning-{kernel}-{cls}-{launch.block_m}x{launch.block_n}-w{launch.num_warps}"
                    f"s{launch.num_stages}", kernel_fns[kernel], dtype, launch,
                    flags(launch, block_d, True, bool(dropout), True) | own)
    add("dropout_mask", _dropout_mask_kernel, torch.float16, Launch(32, 32, 4, 1),
        dict(BLOCK_M=32, BLOCK_N=32))
    from gptfast.kernels.testing import config_key

    unique = {}  # each compiled code once, under its first name
    for cfg in configs:
        unique.setdefault(config_key(cfg), cfg)
    return list(unique.values())


def report_cases(cc: int = 90):
    """GPT-2's attention launches at 8 x 1024 tokens (head dim 64, causal), for the static report
    (gptfast/kernels/report.py): 124M (12 heads) and 1558M (25 heads), fp32 and bf16, without and with
    dropout 0.1. Per launch a label, its aot config (specialised as the JIT specialises the
    model's call: q/k/v are (B, T, H, D) memory seen as (B, H, T, D)) and its grid size in
    programs, from the launch plans the op uses on a GPU of compute capability ``cc``."""
    from gptfast.kernels.testing import launch_config

    if INTERPRETING:
        raise RuntimeError("report_cases() describes GPU launches; call it with TRITON_INTERPRET unset")
    B, T, D = 8, 1024, 64
    block_d = _block_d(D)
    cases = []
    for model, H in (("124M", 12), ("1558M", 25)):
        for dtype in (torch.float32, torch.bfloat16):
            t = "*" + _TRITON_DTYPE[dtype]
            qkv = (T * H * D, D, H * D, 1)  # every tensor: (B, T, H, D) memory seen as (B, H, T, D)
            lens = ("*i32", "*i32")  # the absent lengths' stand-ins
            for p in (0.0, 0.1):
                label = f"{model} B{B} T{T} {_TRITON_DTYPE[dtype]}" + (f" p={p}" if p else "")
                flags = dict(CAUSAL=True, DROPOUT=p > 0, EVEN_D=D == block_d, HAS_QL=False,
                             HAS_KL=False, LEFT=False, BLOCK_D=block_d)
                scale = (D ** -0.5) * LOG2E
                launches = [
                    (_fwd_kernel, _fwd_launch(block_d, dtype, p > 0), "block_m",
                     (t, t, t, t, "*fp32", *lens, "*i64", *qkv * 4, H, T, T, D, scale, p)),
                    (_bwd_dkdv_kernel, _dkdv_launch(block_d, dtype, p > 0, cc), "block_n",
                     (t, t, t, t, "*fp32", "*fp32", t, t, *lens, "*i64", *qkv * 6,
                      H, T, T, D, D ** -0.5, scale, p)),
                    (_bwd_dq_kernel, _dq_launch(block_d, dtype, p > 0), "block_m",
                     (t, t, t, t, t, "*fp32", "*fp32", t, *lens, "*i64", *qkv * 6,
                      H, T, T, D, D ** -0.5, scale, p)),
                ]
                for fn, launch, rows, values in launches:
                    own = dict(BLOCK_M=launch.block_m, BLOCK_N=launch.block_n)
                    if fn is _bwd_dq_kernel:
                        own["DELTA"] = _dq_writes_delta(dtype)
                    cfg = launch_config(f"{fn.__name__} {label}", fn, dict(zip(fn.arg_names, values)),
                                        flags | own, launch.num_warps, launch.num_stages)
                    cases.append({"label": label, "config": cfg,
                                  "grid": triton.cdiv(T, getattr(launch, rows)) * B * H})
            pre = _preprocess_launch()
            values = (t, t, "*fp32", *qkv * 2, H, T, D, 1.0)
            fn = _bwd_preprocess_kernel
            cfg = launch_config(f"{fn.__name__} {model} {_TRITON_DTYPE[dtype]}", fn,
                                dict(zip(fn.arg_names, values)),
                                dict(EVEN_D=D == block_d, BLOCK_M=pre.block_m, BLOCK_D=block_d),
                                pre.num_warps)
            cases.append({"label": f"{model} B{B} T{T} {_TRITON_DTYPE[dtype]}", "config": cfg,
                          "grid": triton.cdiv(T, pre.block_m) * B * H})
    return cases
