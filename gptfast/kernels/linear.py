"""A linear layer for a decode step's few rows: ``F.linear`` (+ the tanh GELU) in one kernel.

``linear(x, weight, bias=None, activation=None)`` is ``F.linear(x, weight, bias)``, followed by
``F.gelu(..., approximate="tanh")`` with ``activation="gelu_tanh"``, for x (..., K), weight
(N, K), bias (N,). With at most ``MAX_ROWS`` = 16 rows (a decode step's tokens: batch x new
tokens), in inference, one Triton launch computes it (``_linear_kernel``): the bias and the
GELU in its epilogue, on the fp32 sums, rounded once. What it replaces at one row is two or
three CUDA kernels per layer: torch does not take cuBLASLt for a 1-row product (its rule wants
both matrices at least 2 x 2), so a biased ``F.linear`` is a copy of the bias into the output and
a GEMM that adds to it, and the GELU a kernel of its own. Each launch there is a few
microseconds of a ~58 µs token (GPT-2 124M's weights at the H200's bandwidth), so the count
decides; the kernel itself streams the weight once, as cuBLAS's GEMV does.

More rows in inference on CUDA, with the GELU and a bias, are one cuBLASLt GEMM with the GELU
in its epilogue (``torch._addmm_activation``: on CUDA the tanh GELU; torch's CPU version takes
the exact one, so not on CPU): one kernel and one pass over the activations less than F.linear
then F.gelu, the GELU taken on the fp32 accumulator before the one rounding.

Whether the kernel or F.linear serves a class (a dtype, one row or 2-16) is a device tuning
table's to say (kernel ``linear.rows``, ``"kernel": 0`` for F.linear): ``bench/tune.py`` times
both at GPT-2's decode products; without a table, the kernel.

Elsewhere it is ``F.linear`` (and ``F.gelu``) itself: gradients needed (autograd through torch:
the kernel has no backward), autocast (F.linear's casts), torch.compile or any trace (Inductor
fuses the epilogue itself), a weight whose rows are not contiguous, or a device where the
kernels do not launch. The results are F.linear's up to the order of the fp32 sums and the one
rounding (the 2x rule of tests/test_linear.py).
"""

import torch
import torch.nn.functional as F

from gptfast.kernels import tuning
from gptfast.kernels._common import (
    FLOAT_DTYPES, Kernel, Launch, _traced, cdiv, check_device, check_float, launches_on,
    on_device, plan_cache,
)
from gptfast.kernels.linear_kernels import _linear_kernel

_OP = "linear"
MAX_ROWS = 16  # the kernel's row block: at most this many rows take it
ACTIVATIONS = (None, "gelu_tanh")
_BLOCK_K = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}  # 512 B of a row a step
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

_LINEAR = Kernel(_linear_kernel)

# The tuning tables' name, classes ("bf16-m1": one row, where torch launches a bias copy and a
# GEMM; "bf16-m16": 2 to 16 rows, cuBLASLt's one kernel) and space: the kernel's tiles, or
# "kernel": 0, F.linear itself, so that a GPU's bench/tune.py run decides per class which is
# faster. Default: 16 features a program, 4 warps, 4 stages in flight (K in steps of 512 bytes
# of each weight row: 16-byte loads; 49 KiB of shared memory, 4 programs an SM).
KERNEL = "linear.rows"
STATIC = {"kernel": 1, "block_n": 16, "num_warps": 4, "num_stages": 4}
TUNING_SPACE = {f"{t}-m{rows}": [STATIC, {**STATIC, "block_n": 32}, {**STATIC, "kernel": 0}]
                for t in _TYPES.values() for rows in (1, MAX_ROWS)}
tuning.register(KERNEL, TUNING_SPACE)


@plan_cache
def _plan(device: torch.device, dtype: torch.dtype, one_row: bool, n: int, k: int, bias: bool,
          gelu: bool):
    """(config, grid) of one call's shapes, or None where the device's table says F.linear."""
    cfg = tuning.lookup(KERNEL, f"{_TYPES[dtype]}-m{1 if one_row else MAX_ROWS}", device) or STATIC
    if not cfg["kernel"]:
        return None
    launch = Launch(MAX_ROWS, cfg["block_n"], cfg["num_warps"], cfg["num_stages"])
    block_k = _BLOCK_K[dtype]
    config = _LINEAR.config(HAS_BIAS=bias, GELU=gelu, EVEN_N=n % launch.block_n == 0,
                            EVEN_K=k % block_k == 0, BLOCK_M=launch.block_m,
                            BLOCK_N=launch.block_n, BLOCK_K=block_k,
                            num_warps=launch.num_warps, num_stages=launch.num_stages)
    return config, (cdiv(n, launch.block_n),)


def _check(x, weight, bias, activation) -> None:
    """Every input problem named in Python, before anything runs (on either path). The common
    case (plain tensors of one float dtype and device, matching shapes) is a few attribute
    reads: a decode step makes four calls a layer."""
    if (type(x) is torch.Tensor and type(weight) is torch.Tensor and activation in ACTIVATIONS
            and x.dtype in FLOAT_DTYPES and weight.dtype is x.dtype and weight.dim() == 2
            and x.dim() > 0 and weight.shape[1] == x.shape[-1] and weight.device == x.device
            and (bias is None or (type(bias) is torch.Tensor and bias.dtype is x.dtype
                                  and bias.shape == weight.shape[:1] and bias.device == x.device))):
        return
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if (t is not None or name != "bias") and not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() == 0 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{_OP}: weight must have shape (out_features, {x.shape[-1] if x.dim() else 'K'})"
                         f" for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{_OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_float(_OP, x=x, weight=weight, bias=bias)
    if weight.dtype is not x.dtype or (bias is not None and bias.dtype is not x.dtype):
        dtypes = sorted({str(t.dtype) for t in (x, weight, bias) if t is not None})
        raise TypeError(f"{_OP}: x, weight and bias must have one dtype, got {', '.join(dtypes)}")
    check_device(_OP, x=x, weight=weight, bias=bias)


