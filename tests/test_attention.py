"""Flash attention kernels (gptfast/kernels/attention.py) against eager PyTorch and a float64 reference.

FlashAttention's rule: for the output and each gradient, the kernel's max error against the
float64 reference is at most 2x the error of eager attention in the same dtype, plus one ulp
of the dtype at the reference's largest magnitude (two for fp32; see ``slack``). Without a GPU these run in Triton's
interpreter on small shapes; the realistic shapes run only on CUDA.
"""

import math
import re
import sys

import pytest
import torch
import triton
import triton.language as tl

from gptfast import kernels
import gptfast.kernels._common
from gptfast.kernels.attention import (
    PHILOX_ROUNDS,
    _philox4x32,
    aot_configs,
    attention,
    attention_dropout_mask,
    dropout_seed,
    effective_dropout_p,
)
from gptfast.kernels.testing import assert_agrees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="realistic shapes need a GPU (interpreter too slow)")
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def causal_mask(q_len, k_len, device=DEVICE):
    """Bottom-right aligned causal mask: query i sees keys j <= i + (k_len - q_len)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def eager_attention(q, k, v, causal=True, scale=None, keep=None, dropout_p=0.0):
    """softmax(q k^T * scale + mask) [* keep / (1-p)] @ v, in the inputs' dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    w = torch.softmax(s, dim=-1)
    if keep is not None:
        w = w * keep.to(w.dtype) / (1.0 - dropout_p)
    return w @ v


