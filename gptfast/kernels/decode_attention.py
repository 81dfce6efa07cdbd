"""Decode attention over a KV cache (flash-decoding) in Triton: a few new queries, many cached keys.

``decode_attention(q, k_cache, v_cache, cache_len, scale)`` computes, for each batch row b and
head h, ``softmax(q @ k^T * scale + mask) @ v`` over the first ``cache_len[b]`` positions of
the pre-allocated cache buffers. The Tq queries are the LAST Tq valid positions (already
appended to the cache), so query i attends keys j < cache_len - Tq + i + 1: the causal mask
aligned to the bottom-right corner, as in ``gptfast.kernels.attention.attention(causal=True)``.
Positions at and beyond ``cache_len[b]`` are never read, so the unused tail of the buffers may
hold anything (stale values, NaN).

Flash-decoding: with one query per (batch, head), the classic one-program-per-head grid leaves
most SMs idle. The keys are split into ``num_splits`` contiguous chunks, one program per
(batch*head, chunk, query block), each writing an unnormalised partial output with its own
running max and sum (fp32); a second small kernel merges the chunks with the log-sum-exp rule.
The split plan gives every SM a program while batch*heads is below the SM count (see
``_chunk_tiles``), and depends on shapes only. When one chunk suffices (many heads, short
cache), the first kernel normalises and writes the output directly and the merge is skipped.
Launch tiles may come from the device's tuning table (gptfast/kernels/tuning.py). More than 16
queries run as several 16-query blocks, each reading the keys it sees (for a long prompt,
``gptfast.kernels.attention.attention`` is the tool).

Numerics: scores, the online softmax, the partial outputs and the merge are fp32. One query
(Tq == 1) uses fp32 elementwise products and sums (no tensor cores: 1-row matrix products
would waste them); several queries use ``tl.dot`` on a query block padded to 16 rows, with
operands in the input dtype (fp32 inputs: exact "ieee" fp32 products, no TF32).

Inference only: there is no backward. Calling it with grad mode on and an input that requires
grad is an error (use ``gptfast.kernels.attention.attention`` to train).
"""

import math
import numbers
from dataclasses import dataclass

import torch
import triton

from gptfast.kernels import tuning
from gptfast.kernels._common import (
    INTERPRETING, Kernel, Launch, cdiv, check_device, check_float, host_readable, library_op,
    next_power_of_2, on_device, plan_cache, plan_capability, plan_sm_count,
)
from gptfast.kernels.decode_attention_kernels import _merge_kernel, _split_kernel

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
LOG2E = 1.4426950408889634

MAX_SPLITS = 128  # most key chunks per (batch, head) that the heuristic picks
_PROGRAMS_PER_SM = 4  # split until about this many programs per SM ...
_MIN_CHUNK_TILES = 2  # ... but give each chunk at least this many key tiles
_INTERPRETER_SPLITS = 3  # CPU interpreter: a few chunks, so that the merge is always exercised
_MERGE_BLOCK_S = 16  # chunks merged per step of the merge kernel


# --------------------------------------------------------------------------------------------
# Launch heuristics
# --------------------------------------------------------------------------------------------


SPLIT_KERNEL = "decode_attention.split"  # its name in the per-device tuning tables
DEFAULT_SM_COUNT = 132  # an H100/H200 (SXM): what plans assume on a machine without a GPU


def _shape_class(dtype: torch.dtype, block_d: int, block_m: int) -> str:
    """The tuning tables' shape class of a split launch, e.g. "bf16-d64-q1"."""
    return f"{_TRITON_DTYPE[dtype]}-d{block_d}-q{block_m}"


