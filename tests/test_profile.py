"""``python -m gptfast profile``: runs, traces, family breakdown, attribution, option errors."""

import importlib
import json
import re

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

import gptfast.profile as gp
from gptfast.cli import main
from gptfast.model import GPTModel

SMALL = ["--config", "tiny", "--batch", "2", "--seq-len", "24", "--wait", "0", "--warmup", "1",
         "--active", "1", "--new-tokens", "3", "--device", "cpu"]
MODEL_LABELS = ["embedding", "trf_blocks.0.norm1", "trf_blocks.0.att", "trf_blocks.1.norm2",
                "trf_blocks.1.ff", "final_norm", "out_head"]


def printed_shares(out: str) -> dict:
    """The family table of the report: {family: percent}."""
    family = "|".join(re.escape(f) for f in gp.FAMILIES)
    rows = re.findall(rf"^  ({family})\s+([\d.]+)\s+([\d.]+)%$", out, flags=re.M)
    return {family: float(share) for family, _, share in rows}


def trace_names(path) -> set:
    with open(path) as f:
        trace = json.load(f)
    return {e.get("name") for e in trace["traceEvents"]}


@pytest.mark.parametrize("mode, extra_labels", [
    ("forward", []),
    ("train", ["loss", "backward", "optimizer"]),
    ("generate", []),
])
def test_each_mode_runs_traces_and_breaks_down(mode, extra_labels, tmp_path, capsys):
    assert main(["profile", *SMALL, "--mode", mode, "--kernels", "torch", "--top", "5",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    names = trace_names(tmp_path / "trace.json")
    assert set(MODEL_LABELS + extra_labels) <= names, set(MODEL_LABELS + extra_labels) - names
    shares = printed_shares(out)
    assert set(shares) == set(gp.FAMILIES)
    assert abs(sum(shares.values()) - 100) <= 0.5, shares
    # the eager model does work of every family, and the top list ranks by self time
    assert all(shares[f] > 0 for f in ("attention", "LayerNorm", "matmul")), shares
    top_ms = [float(m) for m in re.findall(r"^\s+([\d.]+)\s+[\d.]+\s+\d+  ", out, flags=re.M)]
    assert len(top_ms) == 5 and top_ms == sorted(top_ms, reverse=True)
    assert "peak memory: n/a on CPU" in out and str(tmp_path / "trace.json") in out


def test_breakdown_accounts_for_the_active_steps_wall_time():
    r = gp.profile_model("tiny", batch=1, seq_len=16, device="cpu", kernels="torch", wait=0,
                         warmup=1, active=2, top=3)
    assert r["timeline"] == "CPU" and r["steps"] == 2 and len(r["top"]) == 3
    assert set(r["families"]) == set(gp.FAMILIES) and min(r["families"].values()) >= 0
    assert r["total_ms"] == pytest.approx(sum(r["families"].values()))
    assert sum(r["shares"].values()) == pytest.approx(100)
    assert r["trace"] is None and r["tensorboard"] is None and r["peak_memory_mb"] is None


@pytest.mark.parametrize("name, op, label, family", [
    ("_attn_fwd", "FlashAttention", "trf_blocks.0.att", "attention"),
    ("flash_fwd_kernel", "", None, "attention"),
    ("fmha_cutlassF_f32_aligned_64x64_rf_sm80", "aten::_efficient_attention_forward", None,
     "attention"),
    ("_layer_norm_fwd", "", "trf_blocks.3.norm1", "LayerNorm"),
    ("void at::native::vectorized_layer_norm_kernel<float>", "aten::native_layer_norm", None,
     "LayerNorm"),
    ("_add_layer_norm_bwd", "", None, "LayerNorm"),
    ("ampere_sgemm_128x64_tn", "aten::bmm", "trf_blocks.0.att", "attention"),  # eager QKᵀ / AV
    ("aten::bmm", "aten::bmm", "trf_blocks.2.att", "attention"),
    ("BmmBackward0", "BmmBackward0", "trf_blocks.2.att", "attention"),
    ("ampere_sgemm_128x64_tn", "aten::mm", "trf_blocks.0.att", "matmul"),  # Q/K/V projections
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "aten::addmm", "trf_blocks.0.ff", "matmul"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "aten::mm", "out_head", "matmul"),
    ("aten::addmm", "aten::addmm", None, "matmul"),
    ("aten::linear", "aten::linear", "trf_blocks.0.att", "matmul"),
    ("AddmmBackward0", "AddmmBackward0", "trf_blocks.0.ff", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_32x6_tn_align4>", "", None,
     "matmul"),
    # GEMM libraries' kernels are matmul whichever op launched them (the H200's train-triton
    # profile: its biggest kernel, cuBLAS's CUTLASS sm_75 bf16 GEMM, 366 calls)
    ("void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1>"
     "(cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1::Params)", "aten::mm",
     "trf_blocks.0.att", "matmul"),
    ("cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1", "LinearCrossEntropy", "loss",
     "matmul"),
    ("cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1", "AttentionBackward", None,
     "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_"
     "segment_k_off_kernel__5x_cublas", "AddLayerNormBackward", "trf_blocks.3.norm2", "matmul"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNN", "", None, "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", "aten::mm", "out_head",
     "matmul"),
    ("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x1x1_0_tnn_align8_"
     "warpspecialized_cooperative_epi_tma", "aten::addmm", "trf_blocks.1.ff", "matmul"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "", "trf_blocks.0.att",
     "matmul"),
    ("sm80_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "aten::cudnn_convolution",
     None, "matmul"),
    ("_bwd_dkdv_kernel", "AttentionBackward", None, "attention"),  # Triton: the op says it
    ("_fwd_rows_kernel", "AddLayerNorm", "trf_blocks.0.norm2", "LayerNorm"),
    ("softmax_warp_forward", "aten::_softmax", "trf_blocks.0.att", "attention"),
    ("aten::masked_fill_", "aten::masked_fill_", "trf_blocks.1.att", "attention"),
    ("reduce_kernel<512, 1>", "aten::var", "trf_blocks.0.norm2", "LayerNorm"),
    ("vectorized_elementwise_kernel", "aten::add", "final_norm", "LayerNorm"),
    ("vectorized_elementwise_kernel", "aten::add", "trf_blocks.0.ff", "elementwise/other"),
    ("softmax_warp_forward", "aten::_softmax", None, "elementwise/other"),
    ("multi_tensor_apply_kernel", "aten::_fused_adamw_", "optimizer", "elementwise/other"),
    ("Memset (Device)", "aten::zero_", None, "elementwise/other"),
    ("aten::sum", "aten::sum", "loss", "elementwise/other"),
    ("aten::embedding", "aten::embedding", "embedding", "elementwise/other"),
])
def test_classify_by_name_then_label(name, op, label, family):
    assert gp.classify(name, op, label) == family


def test_backward_ops_get_the_label_of_their_forward_op():
    torch.manual_seed(0)
    model = GPTModel(gp.TINY_CONFIG, kernels="torch")
    ids = torch.randint(0, 1000, (1, 16))
    step = gp.make_step(model, "train", ids, 1, gp.autocast_for("fp32", "cpu"))
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=1, repeat=1)
    with torch.profiler.profile(schedule=schedule) as prof:
        for _ in range(2):
            step()
            prof.step()
    cpu = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    label_of = gp.labeller(cpu)
    nodes = {}
    for e in cpu:
        if e.scope == gp.BACKWARD_SCOPE:
            nodes.setdefault(e.name, set()).add(label_of(e))
    assert nodes["BmmBackward0"] == {"trf_blocks.0.att", "trf_blocks.1.att"}
    assert nodes["VarBackward0"] == {"trf_blocks.0.norm1", "trf_blocks.0.norm2",
                                     "trf_blocks.1.norm1", "trf_blocks.1.norm2", "final_norm"}
    assert nodes["GeluBackward0"] == {"trf_blocks.0.ff", "trf_blocks.1.ff"}
    assert nodes["NllLossBackward0"] == {"loss"}
    # an op under a node inherits its label; a forward op keeps its enclosing range
    under_bmm_nodes = {label_of(e) for e in cpu if e.name == "aten::bmm"
                       and e.cpu_parent is not None and e.cpu_parent.name == "BmmBackward0"}
    assert under_bmm_nodes == {"trf_blocks.0.att", "trf_blocks.1.att"}
    assert {label_of(e) for e in cpu if e.name == "aten::softmax"} == {"trf_blocks.0.att",
                                                                      "trf_blocks.1.att"}


