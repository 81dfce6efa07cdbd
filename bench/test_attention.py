"""Attention on (B, H, T, D) tensors: our flash attention (Triton) vs the book chapter's eager
attention (a materialised T x T score matrix), torch SDPA (default backend and the flash
backend) and torch.compile of the chapter's attention.

B is chosen to keep B x T = 16k tokens. Throughput is TFLOP/s over ``attention_flops``
(4·B·H·T²·D forward, halved when causal; backward 2.5x the forward).
Agreement is checked on the first two heads of the first batch element (every (batch, head)
is independent), so the float64 reference stays small at long lengths.
"""

import pytest
import torch
import torch.nn.functional as F

from bench._metrics import DTYPES, MODES, attention_flops
from bench._providers import compiled, optional, randn, seeded
from bench._runner import (
    BENCH_MARK,
    INTERPRETER_ONLY,
    Case,
    check_against_eager,
    evaluate,
    mode_fn,
    run_gpu_case,
    run_interpreter_case,
)

pytestmark = BENCH_MARK

OP = "attention"
TOKENS = 16 * 1024
LENGTHS = (512, 1024, 2048, 4096, 8192)
PROVIDERS = ("eager", "triton", "sdpa", "sdpa_flash", "compile")  # the baseline first
IN, OUT = ("q", "k", "v"), ("o",)
CHECKED = (slice(0, 1), slice(0, 2))  # (batch, heads) compared with float64


def _configs(quick: bool):
    """(H, D, T, causal, dtype): a length sweep and, at T=2048, a heads sweep."""
    if quick:
        return [(12, 64, T, True, "bf16") for T in (1024, 4096)]
    lengths = [
        (H, D, T, causal, dtype)
        for H, D in ((12, 64), (16, 128))
        for T in LENGTHS
        for causal in (True, False)
        for dtype in ("fp16", "bf16")
    ]
    heads = [(H, 64, 2048, True, "bf16") for H in (16, 20, 25)]
    return lengths + heads


def gpu_cases(quick: bool) -> list[Case]:
    cases = []
    for H, D, T, causal, dtype in _configs(quick):
        B = max(1, TOKENS // T)
        shape = f"B{B} H{H} T{T} D{D} {'causal' if causal else 'full'}"
        params = {"B": B, "H": H, "T": T, "D": D, "causal": causal}
        for mode in MODES:
            cases += [Case(OP, p, shape, params, dtype, mode) for p in PROVIDERS]
    return cases


def causal_mask(Tq, Tk, device):
    """True where a query may not look: keys after it (aligned bottom-right when Tq < Tk)."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).triu(Tk - Tq + 1)


def chapter_attention(q, k, v, mask):
    """The book chapter's attention math on (B, H, T, D): masked softmax of the full scores."""
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        scores.masked_fill_(mask, -torch.inf)
    weights = torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)
    return (weights @ v,)


def provider(name: str, causal: bool, Tq: int, Tk: int, device):
    """The forward of a provider for one mask: (q, k, v) -> (o,)."""
    if name in ("eager", "compile"):
        mask = causal_mask(Tq, Tk, device) if causal else None  # the chapter's buffer
        fn = chapter_attention if name == "eager" else compiled(chapter_attention)
        return lambda q, k, v: fn(q, k, v, mask)
    if name == "triton":
        attention = optional("gptfast.kernels.attention", "attention")
        return lambda q, k, v: (attention(q, k, v, causal=causal),)
    if name == "sdpa":
        return lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, is_causal=causal),)
    if name == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return (F.scaled_dot_product_attention(q, k, v, is_causal=causal),)

        return flash
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(B, H, T, D, dtype, device):
    g = seeded(device)
    qkv = [randn((B, H, T, D), dtype, g) for _ in range(3)]
    return qkv, [randn((B, H, T, D), dtype, g)]


def check(values, inputs, grads, causal, dtype):
    """Compare a provider's values with the chapter's eager attention (same dtype) against
    float64, both computed on ``inputs`` (already restricted to the checked heads)."""
    Tq, Tk = inputs[0].shape[-2], inputs[1].shape[-2]
    eager = provider("eager", causal, Tq, Tk, inputs[0].device)
    return check_against_eager(values, eager, inputs, IN, OUT, grads, dtype)


def test_attention(benchmark, case, device_limits, device):
    p = case.params
    B, H, T, D, causal = p["B"], p["H"], p["T"], p["D"], p["causal"]
    forward = provider(case.provider, causal, T, T, device)
    dtype = DTYPES[case.dtype]
    inputs, grads = make_inputs(B, H, T, D, dtype, device)
    grads_if = None if case.mode == "fwd" else grads

    def agreement():
        values = evaluate(forward, inputs, IN, OUT, grads_if)
        values = {name: v[CHECKED] for name, v in values.items()}
        sub = [t[CHECKED] for t in inputs]
        return check(values, sub, grads_if and [g[CHECKED] for g in grads_if], causal, dtype)

    run_gpu_case(
        benchmark,
        case,
        timed=lambda name: mode_fn(provider(name, causal, T, T, device), inputs, grads, case.mode),
        check=agreement,
        metric="TFLOP/s",
        amount=attention_flops(B, H, T, T, D, causal, case.mode),
    )


@INTERPRETER_ONLY
@pytest.mark.parametrize(
    "B, H, T, D, causal, dtype",
    [(1, 2, 70, 32, True, "fp16"), (2, 1, 45, 64, False, "bf16")],
)
def test_attention_interpreter(benchmark, B, H, T, D, causal, dtype):
    """Small odd lengths, forward and backward, under the Triton interpreter on CPU."""
    shape = f"B{B} H{H} T{T} D{D} {'causal' if causal else 'full'}"
    params = {"B": B, "H": H, "T": T, "D": D, "causal": causal}
    case = Case(OP, "triton", shape, params, dtype, "fwd+bwd")
    forward = provider("triton", causal, T, T, "cpu")
    inputs, grads = make_inputs(B, H, T, D, DTYPES[dtype], "cpu")
    run_interpreter_case(
        benchmark,
        case,
        run=lambda: evaluate(forward, inputs, IN, OUT, grads),
        check=lambda values: check(values, inputs, grads, causal, DTYPES[dtype]),
    )
