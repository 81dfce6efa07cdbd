"""Launch plans of the fused linear + cross-entropy: the chunk layout (rows per chunk, the
vocabulary's aligned parts), the row kernel's column block and warps, the targets and loss
kernels' configs; the configs the static gate compiles (``aot_configs``) and the launches the
static report shows (``report_cases``). See gptfast/kernels/linear_cross_entropy.py for the op.
"""

import torch

from gptfast.kernels._common import Kernel, Launch, cdiv, next_power_of_2, plan_cache
from gptfast.kernels.linear_cross_entropy_kernels import _ce_kernel, _loss_kernel, _targets_kernel

CHUNK_BYTES = 1 << 27  # the (C, V) logits buffer of one chunk holds at most this many bytes
_ROW_ALIGN = 64  # chunk rows are rounded to this (GEMM tiles), within the byte budget
_VOCAB_ALIGN = 64  # the GEMMs' main part of the vocabulary is a multiple of this many rows
_BLOCK_V = (128, 4096)  # narrowest and widest column block of the row loop
_TARGETS_BLOCK = 4096  # targets per step of _targets_kernel's and _loss_kernel's loops


# ---- launch heuristics ---------------------------------------------------------------------


def _launch(vocab: int) -> Launch:
    """The row loop's column block (a power of 2 in 128..4096, 16 fp32 values per thread at
    most) and warps for a vocabulary of ``vocab``."""
    block = min(_BLOCK_V[1], max(_BLOCK_V[0], next_power_of_2(vocab)))
    return Launch(block_m=1, block_n=block, num_warps=max(1, block // 512), num_stages=3)


def row_stride(vocab: int) -> int:
    """Elements between logits rows in the chunk buffer: vocab rounded up to 16, so that every
    row starts 16-byte aligned (and Triton, seeing a stride divisible by 16, vectorises)."""
    return cdiv(vocab, 16) * 16


def chunk_rows(tokens: int, vocab: int, element_size: int, chunk_bytes: int | None = None) -> int:
    """Rows C of a chunk: the fewest chunks whose (C, vocab) buffer fits ``chunk_bytes``
    (default CHUNK_BYTES), balanced, rows rounded up to a multiple of 64 where the budget
    allows. At least 1 row."""
    budget = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (vocab * element_size))
    if tokens <= budget:
        return max(1, tokens)
    per_chunk = cdiv(tokens, cdiv(tokens, budget))
    return min(budget, cdiv(per_chunk, _ROW_ALIGN) * _ROW_ALIGN)


def vocab_parts(vocab: int) -> tuple[tuple[int, int], ...]:
    """The (start, end) row ranges of the vocabulary that each product runs over: an aligned
    main part (a multiple of _VOCAB_ALIGN rows) and the tail, or the whole vocabulary when it
    is aligned already or smaller than one alignment step."""
    main = vocab // _VOCAB_ALIGN * _VOCAB_ALIGN
    return ((0, vocab),) if main in (0, vocab) else ((0, main), (main, vocab))


_TARGETS, _CE, _LOSS = Kernel(_targets_kernel), Kernel(_ce_kernel), Kernel(_loss_kernel)


@plan_cache
def _targets_plan(mean: bool):
    """The targets kernel's config: it writes "mean"'s gradient scale (1/count), or 1."""
    return _TARGETS.config(MEAN=mean, BLOCK=_TARGETS_BLOCK, num_warps=4)


@plan_cache
def _loss_plan(mean: bool):
    """The loss kernel's config: the sum of the per-token losses, divided by the count for "mean"."""
    return _LOSS.config(MEAN=mean, BLOCK=_TARGETS_BLOCK, num_warps=4)


@plan_cache
def _layout(tokens: int, vocab: int, element_size: int, bias: bool, chunk_bytes: int) -> tuple:
    """(row stride, chunk rows, the products' vocabulary ranges) of a call's chunk loop: with a
    bias one product over the padded rows, else ``vocab_parts``. (``chunk_bytes``: CHUNK_BYTES
    at the call, so that a changed budget is a new plan.)"""
    stride = row_stride(vocab)
    ranges = ((0, stride),) if bias else vocab_parts(vocab)
    return stride, chunk_rows(tokens, stride, element_size, chunk_bytes), ranges


@plan_cache
def _ce_plan(vocab: int, write_grad: bool, row_scale: bool, smoothing: bool):
    """The row kernel's config for a vocabulary of ``vocab``: the launch the static gate compiles
    (3 stages, Triton's default, as the kernel ran on the H200 on 2026-12-04)."""
    launch = _launch(vocab)
    return _CE.config(WRITE_GRAD=write_grad, ROW_SCALE=row_scale, HAS_SMOOTHING=smoothing,
                      BLOCK_V=launch.block_n, num_warps=launch.num_warps,
                      num_stages=launch.num_stages)


# ---- ahead-of-time compile configs -----------------------------------------------------------

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aligned(fn, signature, *names) -> dict:
    """The divisibility hints a launch gives its pointers and ``names`` (16-byte aligned tensors;
    the row stride is a multiple of 16, see row_stride)."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
            if signature[a].startswith("*") or a in names}


def _config(t: str, launch: Launch, write_grad=True, row_scale=False, smoothing=True,
            targets="i64") -> dict:
    constexprs = dict(WRITE_GRAD=write_grad, ROW_SCALE=row_scale, HAS_SMOOTHING=smoothing,
                      BLOCK_V=launch.block_n)
    types = {"LOGITS": "*" + t, "TARGETS": "*" + targets, "LOSS": "*fp32", "SCALE": "*fp32",
             "V": "i32", "stride_row": "i32", "ignore_index": "i32", "smoothing": "fp32"}
    signature = {a: "constexpr" if a in constexprs else types[a] for a in _ce_kernel.arg_names}
    flags = f"g{write_grad:d}r{row_scale:d}s{smoothing:d}" + ("" if targets == "i64" else f"/{targets}")
    return {"name": f"_ce_kernel/{t}/{flags}/{launch.block_n}w{launch.num_warps}", "fn": _ce_kernel,
            "signature": signature, "constexprs": constexprs, "num_warps": launch.num_warps,
            "num_stages": launch.num_stages, "attrs": _aligned(_ce_kernel, signature, "stride_row")}


def _targets_config(fn, t: str, mean: bool = True) -> dict:
    """The targets kernel's or the loss kernel's config (``fn``) for ``t`` targets."""
    constexprs = dict(MEAN=mean, BLOCK=_TARGETS_BLOCK)
    types = {"TARGETS": "*" + t, "STATS": "*i32", "SCALE": "*fp32", "LOSS": "*fp32",
             "OUT": "*fp32", "N": "i32", "V": "i32", "ignore_index": "i32"}
    signature = {a: "constexpr" if a in constexprs else types[a] for a in fn.arg_names}
    return {"name": f"{fn.__name__}/{t}/m{mean:d}", "fn": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": 4, "num_stages": 3, "attrs": _aligned(fn, signature)}


def _plan_vocabs() -> list[int]:
    """One vocabulary size per distinct launch: each column block from 128 to 4096."""
    return [1 << k for k in range(_BLOCK_V[0].bit_length() - 1, _BLOCK_V[1].bit_length())]


def aot_configs():
    """Every (BLOCK_V, num_warps) the heuristic can pick, for fp32/fp16/bf16 logits, compiled
    with the gradient pass and label smoothing on (the most code and registers); the other flag
    combinations (forward only, per-row scales of reduction="none", no smoothing) only drop or
    swap a scalar load and a few elementwise ops, and are compiled at GPT-2's block (4096), as
    are int32 targets (int64's: the model's). And the targets and loss kernels for int64 and
    int32 targets ("mean" and "sum")."""
    configs = [_config(t, _launch(v)) for t in _TYPES.values() for v in _plan_vocabs()]
    gpt2 = _launch(50257)
    for t in _TYPES.values():
        for write_grad, row_scale, smoothing in ((False, False, False), (False, False, True),
                                                 (True, False, False), (True, True, False),
                                                 (True, True, True)):
            configs.append(_config(t, gpt2, write_grad, row_scale, smoothing))
        configs.append(_config(t, gpt2, targets="i32"))
    return configs + [_targets_config(fn, t, mean) for fn in (_targets_kernel, _loss_kernel)
                      for t in ("i64", "i32") for mean in (True, False)]


def report_cases(cc: int = 90):
    """GPT-2's training loss at 8 x 1024 tokens and vocabulary 50,257, for the static report
    (gptfast/kernels/report.py): the targets kernel (one program), one ``_ce_kernel`` launch
    per chunk, fp32 and bf16 logits, mean reduction without label smoothing, and the loss
    kernel (one program). The
    width (768..1600, 124M..1558M) only enters the cuBLAS products, not these launches: one case
    per dtype. Per launch a label, its aot config (specialised as the JIT specialises the call)
    and its grid (a full chunk's rows); the same on every GPU (``cc``)."""
    from gptfast.kernels.testing import launch_config

    tokens, vocab, launch = 8 * 1024, 50257, _launch(50257)
    args = dict(TARGETS="*i64", STATS="*i32", SCALE="*fp32", N=tokens, V=vocab, ignore_index=-100)
    cfg = launch_config(f"_targets_kernel GPT-2 {tokens} int64", _targets_kernel, args,
                        dict(MEAN=True, BLOCK=_TARGETS_BLOCK), 4)
    cases = [{"label": f"GPT-2 {tokens} int64 targets", "config": cfg, "grid": 1}]
    for dtype, t in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        rows = chunk_rows(tokens, row_stride(vocab), dtype.itemsize)
        label = f"GPT-2 {tokens}x{vocab} {t} ({cdiv(tokens, rows)} chunks)"
        args = dict(LOGITS="*" + t, TARGETS="*i64", LOSS="*fp32", SCALE="*fp32", V=vocab,
                    stride_row=row_stride(vocab), ignore_index=-100, smoothing=0.0)
        constexprs = dict(WRITE_GRAD=True, ROW_SCALE=False, HAS_SMOOTHING=False,
                          BLOCK_V=launch.block_n)
        cfg = launch_config(f"_ce_kernel {label}", _ce_kernel, args, constexprs,
                            launch.num_warps, launch.num_stages)
        cases.append({"label": label, "config": cfg, "grid": rows})
    args = dict(LOSS="*fp32", TARGETS="*i64", OUT="*fp32", N=tokens, V=vocab, ignore_index=-100)
    cfg = launch_config(f"_loss_kernel GPT-2 {tokens} int64", _loss_kernel, args,
                        dict(MEAN=True, BLOCK=_TARGETS_BLOCK), 4)
    return cases + [{"label": f"GPT-2 {tokens} mean loss", "config": cfg, "grid": 1}]
