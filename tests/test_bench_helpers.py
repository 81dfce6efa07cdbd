"""The benchmark suite's helpers (bench/): byte and FLOP models, the timer, the summary."""

import json
import time

import pytest
import torch

from bench import _runner
from bench._metrics import (
    add_layer_norm_bytes,
    attention_flops,
    device_slug,
    layer_norm_bytes,
    model_flops,
    sync_timer,
)
from bench._report import NO_GPU_NOTE, markdown, write_summary

M, N = 8192, 768


def test_layer_norm_bytes_count_each_tensor_once():
    x = M * N * 2  # one bf16 activation tensor
    assert layer_norm_bytes(M, N, 2, "fwd") == 2 * x + 2 * N * 2  # x, y; weight, bias
    # x, dy, dx; weight, dweight, dbias; mean and rstd (fp32 per row)
    assert layer_norm_bytes(M, N, 2, "bwd") == 3 * x + 3 * N * 2 + 2 * M * 4
    # the training forward also writes mean and rstd
    assert layer_norm_bytes(M, N, 2, "fwd+bwd") == 5 * x + 5 * N * 2 + 4 * M * 4
    assert layer_norm_bytes(M, N, 2, "fwd", p=4) == 2 * x + 2 * N * 4  # fp32 parameters


def test_add_layer_norm_bytes_count_the_fused_op():
    x = M * N * 4
    assert add_layer_norm_bytes(M, N, 4, "fwd") == 4 * x + 2 * N * 4  # x, residual, y, h
    # dy, dh, h, dx (shared by x and residual); weight, dweight, dbias; mean, rstd
    assert add_layer_norm_bytes(M, N, 4, "bwd") == 4 * x + 3 * N * 4 + 2 * M * 4
    assert add_layer_norm_bytes(M, N, 4, "fwd+bwd") == 8 * x + 5 * N * 4 + 4 * M * 4


def test_attention_flops():
    full = 4 * 2 * 12 * 1024 * 1024 * 64
    assert attention_flops(2, 12, 1024, 1024, 64, False, "fwd") == full
    assert attention_flops(2, 12, 1024, 1024, 64, True, "fwd") == full // 2
    assert attention_flops(2, 12, 1024, 1024, 64, False, "bwd") == full * 5 // 2
    assert attention_flops(2, 12, 1024, 1024, 64, True, "fwd+bwd") == full // 2 * 7 // 2
    assert attention_flops(1, 1, 3, 5, 7, False, "fwd") == 4 * 3 * 5 * 7  # Tq != Tk


def test_model_flops():
    B, T, layers, d, params = 2, 16, 3, 8, 1000
    attention = layers * 2 * B * T * T * d  # causal: half of 4·B·T²·d per layer
    assert model_flops(params, B, T, layers, d, "fwd") == 2 * params * B * T + attention
    assert model_flops(params, B, T, layers, d, "train") == 3 * (2 * params * B * T + attention)


@pytest.mark.parametrize("fn", [layer_norm_bytes, add_layer_norm_bytes])
def test_unknown_mode_is_rejected(fn):
    with pytest.raises(ValueError, match="mode"):
        fn(M, N, 2, "forward")
    with pytest.raises(ValueError, match="mode"):
        model_flops(1, 1, 1, 1, 1, "fwd+bwd")


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"
    assert device_slug("cpu") == "cpu"
    assert device_slug("  Weird/Name (rev. 2)  ") == "weird-name-rev-2"
    assert device_slug("///") == "unknown"


def test_sync_timer_measures_a_sleep():
    sleep = 0.05
    start = sync_timer()
    time.sleep(sleep)
    elapsed = sync_timer() - start
    # sleep() waits at least its time on the same monotonic clock; the upper bound is loose
    assert sleep * 0.999 <= elapsed < sleep + 2.0


def test_loop_plan_amortises_sync_over_many_launches():
    rounds, iterations = _runner.loop_plan(0.005)  # a 5 us kernel
    assert iterations * 0.005 >= _runner.ROUND_MS and rounds == 50
    rounds, iterations = _runner.loop_plan(40.0)  # a 40 ms training step
    assert (rounds, iterations) == (5, 1)


def test_compare_applies_the_2x_rule_and_names_the_worst_output():
    ref = {"y": torch.zeros(4, dtype=torch.float64), "dx": torch.ones(4, dtype=torch.float64)}
    eager = {"y": torch.full((4,), 1e-3), "dx": torch.full((4,), 1.0 + 1e-3)}
    good = {"y": torch.full((4,), 1e-3), "dx": torch.full((4,), 1.0 - 1e-3)}
    bad = {"y": torch.full((4,), 1e-3), "dx": torch.full((4,), 1.0 + 5e-3)}
    assert _runner.compare(good, eager, ref, torch.float32)["ok"]
    result = _runner.compare(bad, eager, ref, torch.float32)
    assert not result["ok"] and result["worst"] == "dx"
    assert result["err"] == pytest.approx(5e-3, rel=1e-3)
    assert result["eager_err"] == pytest.approx(1e-3, rel=1e-3)


