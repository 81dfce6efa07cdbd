"""Flash attention (FlashAttention-2 style) in Triton: forward, backward, dropout, any length.

``attention(q, k, v, causal, scale, dropout_p, generator)`` computes
``dropout(softmax(q @ k^T * scale + mask)) @ v`` for q of shape (B, H, Tq, D) and k, v of shape
(B, H, Tk, D), like ``torch.nn.functional.scaled_dot_product_attention``, without ever
materialising the Tq x Tk score matrix. One difference from SDPA: the causal mask is aligned
to the bottom-right corner (as for a KV cache), i.e. query i attends keys j <= i + (Tk - Tq).
For Tq == Tk this is the usual lower-triangular mask; SDPA's ``is_causal`` aligns it top-left.

Padded batches: optional per-row ``key_lens`` / ``query_lens`` (right or left padding) restrict
each batch row to its valid windows, read by the kernels from device memory (no host sync); the
causal mask is aligned bottom-right on those windows; padded positions are never read.

Numerics: scores, the online softmax and all accumulators are fp32; ``tl.dot`` operands stay in
the input dtype (fp16/bf16 tensor cores; fp32 inputs use exact "ieee" fp32 products, no TF32).
The forward keeps the per-row log-sum-exp (fp32) so that the backward recomputes the attention
weights tile by tile instead of storing them.

Dropout drops attention weights after the softmax (as in eager PyTorch), with a counter-based
RNG (Philox4x32-7: ``tl.randint4x`` with 7 rounds, FlashAttention-2's count; Salmon et al.
(2011) find 7 rounds of Philox4x32 pass TestU01's BigCrush, 10 is their safety margin) keyed by
(seed, batch*head): each call
(one counter) gives 128 bits, i.e. 8 keep decisions of 16 bits for 8 weights of one row, so
the RNG costs 1/8 of a Philox call per weight (``_dropout_keep`` documents the exact mapping
of weights to counters and bits). A weight is kept iff its 16-bit draw is >= round(p * 2^16):
the applied drop probability is p quantised to a multiple of 2^-16 (``effective_dropout_p``,
within 2^-17 of p), and kept weights are scaled by 1/(1 - that). The backward regenerates
exactly the forward's keep mask, as does ``attention_dropout_mask``.

The seed is a (1,) int64 tensor drawn by ``torch.randint`` on q's device (from its default
generator unless a ``generator`` is given) and the kernels load it from there: no host read.
So a CUDA graph that captures a training step with dropout (``torch.cuda.graph``,
``torch.compile(mode="reduce-overhead")``) draws a fresh seed on each replay, through the CUDA
generator's graph-safe Philox state, as torch's own dropout does. Under torch.compile (see
gptfast/kernels/__init__.py) the draw is part of the graph, i.e. of the graph's RNG:
``torch.manual_seed`` repeats a compiled run, but the masks differ from eager mode's unless
``torch._inductor.config.fallback_random = True`` (then they are the same). Pass no
``generator`` to a compiled call: dynamo cannot trace a torch.Generator (a graph break; an error
with ``fullgraph=True``).
"""

import functools
import math
import numbers
from dataclasses import dataclass

import torch

from gptfast.kernels import attention_sm90
from gptfast.kernels._common import (
    FLOAT_DTYPES, Kernel, cdiv, check_device, check_float, check_launchable, host_readable,
    library_op, on_device, once_differentiable, plan_cache, plan_capability,
)
from gptfast.kernels.attention_kernels import (  # noqa: F401  (the gate, tests and tools name them here)
    _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel, _dropout_mask_kernel, _fwd_kernel,
)
from gptfast.kernels.attention_plans import (  # noqa: F401  (tests and bench/tune.py use these)
    DKDV_KERNEL, DQ_KERNEL, FWD_KERNEL, LOG2E, TUNING_SPACE, _block_d, _dkdv_launch, _dq_launch,
    _dq_writes_delta, _fwd_launch, _preprocess_launch, _shape_class, aot_configs, report_cases,
)
from gptfast.kernels.attention_tiles import PHILOX_ROUNDS, _philox4x32  # noqa: F401  (tests)

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
# Dropout counts Philox calls per (batch, head) with an int32 counter (one per 8 weights).
MAX_DROPOUT_SCORES = 2**31
MAX_BATCH_HEADS = 65535  # programs of one (batch, head) index CUDA grid axis 1


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


_FWD, _DKDV, _DQ = Kernel(_fwd_kernel), Kernel(_bwd_dkdv_kernel), Kernel(_bwd_dq_kernel)
_PREPROCESS, _DROPOUT_MASK = Kernel(_bwd_preprocess_kernel), Kernel(_dropout_mask_kernel)