def out_and_grads(fn, leaves, do, view=lambda t: t):
    """Output of fn(view(q), view(k), view(v)) and the gradients of the leaf tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*[view(t) for t in leaves])
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


def slack(ref, dtype):
    """Absolute slack of the rule: one ulp of ``dtype`` at the largest magnitude of ``ref`` (at
    least 1: the inputs are unit normal), two for fp32, where eager's own error is
    accumulation-order noise that the tiled summation legitimately differs from by ~1 ulp."""
    ulps = 2.0 if dtype == F32 else 1.0
    return ulps * torch.finfo(dtype).eps * max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)


def assert_flash_rule(shape_q, shape_kv, dtype, causal=True, scale=None, view=lambda t: t,
                      dropout_p=0.0, generator_seed=None, do_view=lambda t: t):
    """Kernel vs eager (same dtype) vs float64, for the output and dq, dk, dv."""
    gen = torch.Generator(device=DEVICE).manual_seed(1234)
    q = torch.randn(shape_q, generator=gen, device=DEVICE).to(dtype)
    k = torch.randn(shape_kv, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(shape_kv, generator=gen, device=DEVICE).to(dtype)
    out_shape = view(q).shape
    do = do_view(torch.randn(out_shape, generator=gen, device=DEVICE).to(dtype))

    keep = None
    kernel_kwargs = dict(causal=causal, scale=scale)
    if dropout_p > 0:
        B, H, Tq, Tk = *out_shape[:3], view(k).shape[2]
        seed = dropout_seed(torch.Generator().manual_seed(generator_seed))
        keep = attention_dropout_mask(seed, B, H, Tq, Tk, dropout_p, device=DEVICE)
        kernel_kwargs.update(dropout_p=dropout_p, generator=torch.Generator().manual_seed(generator_seed))

    kernel = out_and_grads(lambda *a: attention(*a, **kernel_kwargs), (q, k, v), do, view)
    ref_kwargs = dict(causal=causal, scale=scale, keep=keep, dropout_p=effective_dropout_p(dropout_p))
    eager = out_and_grads(lambda *a: eager_attention(*a, **ref_kwargs), (q, k, v), do, view)
    ref = out_and_grads(
        lambda *a: eager_attention(*a, **ref_kwargs), [t.double() for t in (q, k, v)], do.double(), view
    )
    for name, a, e, r in zip(("out", "dq", "dk", "dv"), kernel, eager, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_agrees(a, e, r, atol=slack(r, dtype), what=f"{name} ({dtype}, causal={causal})")


# ------------------------------------------------------------------------------------------
# Numerics (interpreter-sized)
# ------------------------------------------------------------------------------------------

# (Tq, Tk, head_dim, dtype, causal): lengths 1, 17, 97 and mid sizes across tile edges
# (interpreter tiles: 32 queries x 16 keys forward/dQ, 32 keys x 16 queries dK/dV); head dims
# 16..128 incl. non powers of two; every dtype; Tq < Tk with the bottom-right causal mask.
CPU_CASES = [
    (97, 97, 64, F16, True),
    (97, 97, 64, F16, False),
    (97, 97, 64, BF16, True),
    (97, 97, 64, BF16, False),
    (97, 97, 64, F32, True),
    (97, 97, 64, F32, False),
    (1, 1, 64, F16, True),
    (17, 17, 16, BF16, True),
    (17, 17, 48, F32, False),
    (33, 33, 24, F16, True),
    (40, 40, 80, BF16, True),
    (40, 57, 96, F16, True),  # shift 17: row 31's last key (48) opens a new key tile
    (17, 97, 112, BF16, False),
    (17, 97, 128, F32, True),
    (1, 97, 64, F16, True),
    (1, 17, 48, BF16, False),
]


@pytest.mark.parametrize("tq,tk,d,dtype,causal", CPU_CASES)
def test_flash_rule(tq, tk, d, dtype, causal):
    assert_flash_rule((1, 2, tq, d), (1, 2, tk, d), dtype, causal)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_non_contiguous_inputs_and_grad(dtype):
    """q, k, v as (B, T, H, D) -> (B, H, T, D) transposed views, as in a GPT block; the
    incoming gradient is a transposed view too. Strides are used as they are."""
    to_bhtd = lambda t: t.transpose(1, 2)  # noqa: E731
    do_view = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    assert_flash_rule((2, 37, 3, 32), (2, 37, 3, 32), dtype, True, view=to_bhtd, do_view=do_view)


def test_output_and_gradients_follow_input_layouts():
    """A (B, T, H, D)-strided q gives a (B, T, H, D)-strided output (so the model's transpose
    back is a free view) and the gradients come in the layouts of q, k and v (torch.empty_like
    semantics), here three different ones."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    B, T, H, D = 2, 19, 3, 32
    q = torch.randn(B, T, H, D, generator=gen, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(B, H, T, D, generator=gen, device=DEVICE).requires_grad_()
    v = torch.randn(H, B, T, D, generator=gen, device=DEVICE).transpose(0, 1).requires_grad_()
    out = attention(q, k, v)
    assert out.stride() == q.stride() and out.transpose(1, 2).is_contiguous()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert t.grad.stride() == t.stride()
    ref = eager_attention(q.double(), k.double(), v.double())
    assert_agrees(out, eager_attention(q, k, v), ref, atol=slack(ref, F32))


@pytest.mark.parametrize("scale", [-0.4, 0.0])
def test_negative_and_zero_scale(scale):
    """The forward's row max is taken on raw scores: a negative scale (K negated) and a zero
    scale (uniform weights) still follow the rule."""
    assert_flash_rule((1, 2, 21, 32), (1, 2, 21, 32), F32, True, scale=scale)


def test_custom_scale_and_stride0_grad():
    """A custom scale, and the stride-0 gradient that out.sum().backward() sends."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 29, 40, generator=gen, device=DEVICE) for _ in range(3))
    kernel = out_and_grads(lambda *a: attention(*a, causal=True, scale=0.3).sum(), (q, k, v), None)
    ref = out_and_grads(lambda *a: eager_attention(*a, causal=True, scale=0.3).sum(),
                        [t.double() for t in (q, k, v)], None)
    eager = out_and_grads(lambda *a: eager_attention(*a, causal=True, scale=0.3).sum(), (q, k, v), None)
    for name, a, e, r in zip(("sum", "dq", "dk", "dv"), kernel, eager, ref):
        assert_agrees(a, e, r, atol=slack(r, F32), what=name)
    assert_flash_rule((1, 2, 29, 40), (1, 2, 29, 40), F16, False, scale=0.05)


def test_causal_is_bottom_right_aligned():
    """One query over a cache of keys sees every key; SDPA's top-left mask would see one."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, 1, 1, 32, generator=gen, device=DEVICE)
    k, v = (torch.randn(1, 1, 20, 32, generator=gen, device=DEVICE) for _ in range(2))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention(q, k, v, causal=True), full, atol=1e-6)
    # The last 5 queries of a 20-token sequence see what they see in the full causal pass.
    q20 = torch.randn(1, 1, 20, 32, generator=gen, device=DEVICE)
    whole = attention(q20, k, v, causal=True)
    assert torch.allclose(attention(q20[:, :, 15:], k, v, causal=True), whole[:, :, 15:], atol=1e-6)