def _records():
    base = {"op": "layer_norm", "shape": "8192x768", "dtype": "bf16", "mode": "fwd",
            "metric": "GB/s", "params": {"M": 8192, "N": 768}, "eager_err": 7.8e-3, "bound": 0.02}
    return [
        {**base, "provider": "eager", "ms": 0.02, "ms_wall": 0.021, "speedup": 1.0,
         "value": 1259.0, "pct_limit": 42.0, "err": 7.8e-3, "worst": "y", "agrees": True},
        {**base, "provider": "triton", "ms": 0.01, "ms_wall": 0.011, "speedup": 2.0,
         "value": 2518.0, "pct_limit": 84.0, "err": 3.0e-2, "worst": "y", "agrees": False},
        {"op": "attention", "shape": "B16 H12 T1024 D64 causal", "dtype": "bf16", "mode": "fwd",
         "provider": "triton", "metric": "TFLOP/s", "ms": 0.2, "ms_wall": 0.21, "speedup": 3.5,
         "value": 400.0, "pct_limit": 50.0, "err": 1e-3, "worst": "o", "eager_err": 2e-3,
         "agrees": True, "params": {"B": 16, "H": 12, "T": 1024, "D": 64, "causal": True}},
    ]


def test_summary_writes_markdown_and_json(tmp_path):
    meta = {"device": "NVIDIA H100 80GB HBM3", "gpu": True, "torch": "2.11",
            "limits": {"copy_gbps": 3000.0, "matmul_tflops": 800.0}}
    paths = write_summary(_records(), meta, tmp_path / "out", stem="quick")
    md, js = tmp_path / "out" / "quick.md", tmp_path / "out" / "quick.json"
    assert md in paths and js in paths
    text = md.read_text()
    assert "## LayerNorm" in text and "## Attention" in text
    row = "| 8192x768 | bf16 | fwd | triton | 0.01 | 0.011 | 2.00 | 2518.0 | 84.0 | 3.0e-02 (y) |"
    assert row in text
    assert "| 8192x768 | bf16 | fwd | eager | 0.02 |" in text
    assert "**NO**" in text  # the failed agreement is flagged
    assert "GB/s" in text and "TFLOP/s" in text and "copy 3000 GB/s" in text
    assert "No GPU timings" not in text
    data = json.loads(js.read_text())
    assert data["meta"]["device"] == meta["device"]
    assert [r["provider"] for r in data["records"]] == ["eager", "triton", "triton"]


def test_summary_plots_when_matplotlib_is_present(tmp_path):
    pytest.importorskip("matplotlib")
    meta = {"device": "x", "gpu": True, "limits": {"copy_gbps": 3000.0}}
    recs = _records()
    recs.append({**recs[1], "shape": "8192x1600", "params": {"M": 8192, "N": 1600}})
    paths = write_summary(recs, meta, tmp_path, stem="s")
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert pngs == ["s-attention.png", "s-layer_norm.png"]
    assert (tmp_path / "s-layer_norm.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_says_plainly_when_no_gpu_timings_were_taken():
    text = markdown([], {"device": "cpu", "gpu": False})
    assert NO_GPU_NOTE in text and "No benchmark case ran." in text


def test_quick_mode_covers_every_provider_of_every_op():
    from bench import test_add_layer_norm, test_attention, test_layer_norm, test_model

    for module in (test_layer_norm, test_add_layer_norm, test_attention, test_model):
        quick, full = module.gpu_cases(True), module.gpu_cases(False)
        assert {c.provider for c in quick} == set(module.PROVIDERS)
        assert len(quick) < len(full) or module is test_model
        assert len({c.id for c in full}) == len(full)  # ids are unique
    widths = {c.params["N"] for c in test_layer_norm.gpu_cases(True)}
    assert widths == {768, 1600, 8192}
    lengths = {(c.params["T"], c.params["D"], c.params["causal"])
               for c in test_attention.gpu_cases(True)}
    assert lengths == {(1024, 64, True), (4096, 64, True)}


class _FakeBenchmark:
    """The parts of pytest-benchmark's fixture that run_interpreter_case uses."""

    def __init__(self):
        self.extra_info, self.group, self.stats = {}, None, None

    def pedantic(self, fn, rounds=1, iterations=1):
        return fn()


@pytest.mark.parametrize("provider, fails", [("triton", True), ("liger", False)])
def test_a_case_breaking_the_2x_rule_is_recorded_and_fails_only_for_our_kernels(
    monkeypatch, provider, fails
):
    monkeypatch.setattr(_runner, "RECORDS", [])
    ref = {"y": torch.zeros(3, dtype=torch.float64)}
    eager = {"y": torch.full((3,), 1e-3)}
    case = _runner.Case("layer_norm", provider, "3x1", {"M": 3, "N": 1}, "fp32", "fwd")
    bench = _FakeBenchmark()

    def run():
        return {"y": torch.full((3,), 1e-2)}  # 10x eager's error

    def check(values):
        return _runner.compare(values, eager, ref, torch.float32)

    if fails:
        with pytest.raises(pytest.fail.Exception, match="exceeds 2 x eager error"):
            _runner.run_interpreter_case(bench, case, run=run, check=check)
    else:
        _runner.run_interpreter_case(bench, case, run=run, check=check)
    (record,) = _runner.RECORDS
    assert record["agrees"] is False and bench.extra_info["agrees"] is False
    assert record["err"] == pytest.approx(1e-2) and record["provider"] == provider
