"""NaN and inf through the online softmax (issue 25, item 1): flash attention's forward, dK/dV
(both forms), dQ, and decode attention's split and merge kernels.

A NaN in a query, key or value row or in the incoming gradient, or a +inf score, must give NaN
wherever the exact math gives NaN, never a zero row: a training run that goes NaN must show it.
The exact math (``exact_attention``) attends each query over only the keys it sees: masked and
padded keys are never read. The kernels evaluate FlashAttention's formulas tile by tile, where
masked weights are exact zeros that still multiply the rows of their tile (0 * NaN = NaN), so a
NaN may reach more entries than the exact math's: never one that the same formulas over the
whole masked score matrix (``flash_math``, as eager PyTorch's masked softmax does) keep finite.
Every finite entry obeys the flash rule against the exact float64 value, and padded positions
stay exactly zero, NaN there or not.
"""

import math

import pytest
import torch

from gptfast import GPTModel
from gptfast.kernels._common import PLAN_CCS, plans_of
from gptfast.kernels.attention import (
    attention,
    attention_dropout_mask,
    dropout_seed,
    effective_dropout_p,
)
from gptfast.kernels.decode_attention import decode_attention
from gptfast.kernels.testing import assert_agrees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = torch.cuda.is_available()
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
NAN, INF = float("nan"), float("inf")


# ---- references -----------------------------------------------------------------------------


def seen_mask(windows, Tk):
    """(B, 1, Tq, Tk) bool: key j is seen by query i of batch row b iff lo <= j < hi for
    [lo, hi) = windows[b][i]."""
    j = torch.arange(Tk)
    lo, hi = (torch.tensor([[w[n] for w in rows] for rows in windows]) for n in (0, 1))
    return ((j >= lo[..., None]) & (j < hi[..., None]))[:, None].to(DEVICE)


def exact_attention(q, k, v, windows, keep=None, dropout_p=0.0):
    """Each query over only the keys it sees, in the inputs' dtype: what attention means. Every
    query gets its own copy of the keys and values with the unseen ones replaced by zeros (a
    select, in the gradients too), so an unseen key is never read. Rows seeing no key: zeros."""
    seen = seen_mask(windows, k.shape[2])[..., None]  # (B, 1, Tq, Tk, 1)
    k_i = torch.where(seen, k[:, :, None], 0.0)  # (B, H, Tq, Tk, D)
    v_i = torch.where(seen, v[:, :, None], 0.0)
    s = (q[:, :, :, None] * k_i).sum(-1) / math.sqrt(q.shape[-1])
    return (_weights(s, seen[..., 0], keep, dropout_p)[..., None] * v_i).sum(-2)


