"""The benchmark suite's helpers (bench/): byte and FLOP models, the timer, the summary."""

import json
import shutil
import time

import pytest
import torch

from bench import _runner
from bench._metrics import (
    add_layer_norm_bytes,
    attention_flops,
    decode_step_bytes,
    device_slug,
    layer_norm_bytes,
    model_flops_per_token,
    peak_memory,
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


def test_model_flops_per_token_is_the_palm_estimate():
    N, L, d, T = 1000, 3, 8, 16
    assert model_flops_per_token(N, L, d, T, "train") == 6 * N + 12 * L * d * T
    assert model_flops_per_token(N, L, d, T, "fwd") == 2 * N + 4 * L * d * T
    # GPT-2 124M at T=1024 (N without the embedding tables): about 0.85 GFLOP per token
    from bench.test_model import config, matmul_params

    n = matmul_params(config("124M"))
    assert n == 12 * (12 * 768**2 + 10 * 768) + 2 * 768 + 50257 * 768
    assert model_flops_per_token(n, 12, 768, 1024, "train") == pytest.approx(0.855e9, rel=1e-3)


def test_decode_step_bytes_reads_weights_and_the_kv_cache():
    # 2 layers, batch 3, width 8, 5 cached positions, bf16: keys and values of each
    assert decode_step_bytes(1000, 2, 3, 8, 5, 2) == 1000 + 2 * 2 * 3 * 5 * 8 * 2
    assert decode_step_bytes(1000, 2, 3, 8, 0, 2) == 1000


@pytest.mark.parametrize("fn", [layer_norm_bytes, add_layer_norm_bytes])
def test_unknown_mode_is_rejected(fn):
    with pytest.raises(ValueError, match="mode"):
        fn(M, N, 2, "forward")
    with pytest.raises(ValueError, match="mode"):
        model_flops_per_token(1, 1, 1, 1, "fwd+bwd")


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


def test_summary_ends_with_the_static_report_when_given():
    text = markdown([], {"device": "cpu", "gpu": False, "static_report": "| kernel |\n|---|"})
    assert text.index(NO_GPU_NOTE) < text.index("## Static kernel report") < text.index("| kernel |")
    assert "Static kernel report" not in markdown([], {"device": "cpu", "gpu": False})


def test_quick_mode_covers_every_provider_of_every_op():
    from bench import (
        test_add_layer_norm,
        test_attention,
        test_generation,
        test_layer_norm,
        test_model,
    )

    modules = (test_layer_norm, test_add_layer_norm, test_attention, test_model, test_generation)
    for module in modules:
        quick, full = module.gpu_cases(True), module.gpu_cases(False)
        assert {c.provider for c in quick} == set(module.PROVIDERS)
        assert len(quick) < len(full)
        assert len({c.id for c in full}) == len(full)  # ids are unique
        assert quick[0].provider == module.PROVIDERS[0]  # the baseline runs first
    for module in (test_layer_norm, test_add_layer_norm):
        assert {c.params["N"] for c in module.gpu_cases(True)} == {768, 8192}
    lengths = {(c.params["T"], c.params["D"], c.params["causal"])
               for c in test_attention.gpu_cases(True)}
    assert lengths == {(1024, 64, True), (4096, 64, True)}
    models = {(c.params["config"], c.params["B"], c.params["T"], c.mode)
              for c in test_model.gpu_cases(True)}
    assert models == {("124M", 8, 1024, "fwd"), ("124M", 8, 1024, "train")}
    dropout = {c.provider for c in test_model.gpu_cases(True) if c.params.get("dropout")}
    assert dropout == set(test_model.QUICK_DROPOUT)  # issue 23's second case: the target's pair
    full = [c for c in test_model.gpu_cases(False) if c.params.get("dropout")]
    assert {c.provider for c in full} == set(test_model.PROVIDERS)
    assert {c.mode for c in full} == {"train"} and {c.params["dropout"] for c in full} == {0.1}
    generations = {(c.params["config"], c.params["B"], c.params["new"])
                   for c in test_generation.gpu_cases(True)}
    assert generations == {("124M", 1, 256), ("124M", 8, 256)}


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


def test_summary_tables_of_the_model_and_generation():
    model = {"op": "model", "shape": "124M B8 T1024", "dtype": "bf16", "mode": "train",
             "provider": "triton", "params": {"config": "124M", "B": 8, "T": 1024}, "ms": 40.0,
             "ms_wall": 41.0, "speedup": 1.6, "tokens_per_s": 204800.0, "value": 175.0,
             "mfu": 25.0, "pct_limit": 25.0, "peak_gib": 12.345, "err": 1e-2, "worst": "grads",
             "eager_err": 8e-3, "agrees": True}
    gen = {"op": "generation", "shape": "124M B1 prompt16 new256", "dtype": "bf16",
           "mode": "greedy", "provider": "kv-triton-graph",
           "params": {"config": "124M", "B": 1, "prompt": 16, "new": 256}, "ms": 256.0,
           "ms_wall": 260.0, "tokens_per_s": 1000.0, "speedup": 6.5, "value": 1500.0,
           "pct_limit": 50.0, "same_tokens": 200, "err": 0.0, "worst": "deficit",
           "eager_err": 1e-2, "agrees": True}
    text = markdown([gen, model], {"device": "x", "gpu": True})
    assert text.index("## GPT model") < text.index("## Greedy generation")  # fixed op order
    assert "| tokens/s | TFLOP/s | MFU % | peak GiB |" in text
    row = ("| 124M B8 T1024 | bf16 | train | triton | 40 | 41 | 1.60 | 204800 | 175.0 | 25.0 "
           "| 12.35 |")
    assert row in text
    assert "| tokens/s | speedup vs uncached | GB/s | % of copy BW | = uncached |" in text
    row = ("| kv-triton-graph | 256 | 260 | 1000 | 6.50 | 1500.0 | 50.0 | 200/256 "
           "| 0.0e+00 (deficit) |")
    assert row in text


def _tiny_cfg(**kw):
    return {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
            "drop_rate": 0.0, "qkv_bias": False, **kw}


def _ids(B=3, T=11, vocab=97):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randint(0, vocab, (B, T), generator=g) for _ in range(2))


