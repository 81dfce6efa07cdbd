"""gptfast.kernels.linear against F.linear (+ the tanh GELU) in float64 (the 2x rule).

The kernel takes at most MAX_ROWS rows in inference; everything else is F.linear itself. Small
shapes: on CPU the kernel runs in Triton's interpreter (which rounds fp32 -> bf16 toward zero,
GPUs to nearest: one more unit in the last place of slack for bf16 there).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from gptfast.kernels import linear
from gptfast.kernels.testing import assert_agrees

lin = importlib.import_module("gptfast.kernels.linear")  # the module, not the function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(rows, n, k, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = rows if isinstance(rows, tuple) else (rows,)
    x = torch.randn(*shape, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    return (t if t is None else t.to(DEVICE, dtype) for t in (x, w, b))


def reference(x, w, b, activation, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    out = F.linear(cast(x), cast(w), cast(b))
    return F.gelu(out, approximate="tanh") if activation else out


def slack(ref, dtype):
    ulps = 2 if (DEVICE == "cpu" and dtype == torch.bfloat16) else 1
    return ulps * torch.finfo(dtype).eps * ref.abs().max().item()


def launches(monkeypatch) -> list:
    """The grids of the kernel's launches from now on."""
    calls = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def config(self, **kw):
            return self.kernel.config(**kw)

        def __call__(self, config, grid, *args):
            calls.append(grid)
            return self.kernel(config, grid, *args)

    monkeypatch.setattr(lin, "_LINEAR", Counted(lin._LINEAR))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, k", [(1, 48, 40), (3, 100, 77), (16, 64, 512), (5, 33, 256),
                                        ((2, 1), 96, 768)])
@pytest.mark.parametrize("bias, activation", [(True, None), (True, "gelu_tanh"), (False, None)])
def test_matches_f_linear(monkeypatch, dtype, rows, n, k, bias, activation):
    calls = launches(monkeypatch)
    check_linear(rows, n, k, dtype, bias, activation)
    assert calls == [(-(-n // 16),)], "the kernel ran, once, over the output features"


def check_linear(rows, n, k, dtype, bias, activation):
    """The op against float64 by the 2x rule (and its output's dtype and shape)."""
    x, w, b = make(rows, n, k, dtype, bias)
    with torch.no_grad():
        out = linear(x, w, b, activation)
    eager = reference(x, w, b, activation)
    ref = reference(x, w, b, activation, torch.float64)
    assert out.dtype == dtype and out.shape == eager.shape
    assert_agrees(out, eager, ref, atol=slack(ref, dtype))


def test_the_device_table_picks_the_tiles_or_f_linear(monkeypatch):
    """A tuning table's entry for the call's class (dtype, one row or more) sets the tiles, or
    "kernel": 0, F.linear itself (what bench/tune.py measures against)."""
    from gptfast.kernels import tuning

    calls = launches(monkeypatch)
    wide = {**lin.STATIC, "block_n": 32}
    with tuning.use({lin.KERNEL: {"fp32-m1": wide}}):
        check_linear(1, 100, 64, torch.float32, True, None)
        check_linear(3, 100, 64, torch.float32, True, None)  # another class: the static tiles
    assert calls == [(4,), (7,)]
    calls.clear()
    x, w, b = make(1, 100, 64, torch.float32)
    with tuning.use({lin.KERNEL: {"fp32-m1": {**lin.STATIC, "kernel": 0}}}), torch.no_grad():
        assert torch.equal(linear(x, w, b, "gelu_tanh"), reference(x, w, b, "gelu_tanh"))
    assert calls == []


def test_strided_rows_and_determinism(monkeypatch):
    x, w, b = make(6, 40, 64, torch.float32)
    x = x[::2]  # every other row: a row stride of 2 x 64
    with torch.no_grad():
        first, second = linear(x, w, b, "gelu_tanh"), linear(x, w, b, "gelu_tanh")
    assert torch.equal(first, second)
    ref = reference(x, w, b, "gelu_tanh", torch.float64)
    assert_agrees(first, reference(x, w, b, "gelu_tanh"), ref, atol=slack(ref, torch.float32))


def test_beyond_the_kernel_it_is_f_linear(monkeypatch):
    """More rows, gradients, a transposed weight, autocast: F.linear's own result (and its
    autograd), no launch."""
    calls = launches(monkeypatch)
    x, w, b = make(lin.MAX_ROWS + 1, 32, 48, torch.float32)
    with torch.no_grad():
        assert torch.equal(linear(x, w, b, "gelu_tanh"), reference(x, w, b, "gelu_tanh"))
    leaf = x[:2].clone().requires_grad_()
    out = linear(leaf, w, b)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, w.sum(0).expand(2, -1))
    wt = w.t().contiguous().t()  # column-major rows
    with torch.no_grad():
        assert torch.equal(linear(x[:2], wt, b), F.linear(x[:2], wt, b))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            assert torch.equal(linear(x[:2], w, b), F.linear(x[:2], w, b))
    assert calls == []


def _inputs(**change):
    args = {"x": torch.randn(2, 8), "weight": torch.randn(4, 8), "bias": torch.randn(4),
            "activation": None, **change}
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("change, error, match", [
    ({"weight": None}, TypeError, "linear: weight must be a torch.Tensor, got NoneType"),
    ({"activation": "tanh"}, ValueError, r"activation must be one of \(None, 'gelu_tanh'\), got 'tanh'"),
    ({"weight": torch.randn(4, 9)}, ValueError,
     r"weight must have shape \(out_features, 8\) for x of shape \(2, 8\), got \(4, 9\)"),
    ({"bias": torch.randn(3)}, ValueError, r"bias must have shape \(4,\), got \(3,\)"),
    ({"weight": torch.randn(4, 8).half()}, TypeError,
     "x, weight and bias must have one dtype, got torch.float16, torch.float32"),
    ({"x": torch.ones(2, 8, dtype=torch.long)}, TypeError,
     "linear: x must be float32, float16 or bfloat16, got torch.int64"),
])
def test_bad_input_is_named_before_anything_runs(monkeypatch, change, error, match):
    calls = launches(monkeypatch)
    with pytest.raises(error, match=match), torch.no_grad():
        linear(**_inputs(**change))
    assert calls == []


def test_the_gelu_epilogue_is_the_linear_layer_and_gelu_in_one_product():
    """More rows than the kernel takes, in inference on CUDA: one cuBLASLt GEMM with the GELU
    in its epilogue (``_linear_gelu``). Its wiring (the bias, the weight's transpose, leading
    dimensions, strided rows) against F.gelu of F.linear with the GELU torch's _addmm_activation
    takes on this device (the tanh one on CUDA, the chapter's; the exact one on CPU, which is why
    the op takes it on CUDA only)."""
    x, w, b = make((4, 9), 40, 48, torch.float64)
    x = x[:, ::2]
    approximate = "tanh" if DEVICE == "cuda" else "none"
    torch.testing.assert_close(lin._linear_gelu(x, w, b), F.gelu(F.linear(x, w, b), approximate=approximate))
    with torch.no_grad():  # on CPU the op itself is F.linear then the tanh GELU at 4 x 5 rows
        torch.testing.assert_close(linear(x.float(), w.float(), b.float(), "gelu_tanh"),
                                   reference(x, w, b, "gelu_tanh").float(), rtol=1e-5, atol=1e-6)