def test_backward_is_deterministic():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (2, 2, 70, 64) if CUDA else (1, 1, 40, 32)
    q, k, v = (torch.randn(shape, generator=gen, device=DEVICE).to(F16) for _ in range(3))
    do = torch.randn(shape, generator=gen, device=DEVICE).to(F16)
    first = out_and_grads(lambda *a: attention(*a, dropout_p=0.2, generator=torch.Generator().manual_seed(5)),
                          (q, k, v), do)
    second = out_and_grads(lambda *a: attention(*a, dropout_p=0.2, generator=torch.Generator().manual_seed(5)),
                           (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_single_key_score_gradients_are_exactly_zero(dtype, dropout_p):
    """A query that sees one key has weight exactly 1, so dq (and that key's share of dk) is
    exactly 0, as in eager softmax: Tq = Tk = 1; each query over one valid key; the first
    query of a causal pass. (The rule p * (dp - rowsum(dO * O)) leaves a ~1e-7 residue.)"""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    make = lambda *shape: torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)  # noqa: E731
    drop = dict(dropout_p=dropout_p, generator=torch.Generator().manual_seed(1))
    q, k, v, do = make(2, 2, 1, 64), make(2, 2, 1, 64), make(2, 2, 1, 64), make(2, 2, 1, 64)
    for causal in (True, False):
        _, dq, dk, dv = out_and_grads(lambda *a: attention(*a, causal=causal, **drop), (q, k, v), do)
        assert not dq.any() and not dk.any() and dv.any()
    q, do = make(2, 2, 9, 32), make(2, 2, 9, 32)
    k, v = make(2, 2, 20, 32), make(2, 2, 20, 32)
    one = torch.tensor([1, 1], device=DEVICE)
    for padding in ("right", "left"):
        _, dq, dk, _ = out_and_grads(
            lambda *a: attention(*a, causal=False, key_lens=one, padding=padding, **drop), (q, k, v), do)
        assert not dq.any() and not dk.any()
    q, k, v, do = make(1, 2, 21, 32), make(1, 2, 21, 32), make(1, 2, 21, 32), make(1, 2, 21, 32)
    _, dq, _, _ = out_and_grads(lambda *a: attention(*a, causal=True, **drop), (q, k, v), do)
    nonzero = lambda t: t.abs().amin(-1).gt(0).all() if dropout_p == 0 else t.any()  # noqa: E731
    assert not dq[:, :, 0].any() and nonzero(dq[:, :, 1:])
    # left padding, causal: keys from 4 and queries from 3 on; query 4 sees only key 4
    kl, ql = torch.tensor([17], device=DEVICE), torch.tensor([18], device=DEVICE)
    _, dq, _, _ = out_and_grads(lambda *a: attention(*a, causal=True, key_lens=kl, query_lens=ql,
                                                     padding="left", **drop), (q, k, v), do)
    assert not dq[:, :, :5].any() and nonzero(dq[:, :, 5:])


@pytest.mark.parametrize("shape_q,shape_kv", [
    ((1, 2, 0, 32), (1, 2, 5, 32)),  # no query
    ((0, 2, 7, 32), (0, 2, 7, 32)),  # no batch
    ((1, 0, 7, 32), (1, 0, 7, 32)),  # no head
])
def test_empty(shape_q, shape_kv):
    q = torch.randn(shape_q, device=DEVICE, requires_grad=True)
    k = torch.randn(shape_kv, device=DEVICE, requires_grad=True)
    v = torch.randn(shape_kv, device=DEVICE, requires_grad=True)
    out = attention(q, k, v, causal=shape_q[2] <= shape_kv[2])
    assert out.shape == shape_q
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.any()


# ------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tq,tk,d,dtype,causal,p", [
    (70, 70, 64, F16, True, 0.1),
    (17, 40, 48, BF16, False, 0.5),
    (33, 33, 32, F32, True, 0.3),
])
def test_dropout_matches_eager_with_kernel_mask(tq, tk, d, dtype, causal, p):
    """Forward and backward use one mask: the one attention_dropout_mask returns for the seed
    drawn from the generator. Eager softmax(s) * keep / (1-p) @ v obeys the flash rule."""
    assert_flash_rule((1, 2, tq, d), (1, 2, tk, d), dtype, causal, dropout_p=p, generator_seed=42)


def test_dropout_zero_is_no_dropout_and_draws_nothing():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 32, generator=gen, device=DEVICE) for _ in range(3))
    state = torch.get_rng_state()
    assert torch.equal(attention(q, k, v, dropout_p=0.0), attention(q, k, v))
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_seeded_runs_repeat():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 32, generator=gen, device=DEVICE) for _ in range(3))
    run = lambda s: attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(3)
    a = attention(q, k, v, dropout_p=0.3)  # default generator
    torch.manual_seed(3)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.3))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.3))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.75])
