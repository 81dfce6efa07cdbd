"""What the tests, the benchmark suite and the static report share: the agreement rule and
the ahead-of-time compiler.

The agreement rule (the FlashAttention test method, "2x rule"): a kernel computing in dtype D is
compared with a float64 reference. Its max abs error must be at most ``factor`` times the error
that eager PyTorch makes in the same dtype against the same reference, plus an absolute slack
``atol`` (for outputs where eager happens to be exact).

Ahead-of-time compilation: Triton's interpreter runs kernels on CPU but forgives what the GPU
compiler does not (tl.dot shapes below 16, layouts, shared-memory overflow). ``compile_kernel``
compiles a kernel to cubin for sm_80 (A100) or sm_90 (H100) with the ptxas shipped in the triton
wheel. A kernel module opts in by defining ``aot_configs()``: an iterable of dicts with keys
``name``, ``fn`` (the @triton.jit kernel), ``signature`` ({arg: "*fp16" | "i32" | "fp32" |
"constexpr" ...}), ``constexprs`` ({arg: value}) and optionally ``num_warps``/``num_stages``/``attrs``,
covering every launch configuration its heuristics can pick. Kernels decorated under
TRITON_INTERPRET=1 cannot be compiled, so ``compile_module`` runs the compiler in a subprocess
with the interpreter switched off: ``python -m kernels.testing MODULE``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# --- the agreement rule ----------------------------------------------------------------------


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


# --- ahead-of-time compilation --------------------------------------------------------------

# Shared memory a block may use (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ROOT = Path(__file__).resolve().parents[1]  # the directory holding the kernels package


def compile_kernel(fn, signature, constexprs, cc, num_warps=4, num_stages=3, attrs=None):
    """Compile one kernel config to cubin for compute capability ``cc``; returns its metadata.

    ``attrs`` are the argument specialisations a real launch gets (e.g. 16-byte divisibility
    of pointers and strides); without them the compiler skips vectorised and pipelined loads
    and reports less shared memory than the launch would use.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options).metadata


def compile_module(module: str, ccs=(80, 90), timeout=900) -> list[dict]:
    """Compile every config of ``module.aot_configs()`` for each cc, in a compiler subprocess.

    Returns one record per (config, cc): name, cc, ok, shared (bytes), limit, error.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "kernels.testing", module, *map(str, ccs)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compiler process failed for {module}:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _main(module: str, ccs: list[int]) -> None:
    import importlib

    configs = importlib.import_module(module).aot_configs()
    for cfg in configs:
        for cc in ccs:
            record = {"name": cfg["name"], "cc": cc, "limit": SHARED_LIMIT[cc]}
            try:
                meta = compile_kernel(
                    cfg["fn"], cfg["signature"], cfg["constexprs"], cc,
                    cfg.get("num_warps", 4), cfg.get("num_stages", 3), cfg.get("attrs"),
                )
                record.update(ok=True, shared=meta.shared, error=None)
            except Exception as exc:  # reported to the test, which fails with the message
                record.update(ok=False, shared=None, error=f"{type(exc).__name__}: {exc}"[:2000])
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], [int(c) for c in sys.argv[2:]] or [80, 90])