def test_cpu_timeline_is_the_active_steps_wall_time():
    model = GPTModel(gp.TINY_CONFIG, kernels="torch").eval()
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=2, repeat=1)
    with torch.profiler.profile(schedule=schedule) as prof:
        for _ in range(3):
            with torch.no_grad():
                model(torch.randint(0, 1000, (1, 16)))
            prof.step()
    events = prof.events()
    wall_us = sum(e.time_range.elapsed_us() for e in events if e.name.startswith("ProfilerStep"))
    r = gp.breakdown(events, on_device=False)
    assert r["total_ms"] * 1e3 == pytest.approx(wall_us)
    assert r["families"]["idle"] > 0  # Python between ops: the labels' own time at least


def _event(name, start, end, device=DeviceType.CPU, parent=None, annotation=False):
    e = FunctionEvent(id=0, name=name, thread=1, start_us=start, end_us=end, use_device="cuda",
                      device_type=device, is_user_annotation=annotation)
    if parent is not None:
        e.set_cpu_parent(parent)
        parent.append_cpu_child(e)
    return e


def test_cuda_breakdown_from_kernels_links_and_gaps():
    """The CUDA path on hand-made events: a linked GEMM, an unlinked softmax, a GPU-side label."""
    step = _event("ProfilerStep*", 0, 100, annotation=True)
    att = _event("trf_blocks.0.att", 5, 30, parent=step, annotation=True)
    bmm = _event("aten::bmm", 10, 20, parent=att)
    bmm.append_kernel("ampere_sgemm_64x64_nn", 0, 30.0)
    events = [step, att, bmm,
              _event("ampere_sgemm_64x64_nn", 40, 70, DeviceType.CUDA),
              _event("softmax_warp_forward", 65, 85, DeviceType.CUDA),  # overlaps the GEMM
              _event("trf_blocks.0.att", 40, 85, DeviceType.CUDA, annotation=True)]
    r = gp.breakdown(events, on_device=True)
    # bmm in att → attention; the unlinked kernel gets its name's family; idle = 100 - |[40, 85]|
    assert r["families"] == pytest.approx({"attention": 0.030, "LayerNorm": 0.0, "matmul": 0.0,
                                           "elementwise/other": 0.020, "idle": 0.055})
    assert [row["name"] for row in r["top"]] == ["ampere_sgemm_64x64_nn", "softmax_warp_forward"]


