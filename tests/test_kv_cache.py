"""KV-cache generation gives the chapter's tokens, for both kernel sets, past the context length."""

import pytest
import torch

from gptfast import GPTModel, generate, generate_batch, generate_text_simple

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = {"vocab_size": 89, "context_length": 12, "emb_dim": 48, "n_heads": 3, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": True}


def model_for(kernels, seed=0):
    torch.manual_seed(seed)
    return GPTModel(CFG, kernels=kernels).to(DEVICE).eval()


@pytest.mark.parametrize("prompt_len, new", [(1, 6), (5, 4), (9, 10), (12, 3)])
def test_cached_greedy_is_token_identical_to_the_chapter_loop(prompt_len, new):
    model = model_for("torch")
    idx = torch.randint(0, CFG["vocab_size"], (2, prompt_len), device=DEVICE)
    expected = generate_text_simple(model, idx, new, CFG["context_length"])
    assert torch.equal(generate(model, idx, new, use_cache=True), expected)
    assert torch.equal(generate(model, idx, new, use_cache=False), expected)
    assert model.trf_blocks[0].att.cache is None  # freed afterwards


def test_cached_greedy_with_triton_kernels_matches_the_chapter_loop():
    model = model_for("triton")
    idx = torch.randint(0, CFG["vocab_size"], (2, 4), device=DEVICE)
    expected = generate_text_simple(model.use_kernels("torch"), idx, 10, CFG["context_length"])
    assert torch.equal(generate(model.use_kernels("triton"), idx, 10), expected)  # crosses 12


def test_shorter_context_size_crops_like_the_chapter():
    model = model_for("torch")
    idx = torch.randint(0, CFG["vocab_size"], (1, 3), device=DEVICE)
    expected = generate_text_simple(model, idx, 8, context_size=5)
    assert torch.equal(generate(model, idx, 8, context_size=5), expected)


def test_cached_sampling_matches_uncached_sampling():
    model = model_for("torch")
    idx = torch.randint(0, CFG["vocab_size"], (3, 4), device=DEVICE)
    run = lambda cache: generate(model, idx, 7, temperature=1.0, top_k=10, use_cache=cache,
                                 generator=torch.Generator(DEVICE).manual_seed(3))
    assert torch.equal(run(True), run(False))


def test_step_logits_match_a_full_forward():
    model = model_for("torch")
    idx = torch.randint(0, CFG["vocab_size"], (2, 9), device=DEVICE)
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(2)
        prefill = model(idx[:, :5], start_pos=0)
        steps = [model(idx[:, i:i + 1], start_pos=i) for i in range(5, 9)]
        model.setup_cache(2)(idx[:, :5], start_pos=0)  # a fresh cache, per-row positions next
        per_row_step = model(idx[:, 5:6], start_pos=torch.tensor([5, 5], device=DEVICE))
    torch.testing.assert_close(prefill, full[:, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_row_step, full[:, 5:6], rtol=1e-5, atol=1e-5)
    assert not [n for n, _ in model.named_buffers()]  # the cache is not module state
    assert all(".cache" not in k for k in model.state_dict())


def test_cache_misuse_gets_clear_errors():
    model = model_for("torch")
    ids = torch.zeros(1, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(RuntimeError, match="call model.setup_cache"):
        model(ids, start_pos=0)
    model.setup_cache(1, max_len=8)
    with pytest.raises(ValueError, match="do not fit the KV cache of 8 positions"):
        model(ids, start_pos=6)
    with pytest.raises(ValueError, match="holds 1 rows, got a batch of 2"):
        model(torch.zeros(2, 1, dtype=torch.long, device=DEVICE), start_pos=0)
    with pytest.raises(ValueError, match=r"max_len must be in \[1, 12\]"):
        model.setup_cache(1, max_len=13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_graph_decode_matches_plain_decode(kernels):
    model = model_for(kernels)
    idx = torch.randint(0, CFG["vocab_size"], (4, 3), device=DEVICE)
    plain = generate(model, idx, 15, cuda_graph=False)
    assert torch.equal(generate(model, idx, 15, cuda_graph=True), plain)
    assert torch.equal(plain, generate_text_simple(model, idx, 15, CFG["context_length"]))
    prompts = [torch.randint(0, CFG["vocab_size"], (n,)) for n in (1, 6, 3)]
    graphed = generate_batch(model, prompts, 5, cuda_graph=True)
    for row, plain_row in zip(graphed, generate_batch(model, prompts, 5, cuda_graph=False)):
        assert torch.equal(row, plain_row)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_batched_prompts_of_different_lengths_match_one_by_one(kernels):
    model = model_for(kernels)
    prompts = [torch.randint(0, CFG["vocab_size"], (n,)) for n in (1, 6, 3)]
    out = generate_batch(model, prompts, 5)
    for prompt, row in zip(prompts, out):
        alone = generate(model, prompt[None].to(DEVICE), 5)[0]
        assert torch.equal(row, alone)
        assert torch.equal(row[: len(prompt)].cpu(), prompt)


def test_batched_prompts_stop_at_eos_and_past_the_context_go_one_by_one():
    model = model_for("torch")
    prompts = [torch.randint(0, CFG["vocab_size"], (n,)) for n in (2, 4)]
    greedy = generate_batch(model, prompts, 6)
    eos = greedy[0][3].item()  # row 0's second new token
    cut = generate_batch(model, prompts, 6, eos_id=eos)
    assert torch.equal(cut[0], greedy[0][:4])
    long = generate_batch(model, prompts, 11)  # 4 + 11 > context 12: cropped like the chapter
    for prompt, row in zip(prompts, long):
        assert torch.equal(row, generate_text_simple(model, prompt[None].to(DEVICE), 11, 12)[0])


def test_batched_prompts_bad_input():
    model = model_for("torch")
    with pytest.raises(ValueError, match="non-empty list of non-empty"):
        generate_batch(model, [torch.tensor([1]), torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="non-empty list"):
        generate_batch(model, [], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels are counted on CUDA")
def test_a_decode_step_launches_8_cuda_kernels_a_layer():
    """With the Triton kernels a cached one-token step launches 8 CUDA kernels a layer: add +
    LayerNorm, the QKV product, decode attention's split (which appends the key and value) and
    merge, out_proj, add + LayerNorm, the MLP's two products (kernels.linear: each product's
    bias, and the GELU, inside; torch's biased F.linear at one row is a bias copy and a GEMM).
    Counted as the difference between a 2-layer and a 1-layer model's step (the profiler's
    kernels, copies and memsets excluded)."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(layers):
        torch.manual_seed(0)
        model = GPTModel({**CFG, "n_layers": layers}, kernels="triton").to(DEVICE).eval()
        model.setup_cache(1, max_len=CFG["context_length"])
        ids = torch.randint(0, CFG["vocab_size"], (1, 5), device=DEVICE)
        with torch.no_grad():
            model(ids, start_pos=0)
            model(ids[:, :1], start_pos=torch.tensor([5], device=DEVICE))  # warm-up: compiles
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(ids[:, :1], start_pos=torch.tensor([6], device=DEVICE))
                torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not any(w in e.name.lower() for w in ("memcpy", "memset")))

    assert kernels(2) - kernels(1) == 8
