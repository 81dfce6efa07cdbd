"""The gptfast model with kernels="triton" computes what kernels="torch" does, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from gptfast import GPTModel
from gptfast.kernels.testing import assert_agrees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Head dim 24 (not a power of two), odd length: the kernels' boundary paths run.
TINY = {"vocab_size": 101, "context_length": 32, "emb_dim": 48, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}
GPU_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
            "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


def logits_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    (logits.float().square().mean()).backward()  # a loss that reaches every parameter
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_against_torch(cfg, idx, dtype=torch.float32):
    torch.manual_seed(0)
    ref_model = GPTModel(cfg, kernels="torch").to(DEVICE, torch.float64).train()
    with torch.no_grad():  # non-trivial norm parameters
        for name, p in ref_model.named_parameters():
            if name.endswith(("scale", "shift")):
                p.add_(0.1 * torch.randn_like(p))
    ref = logits_and_grads(ref_model, idx)
    eager = logits_and_grads(ref_model.to(dtype), idx)
    ours = logits_and_grads(ref_model.use_kernels("triton"), idx)
    assert_agrees(ours[0], eager[0], ref[0], atol=1e-5, what="logits")
    for name in ref[1]:
        assert_agrees(ours[1][name], eager[1][name], ref[1][name], atol=1e-5, what=f"grad of {name}")


def test_tiny_model_logits_and_all_gradients_match_torch():
    idx = torch.randint(0, TINY["vocab_size"], (2, 19), device=DEVICE)
    check_against_torch(TINY, idx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic shape: CUDA only")
def test_124m_width_model_matches_torch_on_gpu():
    idx = torch.randint(0, GPU_124M["vocab_size"], (2, 1000), device=DEVICE)
    check_against_torch(GPU_124M, idx)


def test_auto_picks_triton_for_the_device_kernels_run_on():
    model = GPTModel(TINY, kernels="auto").to(DEVICE).eval()
    idx = torch.randint(0, TINY["vocab_size"], (1, 7), device=DEVICE)
    with torch.no_grad():
        auto = model(idx)
        forced = model.use_kernels("triton" if DEVICE == "cuda" else "torch")(idx)
    assert torch.equal(auto, forced)


def test_attention_dropout_is_used_in_training_only():
    cfg = {**TINY, "drop_rate": 0.5}
    model = GPTModel(cfg, kernels="triton").to(DEVICE)
    idx = torch.randint(0, cfg["vocab_size"], (1, 9), device=DEVICE)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(idx), model(idx))
        reference = model.use_kernels("torch")(idx)
        torch.testing.assert_close(model.use_kernels("triton")(idx), reference, rtol=1e-4, atol=1e-4)
        model.train()
        assert not torch.equal(model(idx), model(idx))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GELU epilogue is CUDA's")
def test_cuda_inference_takes_the_gelu_epilogue_and_agrees():
    """kernels="triton", no_grad, bf16 weights: the MLP's first GEMM carries the GELU (no
    separate GELU kernel runs) and the logits keep the 2x rule against float64."""
    torch.manual_seed(0)
    model = GPTModel(GPU_124M, kernels="torch").to(DEVICE, torch.float64).eval()
    idx = torch.randint(0, GPU_124M["vocab_size"], (2, 257), device=DEVICE)
    with torch.no_grad():
        ref = model(idx)
        eager = model.to(torch.bfloat16)(idx)
        model.use_kernels("triton")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours = model(idx)
            torch.cuda.synchronize()
    assert not _gelu_kernels(prof), "a separate GELU kernel ran"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as control:
        F.gelu(ours, approximate="tanh")  # the name the check looks for is the one torch uses
        torch.cuda.synchronize()
    assert _gelu_kernels(control)
    assert_agrees(ours, eager, ref, atol=1e-5, what="logits")


def _gelu_kernels(prof) -> list[str]:
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and "GeluCUDAKernel" in e.name]


class Scaled(torch.nn.Module):
    """A replaced linear layer (as an adapter would be): its own forward, twice the product."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return 2 * self.inner(x)


@pytest.mark.parametrize("where", ["out_proj", "ff_up", "hooked"])
def test_replaced_or_hooked_linears_keep_their_forward_in_the_fused_paths(where):
    """The cached step's fused products and the MLP's use the weights directly only for plain,
    hook-free nn.Linear layers: a replaced or hooked one is called, so the cached Triton step
    still equals the torch model's full forward."""
    torch.manual_seed(0)
    model = GPTModel(TINY, kernels="torch").to(DEVICE).eval()
    block = model.trf_blocks[0]
    if where == "out_proj":
        block.att.out_proj = Scaled(block.att.out_proj)
    elif where == "ff_up":
        block.ff.layers[0] = Scaled(block.ff.layers[0])
    else:
        block.ff.layers[2].register_forward_hook(lambda m, args, out: out * 3)
    idx = torch.randint(0, TINY["vocab_size"], (1, 6), device=DEVICE)
    with torch.no_grad():
        reference = model(idx)[:, -1]
        model.use_kernels("triton").setup_cache(1)
        model(idx[:, :5], start_pos=0)
        step = model(idx[:, 5:], start_pos=torch.tensor([5], device=DEVICE))[:, -1]
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-4)