def _split_launch(q_len: int, block_d: int = 64, dtype: torch.dtype = torch.float16,
                  device: torch.device | None = None) -> Launch:
    """The split kernel's tiles: the device's tuning table if it has this shape class, else
    the static choice. One query: a 1-row block (elementwise math) over 32-key tiles (16 keys
    at BLOCK_D=128: at most 2048 elements, 16 per thread) in 3 cp.async stages. More queries:
    16-row blocks (tl.dot's minimum) over 64-key tiles in 2 stages; fp32's exact FMA dot
    spills there, so it takes 32 keys (16 at BLOCK_D=128). No spills on sm_80/sm_90 under
    triton 3.6 and 3.9."""
    block_m = 1 if q_len == 1 else 16
    tuned = tuning.lookup(SPLIT_KERNEL, _shape_class(dtype, block_d, block_m), device)
    if tuned is not None:
        return Launch(block_m, tuned["block_n"], tuned["num_warps"], tuned["num_stages"])
    if plan_capability(device) is None:  # the interpreter's: small caches span several tiles
        return Launch(block_m, 16, 4, 1)
    if block_m == 1:
        return Launch(1, 16 if block_d == 128 else 32, 4, 3)
    if dtype == torch.float32:
        return Launch(16, 16 if block_d == 128 else 32, 4, 2)
    return Launch(16, 64, 4, 2)


# Launches a tuning table may pick (bench/tune.py sweeps them): (block_n, num_warps,
# num_stages) per shape class, each one compiled by aot_configs(). GPT-2's decode: D=64, bf16.
TUNING_SPACE = {
    "bf16-d64-q1": [dict(block_n=n, num_warps=w, num_stages=s) for n, w, s in (
        (16, 4, 3), (32, 4, 2), (32, 4, 3), (32, 4, 4), (32, 8, 3), (64, 4, 3), (64, 8, 3),
    )],
}
tuning.register(SPLIT_KERNEL, TUNING_SPACE)

_MERGE_LAUNCH = Launch(1, 0, 4, 1)


@dataclass(frozen=True)
class _Plan:
    launch: Launch
    num_splits: int
    chunk: int  # keys per split, a whole number of key tiles


def _sm_count(device: torch.device | None) -> int:
    """SMs of a CUDA device; else those of the planned GPU (DEFAULT_SM_COUNT: sm_90's)."""
    return plan_sm_count(device) or DEFAULT_SM_COUNT


