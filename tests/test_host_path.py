"""The host path of the ops (gptfast/kernels/_common.py): direct launches, cached plans, no host
reads; CUDA-graph capture of dropout; the KV-cache decode step's kernels and its grad mode.

The direct launcher is checked against Triton's own dispatch in a process whose Triton driver is
a stub (bench/_host.py: the compiled kernels' host path on a machine without GPU), under the
installed triton and under triton 3.6 (the GPU machine's) when GPTFAST_TRITON36 names it.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptfast import GPTModel
from gptfast.kernels import _common, tuning
from gptfast.kernels.attention import attention, attention_dropout_mask, dropout_seed

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
TRITON36 = os.environ.get("GPTFAST_TRITON36")


def stub_run(what: str, triton_dir: str | None = None):
    """``python -m bench._host WHAT`` with Triton's driver stubbed (no GPU): its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPTFAST_PLAN_CC")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_dir, str(ROOT)]))
    env["CUDA_VISIBLE_DEVICES"] = ""  # the stub, also on a GPU machine
    out = subprocess.run([sys.executable, "-m", "bench._host", what], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("version", ["installed", "3.6"])
def test_direct_launches_are_tritons_own(version):
    """Every op's launches (forward, backward, decode; bench/_host.py's variant_cases too:
    LayerNorm's wide rows and flags, the fused loss's bias, reductions and chunks) pass the
    compiled kernel Triton's dispatch picks, with its grid, stream and arguments."""
    if version == "3.6" and not TRITON36:
        pytest.skip("GPTFAST_TRITON36 is unset (a `pip install --no-deps --target DIR "
                    "triton==3.6.0` directory; CI sets it)")
    assert stub_run("equivalence", os.path.abspath(TRITON36) if version == "3.6" else None) == []


def test_decode_step_kernels_per_token():
    """A greedy KV-cache step with the Triton kernels launches 8 kernels per layer on a GPU:
    add + LayerNorm (the previous block's residual add fused in), the QKV product
    (kernels.linear), decode attention (split, which also appends the step's key and value, +
    merge), out_proj (kernels.linear, its bias inside), add + LayerNorm, the MLP's two products
    (kernels.linear, the GELU in the first); and 9 per token (2 embeddings, their sum inside
    the first add + LayerNorm, lengths (2), final add + LayerNorm, head, argmax, positions, the
    token's append). The CPU run counts four more: the model's range checks of CPU token ids and
    positions (here a 2-layer model)."""
    kernels, host_reads = stub_run("count")
    assert kernels == 8 * 2 + 9 + 4
    assert host_reads == 4  # CPU only: token ids' and positions' range checks


def test_plans_are_cached_per_shape_and_context():
    """A cached plan is computed once per argument tuple, again under another plans_of, never
    under a tuning override, and again after the tables reload."""
    calls = []

    @_common.plan_cache
    def plan(n):
        calls.append(n)
        return object()

    first = plan(3)
    assert plan(3) is first and calls == [3]
    with _common.plans_of(80):
        assert plan(3) is not first
    assert plan(3) is first and len(calls) == 2
    with tuning.use({}):
        plan(3), plan(3)
    assert len(calls) == 4
    tuning.reload()
    assert plan(3) is not first and len(calls) == 5


def test_host_helpers_are_tritons():
    import triton

    for n in range(1, 3000):
        assert _common.next_power_of_2(n) == triton.next_power_of_2(n)
        assert _common.cdiv(n, 7) == triton.cdiv(n, 7) and _common.cdiv(-n, 16) == -(n // 16)


def test_kernel_config_names_every_constexpr():
    from gptfast.kernels import decode_attention  # noqa: F401

    merge = sys.modules["gptfast.kernels.decode_attention"]._MERGE
    with pytest.raises(TypeError, match=r"constexprs \['BLOCK_S'\] not given"):
        merge.config(BLOCK_D=16, num_warps=4)


# ---- dropout: the seed in device memory -----------------------------------------------------


@contextlib.contextmanager
def no_host_reads():
    """Fail on any read of a tensor's value by the host (what a CUDA graph cannot replay)."""
    def refuse(*_, **__):
        raise AssertionError("a tensor was read on the host")

    names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_dropout_reads_its_seed_on_the_device_only():
    """Forward and backward with dropout draw the seed into a tensor on q's device and the
    kernels load it: no value is read by the host (so a CUDA graph replays a fresh draw), and
    the mask is the one attention_dropout_mask rebuilds from the same generator state."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, device=DEVICE).requires_grad_()
               for _ in range(3))
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    with no_host_reads():
        out = attention(q, k, v, causal=False, dropout_p=0.5, generator=gen)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    keep = attention_dropout_mask(dropout_seed(torch.Generator(device=DEVICE).manual_seed(7), DEVICE),
                                  1, 2, 40, 40, 0.5, DEVICE)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * 16 ** -0.5, dim=-1) * keep / 0.5
    torch.testing.assert_close(out, weights @ v, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(gr).all() for gr in grads)


def tiny_train_model(seed=0):
    torch.manual_seed(seed)
    cfg = {"vocab_size": 64, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.2, "qkv_bias": False}
    return GPTModel(cfg, kernels="triton").to(DEVICE).train()


@cuda_only
def test_cuda_graph_captures_a_training_step_with_dropout():
    """A whole training step (forward with dropout in every attention, backward) captured as a
    CUDA graph: a replay equals the eager step from the same RNG state, and the next replay
    draws fresh masks."""
    model = tiny_train_model()
    params = list(model.parameters())
    ids = torch.randint(0, 64, (2, 32), device=DEVICE)
    targets = torch.randint(0, 64, (2, 32), device=DEVICE)

    def step():
        return torch.autograd.grad(model.loss(ids, targets), params)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    torch.cuda.manual_seed(11)
    eager = step()
    torch.cuda.manual_seed(11)
    graph.replay()
    for a, b in zip(static_grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    first = [g.clone() for g in static_grads]
    graph.replay()
    assert any(not torch.equal(a, b) for a, b in zip(first, static_grads))


@cuda_only
def test_reduce_overhead_compiles_a_training_step_with_dropout():
    """torch.compile(mode="reduce-overhead") keeps the loss and its backward in CUDA graphs (no
    skip for a host read or a CPU tensor) and each step draws fresh masks."""
    from torch._dynamo.utils import counters

    model = tiny_train_model()
    params = list(model.parameters())
    ids = torch.randint(0, 64, (2, 32), device=DEVICE)
    targets = torch.randint(0, 64, (2, 32), device=DEVICE)
    loss = torch.compile(model.loss, mode="reduce-overhead")
    counters.clear()
    grads = [[g.clone() for g in torch.autograd.grad(loss(ids, targets), params)]
             for _ in range(4)]
    assert not counters["inductor"]["cudagraph_skips"]
    assert any(not torch.equal(a, b) for a, b in zip(grads[-1], grads[-2]))


# ---- the KV-cache step in grad mode (issue 25) ----------------------------------------------


def test_cached_step_in_grad_mode_with_triton_kernels():
    """A decode step with kernels="triton" in grad mode works as the torch path's does (flash
    attention over the cache instead of the inference-only decode kernel), at int and per-row
    positions: the same logits, and the same gradients through the step's own keys."""
    cfg = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPTModel(cfg, kernels=kernels).to(DEVICE)
        for start in (5, torch.tensor([5, 5], device=DEVICE)):
            model.setup_cache(2)
            with torch.no_grad():
                model(ids[:, :5], start_pos=0)
            model.zero_grad()
            logits = model(ids[:, 5:6], start_pos=start)
            logits.sum().backward()
            out[kernels, isinstance(start, int)] = (
                logits.detach(), model.trf_blocks[1].att.W_key.weight.grad.clone())
    for per_row in (True, False):
        for ours, theirs in zip(out["triton", per_row], out["torch", per_row]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ---- the decode loop: eos looked for every 16 tokens ----------------------------------------


def test_generate_checks_eos_in_blocks_and_cuts_what_follows():
    """generate() looks for the end every EOS_CHECK_EVERY tokens: it returns exactly the tokens
    of a stream that checks after every token, when every row ends early and when one never does."""
    from gptfast import generate, generate_tokens
    from gptfast.generation import EOS_CHECK_EVERY

    cfg = {"vocab_size": 8, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    torch.manual_seed(3)
    model = GPTModel(cfg, kernels="torch").to(DEVICE).eval()
    idx = torch.randint(0, 8, (3, 4), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    steps = 2 * EOS_CHECK_EVERY + 5
    greedy = generate(model, idx, steps)
    for eos in range(8):
        out = generate(model, idx, steps, eos_id=eos)
        stream = torch.cat([idx, *generate_tokens(model, idx, steps, eos_id=eos)], dim=1)
        assert torch.equal(out, stream), eos
    ended = [e for e in range(8) if all((row[4:] == e).any() for row in greedy)]
    assert ended and any(generate(model, idx, steps, eos_id=e).shape[1] < 4 + steps for e in ended)


# ---- decode attention appends the step's key and value itself -------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits,plans", [(3, None), (1, None), (None, 90)])
def test_decode_attention_appends_the_new_key_and_value(dtype, splits, plans):
    """With k_new/v_new the kernel writes them at cache_len - 1 and attends them from registers:
    the caches afterwards and the output are those of appending first and attending after (the
    owner of the position in any chunk: first, middle, last; one chunk; sm_90's plan), and no
    other position changes (the tail past cache_len keeps its NaN)."""
    from tests.test_decode_attention import check, make_inputs

    from gptfast.kernels.decode_attention import decode_attention

    lens = [70, 1, 33]
    q, k, v = make_inputs(3, 2, 1, 64, 80, dtype, lens, seed=4)
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(3, 1, 3 * 2 * 64, generator=g).to(DEVICE, dtype)  # a fused projection
    kv = proj.view(3, 1, 3, 2, 64).permute(2, 0, 3, 1, 4)
    k_new, v_new = kv[1], kv[2]  # (3, 2, 1, 64) strided views
    expect_k, expect_v = k.clone(), v.clone()
    for b, n in enumerate(lens):
        expect_k[b, :, n - 1], expect_v[b, :, n - 1] = k_new[b, :, 0], v_new[b, :, 0]
    cache_len = torch.tensor(lens, device=DEVICE)
    with _common.plans_of(plans) if plans else contextlib.nullcontext(), torch.no_grad():
        out = decode_attention(q, k, v, cache_len, num_splits=splits, k_new=k_new, v_new=v_new)
        same = torch.isnan(expect_k) == torch.isnan(k)
        assert same.all() and torch.equal(k.nan_to_num(), expect_k.nan_to_num())
        assert torch.equal(v.nan_to_num(), expect_v.nan_to_num())
        appended_first, _ = check(q, expect_k, expect_v, cache_len, "appended first",
                                  num_splits=splits)
    torch.testing.assert_close(out, appended_first, rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_decode_attention_append_bad_input():
    from gptfast.kernels.decode_attention import decode_attention

    q, k = torch.randn(1, 2, 1, 16, device=DEVICE), torch.zeros(1, 2, 8, 16, device=DEVICE)
    with torch.no_grad():
        with pytest.raises(TypeError, match="give k_new and v_new together"):
            decode_attention(q, k, k.clone(), 3, k_new=q)
        with pytest.raises(ValueError, match="k_new must have q's shape"):
            decode_attention(q, k, k.clone(), 3, k_new=q[:, :1], v_new=q)
        q2 = torch.randn(1, 2, 2, 16, device=DEVICE)
        with pytest.raises(ValueError, match="one query"):
            decode_attention(q2, k, k.clone(), 3, k_new=q2, v_new=q2)