def test_dropout_keep_rate_and_independence(p):
    """The kept fraction is 1 - p within 5 standard errors (+-0.008 at p = 0.3: a wrong
    threshold, keeping p instead of 1 - p, or 8-bit draws would fail), and the 8 decisions of
    one Philox call, rows, columns and heads are not copies of each other."""
    B, H, T = 2, 2, 128
    keep = attention_dropout_mask(dropout_seed(torch.Generator().manual_seed(1)), B, H, T, T, p, DEVICE)
    assert keep.shape == (B, H, T, T) and keep.dtype == torch.bool
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    differ = 0.9 * 2 * p * (1 - p)  # two independent draws differ with probability 2p(1-p)
    for shift in (1, 8, 16):  # the columns that share a Philox call (c, c^1, c^8, c^16)
        assert (keep[..., shift:] != keep[..., :-shift]).float().mean() > differ
    per_head = keep.flatten(0, 1).float()
    for i in range(B * H):  # each (batch, head) has its own stream
        for j in range(i):
            assert (per_head[i] != per_head[j]).float().mean() > differ
    assert (keep[..., 1:, :] != keep[..., :-1, :]).float().mean() > differ  # consecutive rows
    again = attention_dropout_mask(dropout_seed(torch.Generator().manual_seed(1)), B, H, T, T, p, DEVICE)
    assert torch.equal(keep, again)


@triton.jit
def _philox_pair_kernel(Out, key, N: tl.constexpr):
    offs = tl.arange(0, N)
    ours = _philox4x32(offs, key)
    theirs = tl.randint4x(key, offs, PHILOX_ROUNDS)
    for i in tl.static_range(4):
        tl.store(Out + i * N + offs, ours[i].to(tl.int32, bitcast=True))
        tl.store(Out + (4 + i) * N + offs, theirs[i].to(tl.int32, bitcast=True))


def test_philox_is_tritons_randint4x():
    """The kernels' Philox4x32-7 (one wide multiply per product) is tl.randint4x with 7 rounds
    bit for bit."""
    out = torch.empty(8, 64, dtype=torch.int32, device=DEVICE)
    key = 123456789 + (77 << 32)
    _philox_pair_kernel[(1,)](out, key, N=64)
    assert torch.equal(out[:4], out[4:]) and out[:4].unique().numel() > 200


def test_dropout_mask_layout_and_quantised_p():
    """The documented mapping: column c of row r is half c % 2 of word 2 (c >> 4 & 1) +
    (c >> 3 & 1) of the Philox call r * 4 cdiv(Tk, 32) + (c >> 5) * 4 + (c >> 1 & 3), kept
    iff >= round(p * 2^16): rebuilt on the host from the Philox words of the test kernel."""
    Tq, Tk, p = 5, 70, 0.3
    seed = 1234
    n_groups = 4 * math.ceil(Tk / 32)
    out = torch.empty(8, 64, dtype=torch.int32, device=DEVICE)  # counters 0..63 >= Tq * n_groups
    _philox_pair_kernel[(1,)](out, seed + (1 << 32), N=64)  # key of (batch*head) index 1
    halves = torch.stack([(out[:4] & 0xFFFF), (out[:4] >> 16) & 0xFFFF], -1)  # (word, counter, half)
    r, c = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    word = 2 * (c >> 4 & 1) + (c >> 3 & 1)
    counter = r * n_groups + (c >> 5) * 4 + (c >> 1 & 3)
    expected = halves.cpu()[word, counter, c & 1] >= round(p * 65536)
    keep = attention_dropout_mask(seed, 1, 2, Tq, Tk, p, DEVICE)
    assert torch.equal(keep[0, 1].cpu(), expected)
    assert effective_dropout_p(0.1) == 6554 / 65536 and abs(effective_dropout_p(0.1) - 0.1) <= 2**-17
    assert effective_dropout_p(1 - 2**-20) == 65535 / 65536 and effective_dropout_p(1e-6) == 0.0