def _chunk_tiles(programs: int, tiles: int, sms: int) -> int:
    """Key tiles per chunk for ``programs`` (batch*head, query block) rows of ``tiles`` tiles.

    About _PROGRAMS_PER_SM programs per SM with chunks of at least _MIN_CHUNK_TILES tiles; but
    while fewer programs than SMs would result, chunks shrink down to one tile until every SM
    gets one (batch-1 decode: 12 heads x 1024 keys -> 192 programs on 132 SMs); at most
    MAX_SPLITS chunks. Rounded down to whole tiles, so that at least the wanted count results.
    """
    splits = min(cdiv(_PROGRAMS_PER_SM * sms, programs), tiles // _MIN_CHUNK_TILES)
    splits = max(splits, min(cdiv(sms, programs), tiles), 1)
    return max(tiles // min(splits, MAX_SPLITS), cdiv(tiles, MAX_SPLITS))


def _plan(
    batch_heads: int, q_len: int, max_len: int, device: torch.device | None,
    num_splits: int | None = None, *, block_d: int = 64, dtype: torch.dtype = torch.float16,
) -> _Plan:
    """How to split the keys [0, max_len) of each (batch, head) across programs.

    Default: ``_chunk_tiles`` with the device's SM count (the planned GPU's off CUDA); under
    the interpreter's own plans: _INTERPRETER_SPLITS chunks. ``num_splits`` overrides the count; chunks
    are rounded up to whole key tiles, so fewer may result. The plan depends only on shapes,
    never on the lengths' values, so a captured CUDA graph replays it for every length.
    """
    launch = _split_launch(q_len, block_d, dtype, device)
    tiles = cdiv(max_len, launch.block_n)
    if num_splits is None and plan_capability(device) is not None:
        programs = batch_heads * cdiv(q_len, launch.block_m)
        chunk_tiles = _chunk_tiles(programs, tiles, _sm_count(device))
    else:
        chunk_tiles = cdiv(tiles, min(num_splits or _INTERPRETER_SPLITS, tiles))
    chunk = chunk_tiles * launch.block_n
    return _Plan(launch, cdiv(max_len, chunk), chunk)


_SPLIT, _MERGE = Kernel(_split_kernel), Kernel(_merge_kernel)


@plan_cache
def _launches(device, dtype, B, H, Tq, D, max_len, per_row, num_splits, append):
    """(plan, split config, its grid, merge config or None) of one call's shapes."""
    block_d = max(16, next_power_of_2(D))
    plan = _plan(B * H, Tq, max_len, device, num_splits, block_d=block_d, dtype=dtype)
    cfg, direct = plan.launch, plan.num_splits == 1
    split = _SPLIT.config(PER_ROW=per_row, DIRECT=direct, APPEND=append, BLOCK_M=cfg.block_m,
                          BLOCK_N=cfg.block_n, BLOCK_D=block_d, NUM_STAGES=cfg.num_stages,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    merge = None if direct else _MERGE.config(BLOCK_S=_MERGE_BLOCK_S, BLOCK_D=block_d,
                                              num_warps=_MERGE_LAUNCH.num_warps,
                                              num_stages=_MERGE_LAUNCH.num_stages)
    return plan, split, (B * H, plan.num_splits, cdiv(Tq, cfg.block_m)), merge


def _decode(q, k_cache, v_cache, lens, max_len, scale, num_splits, k_new=None, v_new=None):
    """Launch the kernels; lens: per-row lengths (int32, on q's device) or None for max_len;
    k_new, v_new: the last position's keys and values, to append (or None: cached already)."""
    B, H, Tq, D = q.shape
    o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    append = k_new is not None
    plan, split, grid, merge = _launches(q.device, q.dtype, B, H, Tq, D, max_len,
                                         lens is not None, num_splits, append)
    S = plan.num_splits
    if merge is None:  # one chunk: the partial buffers are not used, the output stands in
        acc = m = l = o
    else:
        acc = torch.empty((B * H * Tq, S, D), device=q.device, dtype=torch.float32)
        m = torch.empty((B * H * Tq, S), device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
    kn, vn = (k_new, v_new) if append else (q, q)  # q stands in: APPEND off, never read
    _SPLIT(split, grid, (q, k_cache, v_cache, o, acc, m, l, o if lens is None else lens, kn, vn),
           (*q.stride(), *k_cache.stride(), *v_cache.stride(), kn.stride(0), kn.stride(1),
            kn.stride(3), vn.stride(0), vn.stride(1), vn.stride(3), H, Tq, D, max_len, plan.chunk,
            S, scale * LOG2E))
    if merge is not None:
        _MERGE(merge, (B * H * Tq,), (acc, m, l, o), (D, S))
    return o


# gptfast::decode_attention, the op torch.compile sees (see gptfast/kernels/__init__.py): validated
# input; lens and max_len as _check_lengths returns them. No autograd (inference only).
def _decode_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    lens: torch.Tensor | None, max_len: int, scale: float,
                    num_splits: int | None) -> torch.Tensor:
    with on_device(q.device):
        return _decode(q, k_cache, v_cache, lens, max_len, scale, num_splits)


def _decode_fake(q, k_cache, v_cache, lens, max_len, scale, num_splits, *_):
    return q.new_empty(q.shape)


def _append_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    lens: torch.Tensor | None, max_len: int, scale: float,
                    num_splits: int | None, k_new: torch.Tensor, v_new: torch.Tensor
                    ) -> torch.Tensor:
    with on_device(q.device):
        return _decode(q, k_cache, v_cache, lens, max_len, scale, num_splits, k_new, v_new)


_decode_op = library_op("decode_attention", _decode_forward, _decode_fake)
# The same with k_new/v_new: it writes them into the caches, which the op declares.
_append_op = library_op("decode_attention_append", _append_forward, _decode_fake,
                        mutates_args=("k_cache", "v_cache"))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

_OP = "decode_attention"


def _check_tensors(q, k_cache, v_cache) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{_OP}: {name} must be 4-D (batch, heads, seq_len, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
    check_device(_OP, q=q, k_cache=k_cache, v_cache=v_cache)
    check_float(_OP, q=q, k_cache=k_cache, v_cache=v_cache)
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(
            f"{_OP}: q, k_cache, v_cache must share one dtype, got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{_OP}: k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    (B, H, _, D) = q.shape
    if (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (B, H, D):
        raise ValueError(
            f"{_OP}: q {tuple(q.shape)} and the caches {tuple(k_cache.shape)} must agree in batch, "
            "heads and head_dim (layout (batch, heads, seq_len, head_dim))"
        )
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {D}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError(
            f"{_OP} is inference-only (no backward): call it under torch.no_grad() or "
            "torch.inference_mode(), or use kernels.attention.attention to train"
        )


def _check_new(q, k_cache, k_new, v_new) -> None:
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor (give k_new and v_new "
                            f"together, or neither), got {type(t).__name__}")
        if t.shape != q.shape or t.dtype != k_cache.dtype or t.device != q.device:
            raise ValueError(f"{_OP}: {name} must have q's shape {tuple(q.shape)}, the caches' "
                             f"dtype and q's device, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if q.shape[2] != 1:
        raise ValueError(f"{_OP}: k_new/v_new append one position: q must have one query "
                         f"(Tq == 1), got {q.shape[2]}")
    if torch.is_grad_enabled() and (k_new.requires_grad or v_new.requires_grad):
        raise RuntimeError(f"{_OP} is inference-only (no backward): call it under "
                           "torch.no_grad() or torch.inference_mode()")


def _check_lengths(cache_len, q: torch.Tensor, t_max: int):
    """Validate cache_len; returns (per-row lengths on q's device or None, the longest length)."""
    B, _, Tq, _ = q.shape
    if isinstance(cache_len, torch.Tensor):
        if cache_len.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_OP}: a cache_len tensor must be int32 or int64, got {cache_len.dtype}")
        if cache_len.shape != (B,):
            raise ValueError(
                f"{_OP}: a cache_len tensor must have shape (batch,) = ({B},), got {tuple(cache_len.shape)}"
            )
        if cache_len.device.type != "cpu" and cache_len.device != q.device:
            raise ValueError(
                f"{_OP}: cache_len must be on the CPU or on q's device {q.device}, got {cache_len.device}"
            )
        if B == 0:
            return None, 0
        if not host_readable(cache_len):
            # Reading the values would sync the host with the GPU (and break CUDA-graph capture):
            # trust them, and plan the key split over the whole cache.
            return cache_len.to(torch.int32), t_max
        if torch.compiler.is_compiling():  # reading them would break the graph: trust them too
            return cache_len.to(device=q.device, dtype=torch.int32), t_max
        lo, hi = (int(x) for x in torch.aminmax(cache_len))
        # a private copy: the caller may change theirs at once
        lens = cache_len.to(torch.int32, copy=True).to(device=q.device, non_blocking=True)
        shortest, longest = "min(cache_len)", "max(cache_len)"
    elif isinstance(cache_len, numbers.Integral) and not isinstance(cache_len, bool):
        lo = hi = int(cache_len)
        lens = None
        shortest = longest = "cache_len"
    else:
        raise TypeError(
            f"{_OP}: cache_len must be an int or an int tensor of shape (batch,), got {cache_len!r}"
        )
    if lo < 1:
        raise ValueError(f"{_OP}: {shortest} must be >= 1 (the queries are part of the cache), got {lo}")
    if hi > t_max:
        raise ValueError(
            f"{_OP}: {longest} must be <= the cache size (k_cache.shape[2] = {t_max}), got {hi}"
        )
    if Tq > lo:
        raise ValueError(
            f"{_OP}: {Tq} queries but {shortest} is {lo}: the queries are the last Tq cached "
            "positions, so cache_len must be >= Tq"
        )
    return lens, hi


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: int | torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the last Tq cached positions over a KV cache (flash-decoding), inference only.

    q: (batch, heads, Tq, head_dim); k_cache, v_cache: (batch, heads, T_max, head_dim) buffers,
    any strides (e.g. slices of a bigger buffer); fp32, fp16 or bf16 (one dtype);
    16 <= head_dim <= 128. Returns a contiguous (batch, heads, Tq, head_dim) tensor in q's dtype.

    ``cache_len``: valid cached positions, an int (all rows) or an int32/int64 tensor of shape
    (batch,) with one length per row, on the CPU (validated) or on q's device (not validated:
    reading it would sync the host, so a GPU tensor keeps the call free of syncs and safe to
    capture in a CUDA graph; its values are the caller's promise; the same holds for a CPU
    tensor under torch.compile, where reading it would break the graph). Query i of row b
    attends keys j < cache_len[b] - Tq + i + 1; 1 <= Tq <= cache_len[b] <= T_max is required.
    ``scale`` defaults to 1/sqrt(head_dim). ``num_splits`` overrides the number of key chunks
    (for tests and tuning; chunks are whole key tiles, so fewer may be used).

    ``k_new``, ``v_new`` (one query, Tq == 1): the keys and values of the last position,
    (batch, heads, 1, head_dim), any strides; the kernel attends them directly and writes them
    into the caches at position cache_len[b] - 1 (whose old contents it never reads): a decode
    step's append and attention in one launch.
    """
    _check_tensors(q, k_cache, v_cache)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{_OP}: scale must be a finite number or None, got {scale!r}")
    if num_splits is not None and (
        not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool) or num_splits < 1
    ):
        raise ValueError(f"{_OP}: num_splits must be a positive int or None, got {num_splits!r}")
    num_splits = None if num_splits is None else int(num_splits)  # numpy integers too
    lens, max_len = _check_lengths(cache_len, q, k_cache.shape[2])
    if k_new is None and v_new is None:
        return _decode_op(q, k_cache, v_cache, lens, max_len, float(scale), num_splits)
    _check_new(q, k_cache, k_new, v_new)
    return _append_op(q, k_cache, v_cache, lens, max_len, float(scale), num_splits, k_new, v_new)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation check (gptfast/kernels/testing.py)
# --------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Triton signature of ``fn``: the given pointer types, constexprs, fp32 qk_scale, else i32."""
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def _divisibility(fn, signature: dict, aligned_d: bool) -> dict:
    """The divisibility hints a typical launch gets from the JIT, as ``ASTSource`` attrs:
    16-byte aligned pointers and strides (a contiguous cache with D a multiple of 8), D itself
    a multiple of 16 only if ``aligned_d``. Without them the compiler cannot vectorise the key
    loads nor turn them into cp.async, and compiles code that no real launch runs."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name.startswith("stride") or (name == "D" and aligned_d)
    }


def _split_config(t: str, block_d: int, cfg: Launch, flags: bool) -> dict:
    part = "*" + t if flags else "*fp32"  # DIRECT passes the output here
    pointers = {"Q": "*" + t, "K": "*" + t, "V": "*" + t, "O": "*" + t, "KN": "*" + t,
                "VN": "*" + t, "Acc": part, "Max": part, "Sum": part,
                "Lens": "*i32" if flags else "*" + t}
    unit = {f"stride_{x}d": 1 for x in ("q", "k", "v", "kn", "vn")}  # Triton specialises 1
    constexprs = dict(unit, PER_ROW=flags, DIRECT=flags, APPEND=flags and cfg.block_m == 1,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                      NUM_STAGES=cfg.num_stages)
    signature = _signature(_split_kernel, pointers, constexprs)
    return {
        "name": f"split-{t}-d{block_d}-m{cfg.block_m}n{cfg.block_n}-w{cfg.num_warps}"
                f"s{cfg.num_stages}-flags_{'on' if flags else 'off'}",
        "fn": _split_kernel, "signature": signature,
        "attrs": _divisibility(_split_kernel, signature, aligned_d=block_d != 32),
        "constexprs": constexprs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
    }


def aot_configs():
    """Every config the GPU heuristics, and a tuning table, can pick, for a compile check.

    Split kernel: per dtype, head-dim bucket (BLOCK_D 16, 32, 64, 128) and query block (1 and
    16 rows), as a contiguous cache launches it (unit head-dim strides, 16-byte alignment). The
    PER_ROW, DIRECT and APPEND flags only switch a scalar load, the epilogue's stores and one
    row's loads and stores (no shared memory), so they are not multiplied in: they are all on for
    BLOCK_D 16 and 64 (APPEND with one query only) and all off for 32 and 128, which compiles
    every code path with every dtype and query block. D is a
    multiple of 16 (vectorised, unmasked head dims) except in the BLOCK_D=32 bucket, which
    compiles the masked head-dim path (e.g. D=24: element-wise loads, no cp.async). Pointer types follow the
    launcher: in DIRECT launches the unused partial-buffer pointers are the output, without
    PER_ROW the unused Lens pointer too. Then every config of TUNING_SPACE, in its class.
    Merge kernel: per dtype and head-dim bucket.
    """
    if INTERPRETING:
        raise RuntimeError("aot_configs() describes GPU launches; call it with TRITON_INTERPRET unset")
    configs = []
    for dtype, t in _TRITON_DTYPE.items():
        for block_d in (16, 32, 64, 128):
            flags = block_d in (16, 64)
            for q_len in (1, 2):
                configs.append(_split_config(t, block_d, _split_launch(q_len, block_d, dtype), flags))
            pointers = {"Acc": "*fp32", "Max": "*fp32", "Sum": "*fp32", "O": "*" + t}
            constexprs = dict(BLOCK_S=_MERGE_BLOCK_S, BLOCK_D=block_d)
            signature = _signature(_merge_kernel, pointers, constexprs)
            configs.append({
                "name": f"merge-{t}-d{block_d}", "fn": _merge_kernel, "signature": signature,
                "attrs": _divisibility(_merge_kernel, signature, aligned_d=block_d != 32),
                "constexprs": constexprs,
                "num_warps": _MERGE_LAUNCH.num_warps, "num_stages": _MERGE_LAUNCH.num_stages,
            })
    for cls, space in TUNING_SPACE.items():
        t, d, q = cls.split("-")
        for tuned in space:
            launch = Launch(int(q[1:]), tuned["block_n"], tuned["num_warps"], tuned["num_stages"])
            configs.append(_split_config(t, int(d[1:]), launch, flags=True))
    return list({c["name"]: c for c in configs}.values())


def report_cases(cc: int = 90):
    """GPT-2's decode step (one new query over 1024 cached keys, head dim 64), for the static
    report (gptfast/kernels/report.py): 124M (12 heads) and 1558M (25 heads), batch 1 and 8, fp32 and
    bf16, on a GPU of compute capability ``cc`` (its SM count). Per launch a label, its aot
    config (specialised as the JIT specialises the model's call: per-row lengths on the GPU,
    the new key and value appended from the fused projection's output) and its grid size in
    programs, from ``_plan``."""
    from gptfast.kernels.testing import SM_COUNT, launch_config, sm_count_of

    if INTERPRETING:
        raise RuntimeError("report_cases() describes GPU launches; call it with TRITON_INTERPRET unset")
    T, D = 1024, 64
    block_d = max(16, triton.next_power_of_2(D))
    cases = []
    for model, H in (("124M", 12), ("1558M", 25)):
        for B in (1, 8):
            for dtype, t in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16")):
                with sm_count_of(__name__, SM_COUNT[cc]):
                    plan = _plan(B * H, 1, T, None, block_d=block_d, dtype=dtype)
                cfg, S = plan.launch, plan.num_splits
                label = f"{model} B{B} cache{T} {_TRITON_DTYPE[dtype]}"
                part = t if S == 1 else "*fp32"  # DIRECT passes the output as the partial buffers
                cache = (H * T * D, T * D, D, 1)
                new = (3 * H * D, D, 1)  # a (B, H, 1, D) view of the (B, 1, 3 H D) projection
                values = (t, t, t, t, part, part, part, "*i32", t, t, 3 * H * D, D, 3 * H * D, 1,
                          *cache, *cache, *new, *new, H, 1, D, T, plan.chunk, S, D ** -0.5 * LOG2E)
                constexprs = dict(PER_ROW=True, DIRECT=S == 1, APPEND=True, BLOCK_M=cfg.block_m,
                                  BLOCK_N=cfg.block_n, BLOCK_D=block_d, NUM_STAGES=cfg.num_stages)
                split = launch_config(f"_split_kernel {label}", _split_kernel,
                                      dict(zip(_split_kernel.arg_names, values)), constexprs,
                                      cfg.num_warps, cfg.num_stages)
                cases.append({"label": f"{label} splits={S}", "config": split, "grid": B * H * S})
                if S > 1:
                    values = ("*fp32", "*fp32", "*fp32", t, D, S)
                    merge = launch_config(f"_merge_kernel {label}", _merge_kernel,
                                          dict(zip(_merge_kernel.arg_names, values)),
                                          dict(BLOCK_S=_MERGE_BLOCK_S, BLOCK_D=block_d),
                                          _MERGE_LAUNCH.num_warps, _MERGE_LAUNCH.num_stages)
                    cases.append({"label": f"{label} splits={S}", "config": merge, "grid": B * H})
    return cases