def test_tensorboard_trace_directory(tmp_path, capsys):
    assert main(["profile", *SMALL, "--kernels", "torch", "--out", str(tmp_path),
                 "--tensorboard"]) == 0
    traces = list((tmp_path / "tensorboard").glob("*.pt.trace.json"))
    assert len(traces) == 1 and "trf_blocks.0.att" in trace_names(traces[0])
    assert str(tmp_path / "tensorboard") in capsys.readouterr().out


def test_bf16_autocast_on_cpu_runs(tmp_path):
    r = gp.profile_model("tiny", batch=1, seq_len=16, device="cpu", dtype="bf16", kernels="torch",
                         wait=0, warmup=1, active=1, out=str(tmp_path))
    assert sum(r["shares"].values()) == pytest.approx(100) and r["families"]["matmul"] > 0


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--seq-len", "257"], "exceeds the config's context length 256"),
    (["--batch", "0"], "batch must be a positive int"),
    (["--seq-len", "-4"], "seq_len must be a positive int"),
    (["--active", "0"], "active must be a positive int"),
    (["--new-tokens", "0", "--mode", "generate"], "new_tokens must be a positive int"),
    (["--config", "7B"], "unknown config '7B'"),
])
def test_option_errors_exit_2(args, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["profile", "--config", "tiny", "--device", "cpu", "--kernels", "torch"]
    assert main([*base, *args]) == 2
    assert message in capsys.readouterr().err


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch, capsys):
    common = pytest.importorskip("gptfast.kernels._common")
    monkeypatch.setattr(common, "INTERPRETING", False)
    assert main(["profile", *SMALL, "--kernels", "triton"]) == 2
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1" in err and "CUDA" in err