def test_dropout_masks_agree_across_kernels():
    """Forward, dK/dV and dQ apply attention_dropout_mask's mask bit for bit: with v = one-hot
    columns and dO = one-hot rows, out / dV expose the kept weights of the forward / dK/dV
    kernels, and dQ's kernel is checked through q = 0 (uniform weights)."""
    Tq, Tk, p, seed = 40, 72, 0.4, 11
    g = torch.Generator().manual_seed(seed)
    keep = attention_dropout_mask(dropout_seed(g), 1, 1, Tq, Tk, p, DEVICE)[0, 0]
    scale = 1 / (1 - effective_dropout_p(p))
    q = torch.zeros(1, 1, Tq, 128, device=DEVICE, requires_grad=True)
    k = torch.zeros(1, 1, Tk, 128, device=DEVICE, requires_grad=True)
    v = torch.zeros(1, 1, Tk, 128, device=DEVICE)
    v[0, 0, :, :Tk] = torch.eye(Tk, device=DEVICE)
    v.requires_grad_()
    run = lambda: attention(q, k, v, causal=False, dropout_p=p,  # noqa: E731
                            generator=torch.Generator().manual_seed(seed))
    out = run()
    weights = out[0, 0, :, :Tk] / scale * Tk  # uniform softmax 1/Tk, kept ones
    assert torch.equal(weights.round() > 0, keep) and (weights.round() - weights).abs().max() < 1e-3
    do = torch.zeros(1, 1, Tq, 128, device=DEVICE)
    do[0, 0, :, :Tq] = torch.eye(Tq, device=DEVICE)
    out.backward(do)
    dv_weights = v.grad[0, 0, :, :Tq].T / scale * Tk  # dV = (P * Z)^T dO
    assert torch.equal(dv_weights.round() > 0, keep)
    # dQ_i = scale * sum_j P_ij (dP_ij - delta_i) k_j; with k_j = e_(j mod 16) it is a sum of
    # masked terms that differs between masks: compare against eager with the exported mask.
    q2 = torch.randn(1, 1, Tq, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    k2 = torch.randn(1, 1, Tk, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
    v2 = torch.randn(1, 1, Tk, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    attention(q2, k2, v2, causal=False, dropout_p=p, generator=torch.Generator().manual_seed(seed)).sum().backward()
    q3, k3 = q2.detach().clone().requires_grad_(), k2.detach().clone().requires_grad_()
    eager_attention(q3, k3, v2, causal=False, keep=keep, dropout_p=effective_dropout_p(p)).sum().backward()
    torch.testing.assert_close(q2.grad, q3.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2.grad, k3.grad, atol=1e-5, rtol=1e-5)


def test_dropout_is_unbiased():
    """The mean over many independent masks is the no-dropout output, within 6 standard errors.

    The same (q, k, v) is repeated over N heads (each head draws its own mask); per output
    element the variance of one draw is p/(1-p) * sum_j w_ij^2 v_jd^2 for weights w.
    """
    p, N, T, D = 0.4, 96, 17, 16
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, D, generator=gen, device=DEVICE) for _ in range(3))
    out = attention(*(t.expand(1, N, T, D) for t in (q, k, v)), causal=True, dropout_p=p,
                    generator=torch.Generator().manual_seed(0))
    w = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~causal_mask(T, T), float("-inf")), -1)
    expected = w @ v
    std = (p / (1 - p) * (w.square() @ v.square())).sqrt()
    z = (out.mean(dim=1, keepdim=True) - expected) / (std / math.sqrt(N))
    assert z.abs().max() < 6, f"mean of dropout outputs is {z.abs().max():.1f} standard errors off"
    assert (out != expected).any()  # dropout did something


# ------------------------------------------------------------------------------------------
# Padding (per-row key/query lengths)
# ------------------------------------------------------------------------------------------


def valid_windows(lens, T, B, left):
    """(lo, hi) per batch row: the valid positions [lo, hi) for lengths ``lens`` (None: all)."""
    n = torch.full((B,), T) if lens is None else lens.cpu().long()
    return (T - n, torch.full((B,), T)) if left else (torch.zeros(B, dtype=torch.long), n)


def padded_mask(B, Tq, Tk, causal, key_lens, query_lens, left):
    """(B, 1, Tq, Tk) bool: which key each query sees; causal aligned on the valid windows."""
    q_lo, q_hi = valid_windows(query_lens, Tq, B, left)
    k_lo, k_hi = valid_windows(key_lens, Tk, B, left)
    i, j = torch.arange(Tq)[None, :, None], torch.arange(Tk)[None, None, :]
    mask = (i >= q_lo[:, None, None]) & (i < q_hi[:, None, None])
    mask = mask & (j >= k_lo[:, None, None]) & (j < k_hi[:, None, None])
    if causal:
        mask = mask & (j <= i + (k_hi - q_hi)[:, None, None])
    return mask[:, None].to(DEVICE)


