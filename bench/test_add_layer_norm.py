"""Fused residual add + LayerNorm: ``h = x + residual; y = LayerNorm(h)``, returning (y, h).

Ours (one Triton kernel each way) vs eager (an add, then F.layer_norm) and torch.compile of the
eager pair (which fuses them too). Throughput is GB/s over ``add_layer_norm_bytes``: the bytes
of the fused op, so eager's number is an effective bandwidth that shows what fusion saves.
"""

import pytest
import torch.nn.functional as F

from bench._metrics import DTYPES, MODES, add_layer_norm_bytes
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

OP = "add_layer_norm"
ROWS = 8 * 1024
WIDTHS = (768, 1024, 1280, 1600, 4096, 8192, 16384)
QUICK_WIDTHS = (768, 8192)
PROVIDERS = ("eager", "triton", "compile")  # the baseline first
EPS = 1e-5
IN, OUT = ("x", "residual", "weight", "bias"), ("y", "h")


def gpu_cases(quick: bool) -> list[Case]:
    return [
        Case(OP, provider, f"{ROWS}x{N}", {"M": ROWS, "N": N}, dtype, mode)
        for N in (QUICK_WIDTHS if quick else WIDTHS)
        for dtype in (("bf16",) if quick else ("fp32", "fp16", "bf16"))
        for mode in MODES
        for provider in PROVIDERS
    ]


def eager(x, residual, weight, bias):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, EPS), h


def provider(name: str):
    """The forward of a provider: (x, residual, weight, bias) -> (y, h)."""
    if name == "eager":
        return eager
    if name == "compile":
        return compiled(eager)
    if name == "triton":
        add_layer_norm = optional("gptfast.kernels.layer_norm", "add_layer_norm")
        return lambda x, residual, weight, bias: add_layer_norm(x, residual, weight, bias, EPS)
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(M, N, dtype, device):
    """x, residual, weight, bias; and the gradients dy (of y) and dh (of the residual stream)."""
    g = seeded(device)
    x = randn((M, N), dtype, g)
    residual = randn((M, N), dtype, g, shift=0.5)
    weight = randn((N,), dtype, g, scale=0.1, shift=1.0)
    bias = randn((N,), dtype, g, scale=0.1)
    return [x, residual, weight, bias], [randn((M, N), dtype, g), randn((M, N), dtype, g)]


def check(values, inputs, grads, dtype):
    """Compare a provider's values with eager's (same dtype) against float64."""
    return check_against_eager(values, eager, inputs, IN, OUT, grads, dtype)


def test_add_layer_norm(benchmark, case, device_limits, device):
    forward = provider(case.provider)
    dtype = DTYPES[case.dtype]
    M, N = case.params["M"], case.params["N"]
    inputs, grads = make_inputs(M, N, dtype, device)
    grads_if = None if case.mode == "fwd" else grads
    run_gpu_case(
        benchmark,
        case,
        timed=lambda name: mode_fn(provider(name), inputs, grads, case.mode),
        check=lambda: check(evaluate(forward, inputs, IN, OUT, grads_if), inputs, grads_if, dtype),
        metric="GB/s",
        amount=add_layer_norm_bytes(M, N, dtype.itemsize, case.mode),
    )


@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_add_layer_norm_interpreter(benchmark, dtype):
    """Small odd shape, forward and backward, under the Triton interpreter on CPU."""
    M, N = 37, 200
    case = Case(OP, "triton", f"{M}x{N}", {"M": M, "N": N}, dtype, "fwd+bwd")
    forward = provider("triton")
    inputs, grads = make_inputs(M, N, DTYPES[dtype], "cpu")
    run_interpreter_case(
        benchmark,
        case,
        run=lambda: evaluate(forward, inputs, IN, OUT, grads),
        check=lambda values: check(values, inputs, grads, DTYPES[dtype]),
    )