def masked_attention(q, k, v, windows, keep=None, dropout_p=0.0):
    """The math over the full score matrix, unseen scores masked to -inf (eager PyTorch's way):
    where a masked weight (an exact 0) meets a NaN in a product, NaN (rows with no key: zeros)."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return _weights(s, seen_mask(windows, k.shape[2]), keep, dropout_p) @ v


def flash_math(q, k, v, do, windows, keep=None, dropout_p=0.0):
    """Output and gradients by FlashAttention's formulas over the whole masked score matrix: P
    the masked softmax, O = P V, dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ =
    dS K, dK = dS^T Q (times the scale; dropout's keep mask on P and dP). The kernels evaluate
    them tile by tile, skipping tiles masked out altogether: each of their NaNs is one here."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = _weights((q @ k.transpose(-2, -1)) * scale, seen_mask(windows, k.shape[2]))
    dp = do @ v.transpose(-2, -1)
    if keep is not None:
        p_kept, dp = (torch.where(keep, t, 0.0) / (1.0 - dropout_p) for t in (p, dp))
    else:
        p_kept = p
    o = p_kept @ v
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    return [o, ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p_kept.transpose(-2, -1) @ do]


def _weights(s, seen, keep=None, dropout_p=0.0):
    """Softmax over the seen scores (zeros in a row that sees none), then dropout's keep mask."""
    any_key = seen.any(-1, keepdim=True)
    w = torch.softmax(torch.where(any_key, s.masked_fill(~seen, -INF), 0.0), dim=-1) * any_key
    return w if keep is None else torch.where(keep, w, 0.0) / (1.0 - dropout_p)


def out_and_grads(fn, leaves, do):
    leaves = [t.detach().clone().requires_grad_(do is not None) for t in leaves]
    out = fn(*leaves)
    if do is None:
        return [out.detach()]
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


def slack(ref, dtype):
    """One ulp of ``dtype`` at the reference's largest magnitude (at least 1), two for fp32."""
    finite = ref[ref.isfinite()]
    top = finite.abs().max().item() if finite.numel() else 0.0
    return (2.0 if dtype == F32 else 1.0) * torch.finfo(dtype).eps * max(top, 1.0)


def assert_nan_rule(kernel, eager, exact, bound, names, what):
    """NaN wherever the exact math has it, and only where ``bound`` (``flash_math``) has it
    too; every other entry finite and within the flash rule of the exact value, with ``eager``:
    the masked math in the inputs' dtype on the inputs without the bad value (which the finite
    entries never met)."""
    for name, a, e, r, m in zip(names, kernel, eager, exact, bound):
        label = f"{what}: {name}"
        missing = r.isnan() & ~a.isnan()
        assert not missing.any(), f"{label}: {int(missing.sum())} finite entries where the exact math is NaN"
        extra = a.isnan() & ~m.isnan()
        assert not extra.any(), f"{label}: {int(extra.sum())} NaN entries even FlashAttention's math keeps finite"
        ok = ~a.isnan()
        assert_agrees(a[ok], e[ok], r[ok], atol=slack(r[ok], a.dtype), what=label)


def causal_windows(B, Tq, Tk, causal):
    """Per batch row and query: [0, Tk), or the bottom-right causal [0, i + Tk - Tq + 1)."""
    return [[(0, min(Tk, i + Tk - Tq + 1) if causal else Tk) for i in range(Tq)] for _ in range(B)]


def inputs(B, H, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, Tq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H, Tk, D, generator=g) for _ in range(2))
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def poison(q, k, v, do, kind, b, i, j):
    """One bad value: NaN in key row j, value row j, query row i or the incoming gradient's row
    i; +inf in key row j (every query's first component made positive, so that its score with
    that key is +inf). Returns q, k, v, do with it, and without it."""
    q, k, v, do = q.clone(), k.clone(), v.clone(), do.clone()
    if kind == "k_inf":
        q[..., 0] = q[..., 0].abs() + 0.5
    good = [t.clone() for t in (q, k, v, do)]
    if kind == "k_nan":
        k[b, 0, j, 3] = NAN
    elif kind == "v_nan":
        v[b, 1, j, 5] = NAN
    elif kind == "q_nan":
        q[b, 1, i, 2] = NAN
    elif kind == "do_nan":
        do[b, 0, i, 1] = NAN
    elif kind == "k_inf":
        k[b, 0, j, 0] = INF
    return (q, k, v, do), good


KINDS = ["k_nan", "v_nan", "q_nan", "k_inf"]  # and "do_nan" for the backward


# ---- flash attention: forward, dK/dV, dQ ----------------------------------------------------


def check_flash(Tq, Tk, D, dtype, causal, kind, i, j, dropout_p=0.0, B=1, H=2):
    (q, k, v, do), good = poison(*inputs(B, H, Tq, Tk, D, dtype), kind, B - 1, i, j)
    windows = causal_windows(B, Tq, Tk, causal)
    kwargs, keep, p = dict(causal=causal), None, effective_dropout_p(dropout_p)
    if dropout_p:
        keep = attention_dropout_mask(dropout_seed(torch.Generator().manual_seed(5)), B, H, Tq, Tk,
                                      dropout_p, device=DEVICE)
        kwargs.update(dropout_p=dropout_p, generator=torch.Generator().manual_seed(5))
    kernel = out_and_grads(lambda *a: attention(*a, **kwargs), (q, k, v), do)
    masked = lambda *a: masked_attention(*a, windows, keep, p)
    eager = out_and_grads(masked, good[:3], good[3])
    ref = out_and_grads(lambda *a: exact_attention(*a, windows, keep, p),
                        [t.double() for t in (q, k, v)], do.double())
    bound = flash_math(*[t.double() for t in (q, k, v, do)], windows, keep, p)
    assert kernel[0 if kind != "do_nan" else 1].isnan().any(), "the bad value must reach the output"
    assert_nan_rule(kernel, eager, ref, bound, ("out", "dq", "dk", "dv"),
                    f"{kind} ({dtype}, Tq={Tq}, Tk={Tk}, causal={causal}, p={dropout_p})")