def eager_masked_attention(q, k, v, mask, keep=None, dropout_p=0.0):
    """Masked softmax attention; a row that sees no key gives zeros (and zero gradients)."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    any_key = mask.any(-1, keepdim=True)
    s = torch.where(any_key, s.masked_fill(~mask, float("-inf")), torch.zeros_like(s))
    w = torch.softmax(s, dim=-1) * any_key
    if keep is not None:
        w = w * keep.to(w.dtype) / (1.0 - dropout_p)
    return w @ v


def assert_padded_rule(Tq, Tk, d, dtype, causal, padding, key_lens, query_lens, dropout_p=0.0, H=2):
    """The flash rule against eager masked softmax and float64, exact zeros at padded
    positions, and padded positions never read (NaN there changes nothing)."""
    B = len(key_lens if key_lens is not None else query_lens)
    left = padding == "left"
    kl = None if key_lens is None else torch.tensor(key_lens, device=DEVICE)
    ql = None if query_lens is None else torch.tensor(query_lens, device=DEVICE, dtype=torch.int32)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    q, do = (torch.randn(B, H, Tq, d, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, H, Tk, d, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    mask = padded_mask(B, Tq, Tk, causal, kl, ql, left)
    q_ok = mask.new_zeros(B, 1, Tq, 1) | valid_rows(ql, Tq, B, left)
    k_ok = mask.new_zeros(B, 1, Tk, 1) | valid_rows(kl, Tk, B, left)

    keep, kwargs = None, dict(causal=causal, key_lens=kl, query_lens=ql, padding=padding)
    if dropout_p > 0:
        keep = attention_dropout_mask(dropout_seed(torch.Generator().manual_seed(9)), B, H, Tq, Tk,
                                      dropout_p, device=DEVICE)
        kwargs.update(dropout_p=dropout_p, generator=torch.Generator().manual_seed(9))
    nan = float("nan")
    poisoned = [t.masked_fill(~ok, nan) for t, ok in ((q, q_ok), (k, k_ok), (v, k_ok))]
    kernel = out_and_grads(lambda *a: attention(*a, **kwargs), poisoned, do.masked_fill(~q_ok, nan))
    ref_fn = lambda *a: eager_masked_attention(*a, mask, keep, effective_dropout_p(dropout_p))  # noqa: E731
    eager = out_and_grads(ref_fn, (q, k, v), do * q_ok)
    ref = out_and_grads(ref_fn, [t.double() for t in (q, k, v)], (do * q_ok).double())
    for name, a, e, r, ok in zip(("out", "dq", "dk", "dv"), kernel, eager, ref, (q_ok, q_ok, k_ok, k_ok)):
        assert not a.masked_select(~ok).any(), f"{name}: padded positions must be exactly 0"
        assert_agrees(a, e, r, atol=slack(r, dtype), what=f"{name} ({dtype}, causal={causal}, {padding})")
    no_key = ~mask.any(-1, keepdim=True)
    assert not kernel[0].masked_select(no_key).any(), "a query that sees no key returns zeros"


def valid_rows(lens, T, B, left):
    lo, hi = valid_windows(lens, T, B, left)
    t = torch.arange(T)[None, :]
    return ((t >= lo[:, None]) & (t < hi[:, None]))[:, None, :, None].to(DEVICE)


# (Tq, Tk, head_dim, dtype, causal, padding, key_lens, query_lens): lengths 0, 1, T and odd
# ones across the interpreter's tile edges (16 / 32); queries before every valid key (right
# padding with more queries than keys); one query over a left-padded cache (a decode step).
PADDED_CASES = [
    (37, 37, 32, F16, True, "right", [37, 1, 0, 20], [37, 1, 5, 20]),
    (37, 37, 32, BF16, True, "left", [37, 1, 0, 20], [37, 1, 5, 20]),
    (33, 50, 48, F32, False, "right", [50, 1, 17, 0], [33, 0, 9, 3]),
    (33, 50, 48, F16, False, "left", [50, 1, 17, 0], [33, 0, 9, 3]),
    (40, 40, 16, F32, True, "right", [40, 10, 7, 1], [40, 25, 7, 1]),
    (20, 45, 64, BF16, True, "left", [45, 3, 30, 1], None),
    (33, 33, 24, F16, False, "right", None, [33, 17, 1, 0]),
    (1, 30, 64, F16, True, "left", [30, 1, 17, 0], None),
]


@pytest.mark.parametrize("tq,tk,d,dtype,causal,padding,key_lens,query_lens", PADDED_CASES)
def test_padded_flash_rule(tq, tk, d, dtype, causal, padding, key_lens, query_lens):
    assert_padded_rule(tq, tk, d, dtype, causal, padding, key_lens, query_lens)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_dropout_uses_the_exported_mask(padding):
    """Dropout with padding: the kernels apply attention_dropout_mask's mask (absolute
    positions) inside each row's valid window, forward and backward."""
    assert_padded_rule(35, 35, 32, F16, True, padding, [35, 18, 1, 0], [35, 18, 1, 3], dropout_p=0.3)


