"""Fused linear + cross-entropy (the training loss over GPT-2's vocabulary): ours vs eager
``F.cross_entropy(F.linear(h, W).float(), t)``, torch.compile of it, and Liger-Kernel's fused op.

Tokens 2k ... 16k x vocab 50,257 x d 768 / 1024 / 1600 (GPT-2 small, medium, XL), bf16 and fp32,
forward (no autograd graph: the loss only) and forward + backward (loss, grad of hidden and of
the weight). 5% of the targets are ignore_index. TFLOP/s counts the matmuls every provider must
do (2·N·V·d forward, 3x that with the backward), so an unfused provider's number is effective.
Each record also carries ``peak_extra_mib``: ``torch.cuda.max_memory_allocated`` during one call
minus what was allocated before it (inputs and weights excluded; the gradients included).
Agreement of the loss and both gradients with float64, next to eager's (2x rule).
"""

import pytest
import torch
import torch.nn.functional as F

from bench._metrics import DTYPES
from bench._providers import compiled, liger_fused_linear_cross_entropy, optional, randn, seeded
from bench._runner import (
    BENCH_MARK,
    INTERPRETER_ONLY,
    RECORDS,
    Case,
    check_against_eager,
    evaluate,
    mode_fn,
    run_gpu_case,
    run_interpreter_case,
)

pytestmark = BENCH_MARK

OP = "linear_cross_entropy"
VOCAB = 50257
TOKENS = (2048, 4096, 8192, 16384)
WIDTHS = (768, 1024, 1600)
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "triton", "compile", "liger")  # the baseline first
IN, OUT = ("hidden", "weight"), ("loss",)


def gpu_cases(quick: bool) -> list[Case]:
    shapes = [(8192, 768)] if quick else [(n, d) for n in TOKENS for d in WIDTHS]
    return [
        Case(OP, provider, f"{n}x{VOCAB}x{d}", {"N": n, "V": VOCAB, "d": d}, dtype, mode)
        for n, d in shapes
        for dtype in (("bf16",) if quick else ("bf16", "fp32"))
        for mode in MODES
        for provider in PROVIDERS
    ]


def flops(N: int, V: int, d: int, mode: str) -> int:
    """The logits matmul (2·N·V·d), and with the backward the grad-hidden and grad-weight ones."""
    return 2 * N * V * d * (3 if mode == "fwd+bwd" else 1)


def eager(hidden, weight, targets):
    """The unfused pair; float64 inputs stay float64 (the reference)."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (F.cross_entropy(logits, targets),)


def provider(name: str):
    """The forward of a provider: (hidden, weight, targets) -> (loss,)."""
    if name == "eager":
        return eager
    if name == "compile":
        return compiled(eager)
    if name == "triton":
        fused = optional("gptfast.kernels", "linear_cross_entropy")
        return lambda hidden, weight, targets: (fused(hidden, weight, targets),)
    if name == "liger":
        liger = liger_fused_linear_cross_entropy()
        return lambda hidden, weight, targets: (liger(hidden, weight, targets),)
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(N, V, d, dtype, device):
    """hidden (a final-norm output: unit scale), weight (GPT-2's init scale), targets with 5%
    ignored; and the loss's upstream gradient."""
    g = seeded(device)
    hidden = randn((N, d), dtype, g)
    weight = randn((V, d), dtype, g, scale=0.02 * 8)  # logits of order 1-5, as in training
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    targets[torch.rand(N, generator=g, device=device) < 0.05] = -100
    return [hidden, weight], targets, [torch.ones((), device=device)]


def bound(forward, targets):
    """forward with the targets bound: (hidden, weight) -> (loss,)."""
    return lambda hidden, weight: forward(hidden, weight, targets)


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def test_linear_cross_entropy(benchmark, case, device_limits, device):
    dtype = DTYPES[case.dtype]
    N, V, d = case.params["N"], case.params["V"], case.params["d"]
    inputs, targets, grads = make_inputs(N, V, d, dtype, device)
    grads_if = None if case.mode == "fwd" else grads
    forward = bound(provider(case.provider), targets)
    peak = {}

    def timed(name):
        fn = mode_fn(bound(provider(name), targets), inputs, grads, case.mode)
        if name == case.provider:
            peak["bytes"] = peak_extra_bytes(fn)
        return fn

    written = len(RECORDS)
    try:
        run_gpu_case(
            benchmark,
            case,
            timed=timed,
            check=lambda: check_against_eager(evaluate(forward, inputs, IN, OUT, grads_if),
                                              bound(eager, targets), inputs, IN, OUT, grads_if, dtype),
            metric="TFLOP/s",
            amount=flops(N, V, d, case.mode),
        )
    finally:  # also when our provider's agreement failed the case after recording it
        if len(RECORDS) > written and "bytes" in peak:
            RECORDS[-1]["peak_extra_mib"] = peak["bytes"] / 2**20
            benchmark.extra_info["peak_extra_mib"] = peak["bytes"] / 2**20


@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_linear_cross_entropy_interpreter(benchmark, dtype):
    """Small odd shape (37 tokens, vocab 1000, d 48), forward and backward, under the Triton
    interpreter on CPU."""
    N, V, d = 37, 1000, 48
    case = Case(OP, "triton", f"{N}x{V}x{d}", {"N": N, "V": V, "d": d}, dtype, "fwd+bwd")
    inputs, targets, grads = make_inputs(N, V, d, DTYPES[dtype], "cpu")
    run_interpreter_case(
        benchmark,
        case,
        run=lambda: evaluate(bound(provider("triton"), targets), inputs, IN, OUT, grads),
        check=lambda values: check_against_eager(values, bound(eager, targets), inputs, IN, OUT,
                                                 grads, DTYPES[dtype]),
    )