# (Tq, Tk, D, dtype, causal, i, j): interpreter tiles (32 x 32 forward/dQ, 16 x 32 dK/dV) with
# the bad row inside the second tile; a shifted diagonal (Tq < Tk); the row that sees one key
# (whose exact dS is 0, or NaN); a single key.
FLASH_CASES = [
    (40, 40, 32, F32, True, 37, 5),
    (40, 40, 32, BF16, True, 0, 0),
    (40, 40, 32, F16, False, 20, 33),
    (17, 40, 32, F32, True, 16, 39),
    (3, 1, 32, F16, False, 1, 0),
]


@pytest.mark.parametrize("kind", [*KINDS, "do_nan"])
@pytest.mark.parametrize("tq,tk,d,dtype,causal,i,j", FLASH_CASES)
def test_flash_attention_propagates_nan(tq, tk, d, dtype, causal, i, j, kind):
    check_flash(tq, tk, d, dtype, causal, kind, i, j)


def test_flash_attention_with_dropout_propagates_nan():
    check_flash(40, 40, 32, F16, True, "k_nan", 30, 7, dropout_p=0.2)


@pytest.fixture(params=PLAN_CCS, ids=lambda cc: f"sm{cc}")
def gpu_plans(request):
    """Launch plans of sm_80 / sm_90 under the interpreter; on CUDA the device's own, once."""
    if CUDA:
        if request.param != PLAN_CCS[-1]:
            pytest.skip("on a GPU the device's own plans run (under the sm_90 id)")
        yield
        return
    with plans_of(request.param):
        yield


@pytest.mark.parametrize("kind,dropout_p,i", [("k_nan", 0.0, 140), ("q_nan", 0.1, 140),
                                              ("do_nan", 0.1, 0)])
def test_flash_attention_propagates_nan_under_gpu_plans(gpu_plans, kind, dropout_p, i):
    """GPU tiles (128-query forward tiles, 32 x 128 dK/dV, in 2 stages with dropout on sm_90):
    the bad row past the first tile of each kernel, or the row that sees one key."""
    check_flash(150, 150, 64, BF16, True, kind, i, 130, dropout_p)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_attention_propagates_nan_and_never_reads_padding(padding):
    """A NaN in a valid key; NaN in every padded position too: that one reaches exactly the
    queries that see it, and padded outputs and gradients stay exactly 0."""
    B, H, T, D = 3, 2, 37, 32
    lens = torch.tensor([37, 20, 9], device=DEVICE)
    q, k, v, do = inputs(B, H, T, T, D, F16, seed=3)
    lo = (T - lens.cpu() if padding == "left" else torch.zeros(B, dtype=torch.long)).tolist()
    hi = (torch.full((B,), T) if padding == "left" else lens.cpu()).tolist()
    ok = torch.zeros(B, 1, T, 1, dtype=torch.bool, device=DEVICE)
    for b in range(B):
        ok[b, :, lo[b]:hi[b]] = True
    windows = [[(lo[b], i + 1) if lo[b] <= i < hi[b] else (0, 0) for i in range(T)] for b in range(B)]
    j = lo[1] + 4  # a valid key of row 1, seen by its queries from j on
    good = [t.masked_fill(~ok, 0.0) for t in (q, k, v, do)]  # padding never read: zeros
    k = k.clone()
    k[1, 0, j, 7] = NAN
    poisoned = [t.masked_fill(~ok, NAN) for t in (q, k, v, do)]
    kwargs = dict(causal=True, key_lens=lens, query_lens=lens, padding=padding)
    kernel = out_and_grads(lambda *a: attention(*a, **kwargs), poisoned[:3], poisoned[3])
    bad = [t.masked_fill(~ok, 0.0) for t in (q, k, v, do)]
    eager = out_and_grads(lambda *a: masked_attention(*a, windows), good[:3], good[3])
    ref = out_and_grads(lambda *a: exact_attention(*a, windows), [t.double() for t in bad[:3]],
                        bad[3].double())
    bound = flash_math(*[t.double() for t in bad], windows)
    for name, a in zip(("out", "dq", "dk", "dv"), kernel):
        assert not a.masked_select(~ok).any(), f"{name}: padded positions must be exactly 0"
    rows = torch.arange(T, device=DEVICE)
    assert torch.equal(kernel[0][1, 0].isnan().any(-1), (rows >= j) & (rows < hi[1]))
    assert_nan_rule(kernel, eager, ref, bound, ("out", "dq", "dk", "dv"), f"padded ({padding})")


