"""Providers that may be missing (our kernels while they are written, Liger-Kernel) and
torch.compile'd eager ops, shared by the benchmark modules."""

import functools

import pytest
import torch


def optional(module: str, attr: str, why: str | None = None):
    """``module.attr``, or skip the case saying what is missing."""
    mod = pytest.importorskip(module, reason=why or f"{module} is not available yet")
    if not hasattr(mod, attr):
        pytest.skip(f"{module}.{attr} is not available yet")
    return getattr(mod, attr)


def liger_layer_norm():
    """Liger-Kernel's LayerNorm autograd function, ``apply(x, weight, bias, eps)``, or a skip.

    Third-party code: any import failure (not only a missing package) skips its cases.
    """
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        pytest.skip(
            "Liger-Kernel is not installed (pip install liger-kernel; on the offline GPU "
            "machine bench/gpu_check.sh installs the wheels found in .gpu_wheels/)"
        )
    except Exception as exc:  # noqa: BLE001 - a broken third-party install must not fail us
        pytest.skip(f"Liger-Kernel failed to import: {type(exc).__name__}: {exc}")
    return LigerLayerNormFunction


@functools.cache
def compiled(fn):
    """torch.compile of an eager op, specialised to each shape (one compile per case).

    The cache gets room for every case of a run (it recompiles per shape, dtype and grad
    mode), and donated buffers are off: the backward-only cases call backward repeatedly
    through one graph (retain_graph=True), which donated buffers forbid.
    """
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def seeded(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, dtype, gen, scale=1.0, shift=0.0) -> torch.Tensor:
    """Normal samples drawn in fp32 (same values for every dtype), then cast."""
    x = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
    return (x * scale + shift).to(dtype)


def require_model_kernels() -> None:
    """Skip unless the kernels package exports what GPTModel(kernels="triton") calls."""
    import kernels

    names = ("layer_norm", "add_layer_norm", "attention")
    missing = [n for n in names if not callable(getattr(kernels, n, None))]
    if missing:
        pytest.skip(f"the kernels package does not export {', '.join(missing)} yet")