def test_full_lengths_are_no_padding():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(2, 2, 37, 32, generator=gen, device=DEVICE) for _ in range(3))
    full = torch.full((2,), 37, device=DEVICE)
    for padding in ("right", "left"):
        out = attention(q, k, v, key_lens=full, query_lens=full, padding=padding)
        assert torch.equal(out, attention(q, k, v))


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def _t(*shape, dtype=F32, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_t(2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), {}, ValueError, "q must be 4-D"),
    ((_t(1, 2, 8, 32), _t(2, 2, 8, 32), _t(2, 2, 8, 32)), {}, ValueError, "batch, heads and head_dim"),
    ((_t(1, 2, 8, 32), _t(1, 4, 8, 32), _t(1, 4, 8, 32)), {}, ValueError, "batch, heads and head_dim"),
    ((_t(1, 2, 8, 32), _t(1, 2, 8, 64), _t(1, 2, 8, 64)), {}, ValueError, "batch, heads and head_dim"),
    ((_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 9, 32)), {}, ValueError, "k and v must have the same shape"),
    ((_t(1, 2, 8, 8), _t(1, 2, 8, 8), _t(1, 2, 8, 8)), {}, ValueError, r"head_dim must be in \[16, 128\], got 8"),
    ((_t(1, 2, 8, 136), _t(1, 2, 8, 136), _t(1, 2, 8, 136)), {}, ValueError, "got 136"),
    ((_t(1, 2, 8, 32, dtype=F16), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), {}, TypeError, "share one dtype"),
    ((_t(1, 2, 8, 32, dtype=torch.float64),) * 3, {}, TypeError, "float32, float16 or bfloat16"),
    ((_t(1, 2, 9, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), {}, ValueError, "more queries"),
    ((_t(1, 2, 3, 32), _t(1, 2, 0, 32), _t(1, 2, 0, 32)), {"causal": False}, ValueError, "no keys"),
    ((_t(1, 2, 8, 32),) * 3, {"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
    ((_t(1, 2, 8, 32),) * 3, {"dropout_p": -0.1}, ValueError, "dropout_p"),
    ((_t(1, 2, 8, 32),) * 3, {"scale": float("nan")}, ValueError, "scale must be a finite number"),
    (("q", _t(1, 2, 8, 32), _t(1, 2, 8, 32)), {}, TypeError, "q must be a torch.Tensor"),
    ((_t(65536, 1, 0, 16),) * 3, {}, ValueError, "batch \\* heads must be at most 65535"),
])
def test_clear_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attention(*args, **kwargs)


_x = _t(2, 2, 8, 32)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"key_lens": [8, 8]}, TypeError, "key_lens must be a torch.Tensor or None"),
    ({"key_lens": torch.tensor([8.0, 8.0])}, TypeError, "key_lens must be int32 or int64"),
    ({"query_lens": torch.tensor([8, 8, 8])}, ValueError, r"query_lens must have shape \(batch,\) = \(2,\)"),
    ({"key_lens": torch.tensor([8, 8], device="meta")}, ValueError, "key_lens must be on q's device"),
    ({"padding": "middle"}, ValueError, "padding must be 'right' or 'left'"),
])
def test_clear_length_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attention(_x, _x, _x, **kwargs)


@pytest.mark.parametrize("name,lens", [("key_lens", [8, 9]), ("query_lens", [-1, 3])])
def test_length_values_are_checked_where_that_is_free(name, lens):
    """CPU lengths (q on CPU: the interpreter) must lie in [0, T]. CUDA lengths must be on q's
    device, where the kernels clamp them to [0, T] instead of reading them back (a host sync); a
    CPU tensor there gets the device error first: it is unusable whatever its values."""
    cpu = torch.tensor(lens)
    if not CUDA:
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 8\]"):
            attention(_x, _x, _x, **{name: cpu})
        return
    with pytest.raises(ValueError, match=f"{name} must be on q's device cuda:0, got cpu"):
        attention(_x, _x, _x, **{name: cpu})
    clamped = attention(_x, _x, _x, **{name: cpu.clamp(0, 8).to(DEVICE)})
    assert torch.equal(attention(_x, _x, _x, **{name: cpu.to(DEVICE)}), clamped)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(gptfast.kernels._common, "INTERPRETING", False)
    x = torch.randn(1, 2, 8, 32)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        attention(x, x, x)