# ---- decode attention: split and merge ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tq,num_splits", [(1, None), (3, None), (20, None), (1, 1), (20, 1)])
def test_decode_attention_propagates_nan(tq, num_splits, kind):
    """Per-row cache lengths, NaN in every unused cache slot; the bad value at position j of
    row 1's cache (in its last chunk) or in its query i; split and merged, or one chunk (direct)."""
    B, H, D, t_max = 2, 2, 32, 80
    lens = [71, 52]
    q, k, v, _ = inputs(B, H, tq, t_max, D, F32, seed=1)
    j, i = 50, tq - 1
    (q, k, v, _), good = poison(q, k, v, q, kind, 1, i, j)
    for b, n in enumerate(lens):
        k[b, :, n:] = NAN
        v[b, :, n:] = NAN
    with torch.no_grad():
        out = decode_attention(q, k, v, torch.tensor(lens), num_splits=num_splits)
    windows = [[(0, n - tq + r + 1) for r in range(tq)] for n in lens]
    read = [q.double(), k.double(), v.double()]
    for b, n in enumerate(lens):  # the unused tail never read: zeros
        read[1][b, :, n:] = read[2][b, :, n:] = 0.0
    eager = masked_attention(*good[:3], windows)
    ref = exact_attention(*read, windows)
    bound = masked_attention(*read, windows)
    assert out[1].isnan().any() and not out[0].isnan().any()
    assert_nan_rule([out], [eager], [ref], [bound], ("out",), f"decode {kind} Tq={tq}")


def test_decode_attention_propagates_nan_under_gpu_plans(gpu_plans):
    """The SM-filling split plan of a GPU: the NaN key in one of many chunks."""
    q, k, v, _ = inputs(1, 2, 1, 300, 64, BF16, seed=2)
    k[0, 1, 217, 9] = NAN
    with torch.no_grad():
        out = decode_attention(q, k, v, 300)
    assert out[0, 1].isnan().all() and out[0, 0].isfinite().all()


# ---- the model: a NaN weight reaches the loss on either path --------------------------------


def test_a_nan_key_weight_gives_a_nan_loss_with_triton_kernels_too():
    """NaN in one key projection weight makes every key of head 0 NaN: the torch path's loss is
    NaN; the Triton path's used to be finite (attention turned the NaN into zeros)."""
    cfg = {"vocab_size": 61, "context_length": 40, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    torch.manual_seed(0)
    model = GPTModel(cfg, kernels="torch").to(DEVICE)
    with torch.no_grad():
        model.trf_blocks[0].att.W_key.weight[0, 0] = NAN
    ids = torch.randint(0, 61, (2, 40), device=DEVICE)
    for kernels in ("torch", "triton"):
        loss = model.use_kernels(kernels).loss(ids, ids)
        assert loss.isnan(), kernels
        with torch.no_grad():
            assert model(ids).isnan().all(), kernels