def test_hf_provider_computes_the_chapter_model_with_the_same_gradients():
    pytest.importorskip("transformers")
    from bench._providers import hf_gpt2
    from bench.test_model import chapter_model, values

    cfg = _tiny_cfg()
    idx, targets = _ids()
    ours = values(chapter_model(cfg, "cpu"), idx, targets, "train", amp=False)
    theirs = values(hf_gpt2(chapter_model(cfg, "cpu")), idx, targets, "train", amp=False)
    assert theirs.keys() == ours.keys() and theirs["grads"].shape == ours["grads"].shape
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-4, atol=1e-5)
    assert ours["grads"].abs().max() > 0


def test_sdpa_attention_computes_the_chapter_attention():
    from bench._providers import use_sdpa
    from bench.test_model import chapter_model, values

    cfg = _tiny_cfg()
    idx, targets = _ids()
    ours = values(chapter_model(cfg, "cpu"), idx, targets, "train", amp=False)
    sdpa = use_sdpa(chapter_model(cfg, "cpu"))
    assert sdpa.trf_blocks[1].att._attend.__func__.__name__ == "_sdpa_attend"
    got = values(sdpa, idx, targets, "train", amp=False)
    for name in ours:
        torch.testing.assert_close(got[name], ours[name], rtol=1e-4, atol=1e-5)


def test_dropout_check_fails_a_step_without_dropout():
    from bench.test_model import chapter_model, check_dropout

    idx, targets = _ids()
    assert check_dropout(chapter_model(_tiny_cfg(drop_rate=0.1), "cpu"), idx, targets,
                         amp=False) == {"ok": None}
    with pytest.raises(pytest.fail.Exception, match="equal: no dropout ran"):
        check_dropout(chapter_model(_tiny_cfg(), "cpu"), idx, targets, amp=False)


def test_values_of_the_whole_batch_are_those_of_the_checked_rows():
    """The timed batch's loss covers only the checked rows, so its gradients are theirs."""
    from bench.test_model import CHECKED, chapter_model, values

    model = chapter_model(_tiny_cfg(), "cpu")
    idx, targets = _ids(B=CHECKED + 2)
    whole = values(model, idx, targets, "train", amp=False)
    rows = values(model, idx[:CHECKED], targets[:CHECKED], "train", amp=False)
    for name in rows:
        torch.testing.assert_close(whole[name], rows[name], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available() and not (shutil.which("g++") or shutil.which("c++")),
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_blocks_share_one_graph():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from bench._providers import compile_blocks, use_sdpa
    from bench.test_model import chapter_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = _tiny_cfg(n_layers=3)
    idx = _ids()[0].to(device)
    with torch.no_grad():
        expected = chapter_model(cfg, device)(idx)
        torch._dynamo.reset()
        counters.clear()
        got = compile_blocks(use_sdpa(chapter_model(cfg, device)))(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one block's graph, for all three blocks


def test_generation_check_bounds_the_deficit_of_each_chosen_token():
    from bench.test_generation import check_tokens, model_for, same_prefix
    from gptfast import generate_text_simple

    cfg = _tiny_cfg()
    model = model_for(cfg, "uncached", "cpu", torch.float32)
    prompt, _ = _ids(B=2, T=4)
    tokens = generate_text_simple(model, prompt, 6, cfg["context_length"])
    good = check_tokens(model, tokens, 4, expected=tokens)
    assert good["ok"] and good["err"] == 0.0 and 0 < good["eager_err"] < 1e-4
    wrong = tokens.clone()
    wrong[1, 7] = (wrong[1, 7] + 1) % cfg["vocab_size"]  # not the argmax any more
    bad = check_tokens(model, wrong, 4)
    assert not bad["ok"] and bad["err"] > bad["bound"]
    assert not check_tokens(model, tokens, 4, expected=wrong)["ok"]
    assert same_prefix(wrong, tokens, 4) == 3 and same_prefix(tokens, tokens, 4) == 6


def test_generation_rounds_fit_the_time_budget():
    from bench.test_generation import rounds_for

    assert rounds_for(0.2) == 3 and rounds_for(1.2) == 2 and rounds_for(30.0) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured on CUDA")
def test_peak_memory_counts_a_temporary_allocation():
    mib = 2**20
    resident = torch.empty(8 * mib, dtype=torch.uint8, device="cuda")
    peak = peak_memory(lambda: torch.empty(64 * mib, dtype=torch.uint8, device="cuda"))
    assert peak >= 72 * mib and resident.numel() == 8 * mib


def test_the_graphs_provider_needs_cuda_and_the_recipe_does_not():
    """triton-graphs is compile_loss(mode="reduce-overhead"): on a CPU it is refused by name
    (CUDA graphs), where triton-recipe compiles (with aot_eager) and computes the loss."""
    from bench import test_model

    tiny = {**test_model.config("124M"), **test_model.TINY}
    with pytest.raises(ValueError, match="'triton-graphs' replays CUDA graphs: it needs a CUDA device"):
        test_model.build("triton-graphs", tiny, "cpu")
    model = test_model.build("triton-recipe", tiny, "cpu")
    ids = torch.randint(0, tiny["vocab_size"], (1, 5))
    assert torch.isfinite(model.__dict__["recipe"](ids, ids))
