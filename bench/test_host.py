"""The host path: what each op's call costs the CPU (GPU work excluded), next to ATen's.

Per public op, forward and forward + backward, at a tiny shape: microseconds per call of ours
and of the ATen counterpart, their ratio (targets: forward within 2x ATen's, forward + backward
within 3x), and kernel launches per call; then greedy decoding with the KV cache per token
(no CUDA graph), next to the chapter's uncached loop. How it is measured (bench/_host.py):
without a GPU in a child process whose Triton driver is a stub (the compiled kernels' launch
path runs, the launch itself is a counter; this CPU's thread time); with one in-process on
tiny CUDA tensors (wall time, each round synchronised). The records go to the summary.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench._runner import BENCH_MARK, RECORDS

pytestmark = BENCH_MARK

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"fwd": 2.0, "fwd+bwd": 3.0}  # ratio to ATen's host cost per call


def host_rows(what: str) -> list[dict]:
    """``bench._host``'s rows for ``what`` ("ops" or "tokens"): in-process on CUDA, else in a
    child process with Triton's driver stubbed."""
    if torch.cuda.is_available():
        from bench import _host

        return _host.measure() if what == "ops" else _host.per_token()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-m", "bench._host", what], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"bench._host {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def _dtype() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def test_host_cost_per_call(benchmark):
    rows = benchmark.pedantic(lambda: host_rows("ops"), rounds=1, iterations=1)
    for r in rows:
        target = TARGETS[r["mode"]]
        RECORDS.append({"op": "host", "provider": "triton", "shape": r["op"], "params": {},
                        "dtype": _dtype(), "mode": r["mode"], "ours": True, "metric": "us",
                        "us": r["us"], "aten_us": r["aten_us"], "ratio": r["ratio"],
                        "target": target, "meets": r["ratio"] <= target,
                        "launches": r["launches"], "aten_launches": r["aten_launches"],
                        "host_reads": r["syncs"], "aten_name": r["aten_name"]})
    benchmark.extra_info["rows"] = rows


def test_host_cost_per_token(benchmark):
    rows = benchmark.pedantic(lambda: host_rows("tokens"), rounds=1, iterations=1)
    for r in rows:
        RECORDS.append({"op": "host_decode", "provider": r["provider"], "params": {},
                        "shape": f"L12 d64 B{r['batch']} prompt16", "dtype": _dtype(),
                        "mode": "greedy", "ours": r["provider"] != "uncached", "metric": "us",
                        "us_per_token": r["us_per_token"],
                        "launches_per_token": r["launches_per_token"],
                        "host_reads_per_token": r["syncs_per_token"]})
    benchmark.extra_info["rows"] = rows