@functools.cache
def _stand_ins(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty int32 and int64 tensors that stand for absent lengths and seed: the kernels' flags
    keep them unread. Made once per device."""
    return (torch.empty(0, dtype=torch.int32, device=device),
            torch.empty(0, dtype=torch.int64, device=device))


def _pointers(device, query_lens, key_lens, seed) -> tuple:
    """The (QL, KL, Seed) pointer arguments, stand-ins where absent."""
    none32, none64 = _stand_ins(device)
    return (none32 if query_lens is None else query_lens, none32 if key_lens is None else key_lens,
            none64 if seed is None else seed)


def _seed_pointer(device, seed):
    """The Seed pointer argument alone (the Hopper variants take no lengths)."""
    return _pointers(device, None, None, seed)[2]


def _flags(causal, dropout, D, block_d, has_ql, has_kl, left) -> dict:
    return dict(CAUSAL=causal, DROPOUT=dropout, EVEN_D=D == block_d, HAS_QL=has_ql,
                HAS_KL=has_kl, LEFT=left, BLOCK_D=block_d)


@plan_cache
def _forward_plan(device, dtype, B, H, Tq, D, causal, dropout, has_ql, has_kl, left):
    """(config, grid) of the forward kernel."""
    block_d = _block_d(D)
    cfg = _fwd_launch(block_d, dtype, dropout, device)
    config = _FWD.config(**_flags(causal, dropout, D, block_d, has_ql, has_kl, left),
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return config, (cdiv(Tq, cfg.block_m), B * H)


@dataclass(frozen=True)
class _BackwardPlan:
    dq: tuple  # (config, grid) of each kernel
    dkdv: tuple
    preprocess: tuple  # delta's own kernel: without a fused-delta dQ, or when no dQ is wanted
    fused_delta: bool  # the dQ kernel writes delta


@plan_cache
def _backward_plan(device, dtype, B, H, Tq, Tk, D, causal, dropout, has_ql, has_kl, left,
                   need_dq):
    block_d = _block_d(D)
    flags = _flags(causal, dropout, D, block_d, has_ql, has_kl, left)
    dq = _dq_launch(block_d, dtype, dropout, device)
    cc = plan_capability(device)
    dkdv = _dkdv_launch(block_d, dtype, dropout, cc, device)
    pre = _preprocess_launch(device)
    fused = need_dq and _dq_writes_delta(dtype)
    return _BackwardPlan(
        dq=(_DQ.config(**flags, DELTA=fused, BLOCK_M=dq.block_m, BLOCK_N=dq.block_n,
                       num_warps=dq.num_warps, num_stages=dq.num_stages),
            (cdiv(Tq, dq.block_m), B * H)),
        dkdv=(_DKDV.config(**flags, BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, num_warps=dkdv.num_warps,
                           num_stages=dkdv.num_stages), (cdiv(Tk, dkdv.block_n), B * H)),
        preprocess=(_PREPROCESS.config(EVEN_D=flags["EVEN_D"], BLOCK_M=pre.block_m,
                                       BLOCK_D=block_d, num_warps=pre.num_warps),
                    (cdiv(Tq, pre.block_m), B * H)),
        fused_delta=fused,
    )


def _forward(q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left):
    B, H, Tq, D = q.shape
    device = q.device
    o = torch.empty_like(q)  # q's memory layout: (B, T, H, D)-strided q gives such an o
    lse2 = torch.empty((B, H, Tq), device=device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse2
    config, grid = _forward_plan(device, q.dtype, B, H, Tq, D, causal, dropout_p > 0,
                                 query_lens is not None, key_lens is not None, left)
    if scale <= 0:  # the forward's row max needs a positive scale: q (-k)^T |scale| is the same
        k, scale = (-k, -scale) if scale < 0 else (torch.zeros_like(k), 1.0)
    padded = query_lens is not None or key_lens is not None
    block_d = _block_d(D)
    if sm90 := attention_sm90.plan(attention_sm90.FWD, q, block_d, dropout_p > 0, padded):
        attention_sm90.forward(sm90, q, k, v, o, lse2, causal, scale, _seed_pointer(device, seed),
                               dropout_p, block_d)
        return o, lse2
    _FWD(config, grid, (q, k, v, o, lse2, *_pointers(device, query_lens, key_lens, seed)),
         (*q.stride(), *k.stride(), *v.stride(), *o.stride(), H, Tq, k.shape[2], D,
          scale * LOG2E, dropout_p))
    return o, lse2


def _backward(do, q, k, v, o, lse2, causal, scale, dropout_p, seed, query_lens, key_lens, left,
              need_dq, need_dkdv):
    """dQ first: with fp16/bf16 its kernel also writes delta, which dK/dV reads (else, or when
    no dQ is wanted, the preprocess kernel writes it)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if q.numel() == 0 or k.numel() == 0:  # no query row: nothing flows back
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    device = q.device
    dq = torch.empty_like(q) if need_dq else None  # gradients in the layouts of q, k, v
    dk = torch.empty_like(k) if need_dkdv else None
    dv = torch.empty_like(v) if need_dkdv else None
    padded = query_lens is not None or key_lens is not None
    if need_dq and attention_sm90.backward(do, q, k, v, o, lse2, dq, dk, dv, causal, scale,
                                           _seed_pointer(device, seed), dropout_p, _block_d(D),
                                           padded):
        return dq, dk, dv
    delta = torch.empty_like(lse2)
    plan = _backward_plan(device, q.dtype, B, H, Tq, Tk, D, causal, dropout_p > 0,
                          query_lens is not None, key_lens is not None, left, need_dq)
    lens_seed = _pointers(device, query_lens, key_lens, seed)
    sizes = (H, Tq, Tk, D, scale, scale * LOG2E, dropout_p)
    if not plan.fused_delta:
        _PREPROCESS(*plan.preprocess, (o, do, delta),
                    (*o.stride(), *do.stride(), H, Tq, D, 1.0 - dropout_p))
    if need_dq:
        _DQ(*plan.dq, (q, k, v, o, do, lse2, delta, dq, *lens_seed),
            (*q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
             *sizes))
    if need_dkdv:
        _DKDV(*plan.dkdv, (q, k, v, do, lse2, delta, dk, dv, *lens_seed),
              (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
               *sizes))
    return dq, dk, dv


# gptfast::attention -> (o, lse2) and gptfast::attention_backward -> (dq, dk, dv): the ops
# torch.compile sees (see gptfast/kernels/__init__.py), over validated input. The dropout seed
# comes in as a (1,) int64 tensor on q's device, drawn by torch.randint outside the op (None
# without dropout), and the kernels load it: no host read, so a compiled graph draws it with its
# own RNG and a CUDA graph replays a fresh draw.


def _backward_body(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse2: torch.Tensor, causal: bool, scale: float,
                   dropout_p: float, seed: torch.Tensor | None, query_lens: torch.Tensor | None,
                   key_lens: torch.Tensor | None, left: bool, need_dq: bool, need_dkdv: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); a gradient not asked for is an empty placeholder."""
    with on_device(q.device):
        dq, dk, dv = _backward(do, q, k, v, o, lse2, causal, scale, dropout_p, seed, query_lens,
                               key_lens, left, need_dq, need_dkdv)
    return (dq if need_dq else q.new_empty(0), dk if need_dkdv else k.new_empty(0),
            dv if need_dkdv else v.new_empty(0))


def _backward_fake(do, q, k, v, o, lse2, causal, scale, dropout_p, seed, query_lens, key_lens,
                   left, need_dq, need_dkdv):
    def grad(t, needed):
        return torch.empty_like(t) if needed else t.new_empty(0)  # the real op's layouts
    return grad(q, need_dq), grad(k, need_dkdv), grad(v, need_dkdv)


_backward_op = library_op("attention_backward", _backward_body, _backward_fake)


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float, dropout_p: float, seed: torch.Tensor | None,
                       query_lens: torch.Tensor | None, key_lens: torch.Tensor | None, left: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(q.device):
        return _forward(q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left)


def _attention_fake(q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)  # o in q's layout


def _attention_setup(ctx, inputs, output):
    q, k, v, causal, scale, dropout_p, seed, query_lens, key_lens, left = inputs
    o, lse2 = output
    ctx.mark_non_differentiable(lse2)
    ctx.set_materialize_grads(False)  # no zeros for lse2's (absent) gradient: one launch less
    ctx.save_for_backward(q, k, v, o, lse2, seed, query_lens, key_lens)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.left = causal, scale, dropout_p, left


@once_differentiable("attention")
def _attention_backward(ctx, do, _dlse2):
    q, k, v, o, lse2, seed, query_lens, key_lens = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = _backward_op(do, q, k, v, o, lse2, ctx.causal, ctx.scale, ctx.dropout_p, seed,
                              query_lens, key_lens, ctx.left, need_q, need_k or need_v)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            None, None, None, None, None, None, None)


_attention = library_op("attention", _attention_forward, _attention_fake, _attention_setup,
                        _attention_backward)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, causal, scale, dropout_p) -> None:
    """Every input problem named, before any launch. The common case (plain 4-D tensors of one
    float dtype and device, a bool causal, float scale and dropout_p) takes a few attribute
    reads before the shape checks; anything else the slow path, which names the problem."""
    op = "attention"
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.dtype in FLOAT_DTYPES
            and k.dtype is q.dtype and v.dtype is q.dtype and k.device == q.device
            and v.device == q.device and (causal is True or causal is False)):
        _check_types(op, q, k, v, causal)
    check_launchable(op, q)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, H, Tq, D), Tk = q.shape, k.shape[2]
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, heads and "
            "head_dim (layout (batch, heads, seq_len, head_dim); grouped-query heads are not supported)"
        )
    if B * H > MAX_BATCH_HEADS:
        raise ValueError(f"{op}: batch * heads must be at most {MAX_BATCH_HEADS} (a CUDA grid axis), got {B * H}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {D}")
    if causal and Tq > Tk:
        raise ValueError(
            f"{op}: causal attention with more queries ({Tq}) than keys ({Tk}): the causal mask is "
            "aligned to the end (query i sees keys j <= i + Tk - Tq), so the first queries would see no key"
        )
    if Tk == 0 and Tq > 0 and B * H > 0:
        raise ValueError(f"{op}: {Tq} queries but no keys (k/v have seq_len 0)")
    if (type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, numbers.Real))
            or not math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if (type(dropout_p) is not float and (isinstance(dropout_p, bool)
                                          or not isinstance(dropout_p, numbers.Real))
            or not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and Tq * Tk > MAX_DROPOUT_SCORES:
        raise ValueError(
            f"{op}: dropout supports at most 2**31 weights per head (Tq * Tk), got {Tq} x {Tk}"
        )


def _check_types(op, q, k, v, causal) -> None:
    """The slow path of _check_inputs' type, dtype and device checks: raises naming the problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
    check_device(op, q=q, k=k, v=v)
    check_float(op, q=q, k=k, v=v)
    if causal not in (True, False):
        raise TypeError(f"{op}: causal must be True or False, got {causal!r}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_lengths(q, k, key_lens, query_lens, padding) -> None:
    """Per-row lengths: (batch,) int32/int64 tensors on q's device. Their values are checked
    only for CPU tensors: reading GPU ones would synchronise (the kernels clamp to [0, T])."""
    op = "attention"
    if padding not in ("right", "left"):
        raise ValueError(f"{op}: padding must be 'right' or 'left', got {padding!r}")
    for name, lens, T in (("key_lens", key_lens, k.shape[2]), ("query_lens", query_lens, q.shape[2])):
        if lens is None:
            continue
        if not isinstance(lens, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(lens).__name__}")
        if lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {lens.dtype}")
        if lens.shape != (q.shape[0],):
            raise ValueError(f"{op}: {name} must have shape (batch,) = ({q.shape[0]},), got {tuple(lens.shape)}")
        if lens.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {lens.device}")
        if host_readable(lens) and lens.numel() and not (0 <= lens.min() and lens.max() <= T):
            raise ValueError(f"{op}: {name} must be in [0, {T}], got values {lens.min().item()}..{lens.max().item()}")


def effective_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels apply for ``dropout_p``: the nearest multiple of 2^-16
    (the RNG compares 16-bit draws with a threshold), at most 1 - 2^-16; within 2^-17 of
    ``dropout_p`` for every p <= 1 - 2^-16. Kept weights are scaled by 1 / (1 - that)."""
    return min(round(float(dropout_p) * 65536), 65535) / 65536


def _random_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    source = device if generator is None else generator.device
    return torch.randint(0, 2**31 - 1, (1,), generator=generator, device=source)


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The kernels' (1,) int64 seed on ``device``, drawn from ``generator`` (default: the
    default generator of ``device``). A CUDA generator draws it on the GPU, with no host sync:
    captured in a CUDA graph, each replay draws anew (torch's graph-safe Philox state); a CPU
    generator's seed is copied over, which a graph cannot replay."""
    seed = _random_seed(generator, device)
    if seed.device != device:
        if seed.device.type == "cpu" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "attention: a CPU generator cannot drive dropout inside a CUDA graph: its seed "
                "would be copied once, when the graph is recorded, and every replay would drop "
                "the same weights; pass generator=None (the GPU's default generator) or a CUDA "
                "torch.Generator")
        seed = seed.to(device, non_blocking=True)
    return seed


def dropout_seed(generator: torch.Generator | None = None, device="cpu") -> int:
    """The kernel seed that ``attention`` draws from ``generator`` for inputs on ``device``
    (default: that device's default generator, as ``attention`` draws it), as an int."""
    return int(_random_seed(generator, torch.device(device)).item())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    key_lens: torch.Tensor | None = None,
    query_lens: torch.Tensor | None = None,
    padding: str = "right",
) -> torch.Tensor:
    """Flash attention: ``dropout(softmax(q @ k^T * scale + mask)) @ v``, differentiable.

    q: (batch, heads, Tq, head_dim); k, v: (batch, heads, Tk, head_dim); any strides; fp32,
    fp16 or bf16 (one dtype); 16 <= head_dim <= 128. Returns a (batch, heads, Tq, head_dim)
    tensor in q's memory layout (``torch.empty_like(q)``: a (B, T, H, D)-strided q gives a
    (B, T, H, D)-strided output, whose ``transpose(1, 2)`` is contiguous); the gradients come
    in the layouts of q, k and v. ``scale`` defaults to 1/sqrt(head_dim).

    ``causal``: query i attends keys j <= i + (Tk - Tq), the mask aligned to the bottom-right
    corner as for queries that continue a KV cache (Tq == Tk: the usual lower triangle; unlike
    SDPA's top-left ``is_causal`` when Tq < Tk). Causal needs Tq <= Tk.

    ``dropout_p``: probability of dropping each attention weight (kept ones scaled by
    1/(1-p)); the kernel seed is drawn from ``generator`` (default: the default generator of
    q's device, so ``torch.manual_seed`` repeats a run), into device memory where the kernels
    read it: no host sync, and a CUDA graph that captured the call draws a fresh mask per
    replay. No RNG state is consumed when dropout_p == 0.

    ``key_lens`` / ``query_lens``: optional (batch,) int32/int64 tensors on q's device, the
    number of valid keys / queries of each batch row (None: all). ``padding="right"``: the
    valid ones are the first n positions (fine-tuning batches); ``"left"``: the last n (HF's
    left-padded prompts and their cached decode steps). The causal mask is aligned bottom-right
    on each row's valid windows (its last valid query sees every valid key). Padded query rows
    return zeros, as does a valid query with no visible key; padded positions are never read
    and get zero gradients. GPU lengths are read by the kernels (no host synchronisation);
    CPU ones are checked to lie in [0, T].
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    _check_inputs(q, k, v, causal, scale, dropout_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        what = type(generator).__name__
        raise TypeError(f"attention: generator must be a torch.Generator or None, got {what}")
    if key_lens is not None or query_lens is not None or padding != "right":
        _check_lengths(q, k, key_lens, query_lens, padding)
        key_lens = None if key_lens is None else key_lens.to(torch.int32)
        query_lens = None if query_lens is None else query_lens.to(torch.int32)
    seed = None
    if dropout_p:
        dropout_p = effective_dropout_p(dropout_p)
        seed = _draw_seed(generator, q.device)
    return _attention(q, k, v, bool(causal), float(scale), float(dropout_p), seed, query_lens,
                      key_lens, padding == "left")[0]


def attention_dropout_mask(
    seed: int, batch: int, heads: int, q_len: int, k_len: int, dropout_p: float, device="cpu"
) -> torch.Tensor:
    """The keep mask (bool, (batch, heads, q_len, k_len)) that the kernels use for ``seed``.

    For tests and debugging: with ``seed = dropout_seed(g, q.device)`` drawn from a generator in
    the state that ``attention(..., generator=g)`` sees (g None: the device's default generator),
    this is the mask that call applies.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention_dropout_mask: dropout_p must be in [0, 1), got {dropout_p!r}")
    if q_len * k_len > MAX_DROPOUT_SCORES:
        raise ValueError("attention_dropout_mask: at most 2**31 weights per head")
    mask = torch.empty((batch, heads, q_len, k_len), device=device, dtype=torch.int8)
    check_device("attention_dropout_mask", mask=mask)
    if mask.numel() == 0:
        return mask.bool()
    block = 32
    grid = (cdiv(q_len, block), cdiv(k_len, block), batch * heads)
    seed = torch.tensor([seed], dtype=torch.int64, device=mask.device)
    with on_device(mask.device):
        _DROPOUT_MASK(_DROPOUT_MASK.config(BLOCK_M=block, BLOCK_N=block, num_warps=4), grid,
                      (mask, seed), (q_len, k_len, effective_dropout_p(dropout_p)))
    return mask.bool()
