"""The FlashAttention test rule, shared by the kernel tests and the benchmark suite.

A kernel computing in dtype D is compared with a float64 reference. Its max abs error must be
at most ``factor`` times the error that eager PyTorch makes in the same dtype against the same
reference, plus an absolute slack ``atol`` (for outputs where eager happens to be exact).
"""

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, computed in float64 (0.0 for empty tensors)."""
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} differs from reference {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def agreement(out, eager, ref, factor=2.0, atol=0.0) -> dict:
    """Errors of ``out`` and ``eager`` against ``ref``, the bound, and whether ``out`` is within it."""
    err, eager_err = max_err(out, ref), max_err(eager, ref)
    bound = factor * eager_err + atol
    finite = bool(torch.isfinite(out).all())
    return {"err": err, "eager_err": eager_err, "bound": bound, "ok": finite and err <= bound}


def assert_agrees(out, eager, ref, factor=2.0, atol=0.0, what="output") -> None:
    """Fail unless ``out`` is finite and within ``factor`` x eager's error (+ atol) of ``ref``."""
    a = agreement(out, eager, ref, factor, atol)
    assert a["ok"], (
        f"{what}: max error {a['err']:.3e} exceeds {factor} x eager error {a['eager_err']:.3e}"
        f" + {atol:.1e} = {a['bound']:.3e} (or is not finite)"
    )