@cuda_only
def test_mixed_devices_are_refused():
    x = torch.randn(1, 2, 8, 32, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        attention(x, x.cpu(), x)


# ------------------------------------------------------------------------------------------
# Realistic shapes (CUDA only)
# ------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("d", [16, 48, 64, 80, 96, 112, 128])
@pytest.mark.parametrize("t", [17, 97, 1000, 1023])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_rule_cuda(t, d, dtype, causal):
    assert_flash_rule((2, 3, t, d), (2, 3, t, d), dtype, causal)


@cuda_only
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_single_token_cuda(d, dtype, causal):
    """T = 1 (Triton specializes lengths equal to 1: a separate compile)."""
    assert_flash_rule((2, 3, 1, d), (2, 3, 1, d), dtype, causal)


@cuda_only
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_rule_cuda_long(d, dtype, causal):
    assert_flash_rule((1, 4, 4096, d), (1, 4, 4096, d), dtype, causal)


@cuda_only
@pytest.mark.parametrize("tq,tk,causal", [(1, 1000, True), (100, 1023, True), (257, 4096, False), (500, 1000, False)])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_q_shorter_than_k_cuda(tq, tk, causal, dtype):
    assert_flash_rule((2, 4, tq, 64), (2, 4, tk, 64), dtype, causal)


@cuda_only
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("d", [64, 80])
def test_gpt_block_layout_with_dropout_cuda(dtype, d):
    """(B, T, H, D) views as a GPT block makes them, causal, dropout 0.1, 1000 tokens."""
    to_bhtd = lambda t: t.transpose(1, 2)  # noqa: E731
    assert_flash_rule((4, 1000, 12, d), (4, 1000, 12, d), dtype, True, view=to_bhtd,
                      dropout_p=0.1, generator_seed=3)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation for A100 (sm_80) and H100 (sm_90)
# ------------------------------------------------------------------------------------------


_TTIR_PRODUCTS = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gptfast.kernels.attention import aot_configs
for cfg in aot_configs():
    if not re.match(r"(fwd|dkdv|dq)-bf16-d(32|64)-.*dropout0|preprocess-bf16-d64", cfg["name"]):
        continue
    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"],
                    attrs=cfg["attrs"])
    ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
    consts = set(re.findall(r"(%[\\w.]+) = arith.constant", ttir))
    for line in ttir.splitlines():
        if "arith.muli" in line:
            operands = re.findall(r"%[\\w.]+", line.split("=", 1)[1])
            const = "const" if consts.intersection(operands) else "var"
            print(cfg["name"], const, line.split("loc(")[0].strip())
"""


def test_row_offsets_are_64_bit():
    """Every product that scales a row index by a stride is int64 in the compiled kernels
    (TTIR of fwd, dK/dV, dQ, preprocess): T x row stride may pass 2^31 elements. The only
    int32 products left are scalar tile counts times a tile size."""
    import os
    import subprocess

    from gptfast.kernels.testing import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _TTIR_PRODUCTS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    products = proc.stdout.splitlines()
    kernels_seen = {line.split("-")[0] for line in products}
    assert kernels_seen == {"fwd", "dkdv", "dq", "preprocess"}, kernels_seen
    for line in products:
        narrow = re.search(r": (tensor<[0-9x]+xi32>|i32)$", line)
        assert not narrow or (" const " in line and line.endswith(": i32")), f"32-bit product: {line}"


def test_aot_configs_need_the_compiler():
    if not kernels._common.INTERPRETING:
        pytest.skip("only meaningful under the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot_configs()


# ------------------------------------------------------------------------------------------
# The model's use of the layout
# ------------------------------------------------------------------------------------------


def test_model_attention_output_is_not_copied():
    """MultiHeadAttention hands the kernel's (B, H, T, D) output, (B, T, H, D)-strided, to its
    output projection as a (B, T, H*D) view: no layout copy between attention and out_proj."""
    from gptfast.model import MultiHeadAttention

    mha = MultiHeadAttention(32, 32, 16, 0.0, num_heads=2).to(DEVICE)
    mha.kernels = "triton"
    seen = {}
    mha.out_proj.register_forward_pre_hook(lambda _, args: seen.update(context=args[0]))
    real = kernels.attention
    kernels.attention = lambda *a, **kw: seen.setdefault("out", real(*a, **kw))
    try:
        mha(torch.randn(2, 11, 32, device=DEVICE))
    finally:
        kernels.attention = real
    assert seen["context"].data_ptr() == seen["out"].data_ptr()
    assert seen["context"].untyped_storage().data_ptr() == seen["out"].untyped_storage().data_ptr()