def _inference(x, weight, bias) -> bool:
    """No autograd, no autocast, no trace: what both fused paths need."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not (_traced() or torch.is_autocast_enabled("cuda" if x.is_cuda else x.device.type))


def _linear_gelu(x, weight, bias) -> torch.Tensor:
    """GELU(x @ weight^T + bias) as one cuBLASLt GEMM with the GELU in its epilogue (torch takes
    cuBLASLt for at least 2 rows: one row is a GEMM, then torch's GELU kernel; tanh on CUDA,
    erf on CPU)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then the tanh GELU if ``activation="gelu_tanh"``; one Triton
    kernel for at most MAX_ROWS rows in inference, cuBLASLt's GELU epilogue for more on CUDA,
    F.linear (and F.gelu) otherwise (see the module's docstring). x (..., K), weight (N, K), bias
    (N,) or None, one float dtype and device. Returns (..., N) in x's dtype."""
    _check(x, weight, bias, activation)
    gelu = activation == "gelu_tanh"
    k, n = x.shape[-1], weight.shape[0]
    m = x.numel() // k if k else 0
    inference = _inference(x, weight, bias)
    plan = None
    if inference and 0 < m <= MAX_ROWS and weight.stride(1) == 1 and launches_on(x):
        plan = _plan(x.device, x.dtype, m == 1, n, k, bias is not None, gelu)
    if plan is None:
        if gelu and inference and bias is not None and x.is_cuda:
            return _linear_gelu(x, weight, bias)
        out = F.linear(x, weight, bias)
        return F.gelu(out, approximate="tanh") if gelu else out
    if x.is_contiguous():  # rows in place
        rows, stride = x, k
    else:
        rows = x.reshape(-1, k)
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        stride = rows.stride(0)
    y = x.new_empty((*x.shape[:-1], n))  # (x's dtype and device)
    config, grid = plan
    with on_device(x.device):  # (y stands in for an absent bias: HAS_BIAS off, never read)
        _LINEAR(config, grid, (rows, weight, y if bias is None else bias, y),
                (m, n, k, stride, weight.stride(0), n))
    return y


# ---- ahead-of-time compile configs -----------------------------------------------------------

# GPT-2 124M's decode-step products (N, K, bias, gelu): QKV, out_proj, the MLP's two, the head
_GPT2 = {"qkv": (2304, 768, True, False), "out_proj": (768, 768, True, False),
         "fc1": (3072, 768, True, True), "fc2": (768, 3072, True, False),
         "head": (50257, 768, False, False)}


def _config(dtype, n, k, bias, gelu, name, rows=1, tiles=STATIC) -> dict:
    from gptfast.kernels.testing import launch_config

    with tuning.use({KERNEL: {f"{_TYPES[dtype]}-m{1 if rows == 1 else MAX_ROWS}": tiles}}):
        config, _ = _plan(None, dtype, rows == 1, n, k, bias, gelu)
    t = _TYPES[dtype]
    args = dict(X="*" + t, W="*" + t, B="*" + t, Y="*" + t, M=rows, N=n, K=k, stride_xm=k,
                stride_wn=k, stride_ym=n)
    constexprs = {key: config.kwargs[key] for key in
                  ("HAS_BIAS", "GELU", "EVEN_N", "EVEN_K", "BLOCK_M", "BLOCK_N", "BLOCK_K")}
    return launch_config(name, _linear_kernel, args, constexprs, config.kwargs["num_warps"],
                         config.kwargs["num_stages"])


def aot_configs():
    """Every dtype at GPT-2's decode shapes (even and ragged N, K, with and without the bias and
    the GELU) and odd sizes (masks on both) with the static tiles, and the tuning space's other
    tiles at the MLP's first product and the head (the even and the ragged case)."""
    configs = [_config(dtype, *shape, f"_linear_kernel/{t}/{what}")
               for dtype, t in _TYPES.items() for what, shape in _GPT2.items()]
    configs += [_config(dtype, 1000, 777, True, True, f"_linear_kernel/{t}/odd")
                for dtype, t in _TYPES.items()]
    others = [c for c in TUNING_SPACE["bf16-m1"] if c["kernel"] and c != STATIC]
    return configs + [_config(dtype, *_GPT2[what], f"_linear_kernel/{t}/{what}/n{c['block_n']}"
                              f"w{c['num_warps']}s{c['num_stages']}", tiles=c)
                      for c in others for dtype, t in _TYPES.items() for what in ("fc1", "head")]


def report_cases(cc: int = 90):
    """GPT-2 124M's decode-step products at batch 1 in bf16, for the static report."""
    cases = []
    for what, (n, k, bias, gelu) in _GPT2.items():
        label = f"124M decode B1 {what} {n}x{k} bf16"
        cfg = _config(torch.bfloat16, n, k, bias, gelu, f"_linear_kernel {label}")
        cases.append({"label": label, "config": cfg, "grid": cdiv(n, STATIC["block_n"])})
    return cases