def test_dtype_autocast_cannot_do_is_refused(monkeypatch):
    class Disabled:  # what torch.autocast gives for a dtype it does not support on a device
        _enabled = False

    monkeypatch.setattr(gp.torch, "autocast", lambda *a, **k: Disabled())
    with pytest.raises(ValueError, match="autocast on cpu does not support torch.float16"):
        gp.autocast_for("fp16", "cpu")


def _triton_kernels_present() -> bool:
    try:
        from gptfast import kernels
    except ImportError:
        return False
    return all(hasattr(kernels, op) for op in ("layer_norm", "add_layer_norm", "attention"))


@pytest.mark.skipif(not _triton_kernels_present(),
                    reason="kernels lacks layer_norm/add_layer_norm/attention (not landed yet)")
def test_triton_kernels_under_the_interpreter(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = gp.profile_model("tiny", batch=1, seq_len=16, device=device, kernels="triton", wait=0,
                         warmup=1, active=1, out=str(tmp_path))
    assert set(MODEL_LABELS) <= trace_names(tmp_path / "trace.json")
    assert sum(r["shares"].values()) == pytest.approx(100)
    assert r["families"]["attention"] > 0 and r["families"]["LayerNorm"] > 0, r["families"]


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_cuda_timeline_at_gpt2_small_shapes(mode, kernels, tmp_path):
    if kernels == "triton" and not _triton_kernels_present():
        pytest.skip("kernels lacks layer_norm/add_layer_norm/attention (not landed yet)")
    r = gp.profile_model("124M", batch=4, seq_len=512, mode=mode, kernels=kernels, dtype="bf16",
                         device="cuda", wait=1, warmup=1, active=2, out=str(tmp_path))
    assert r["timeline"] == "CUDA" and r["peak_memory_mb"] > 0
    assert sum(r["shares"].values()) == pytest.approx(100) and r["families"]["idle"] >= 0
    # LayerNorm and the attention core reach their families through the labels (eager: generic
    # reduction/softmax/elementwise kernels) or through the kernel names (Triton)
    assert all(r["families"][f] > 0 for f in ("attention", "LayerNorm", "matmul")), r["families"]
    with open(tmp_path / "trace.json") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    if kernels == "triton":  # its kernels' names (_fwd_kernel, ...) say nothing: their ops do
        attn = importlib.import_module("gptfast.kernels.attention")
        attention_kernels = {k.__name__ for k in (attn._fwd_kernel, attn._bwd_dkdv_kernel,
                                                  attn._bwd_dq_kernel)}
        assert any(row["family"] == "attention" and row["name"] in attention_kernels
                   for row in r["top"]), r["top"]
        # no eager bmm here: a GEMM library's kernel is matmul in every call
        gemms = [row for row in r["top"] if gp.GEMM_KERNEL.search(row["name"].lower())]
        assert gemms and all(row["family"] == "matmul" for row in gemms), r["top"]
