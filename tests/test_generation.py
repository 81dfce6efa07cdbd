"""Generation: the chapter's greedy loop, sampling, end-of-text, cropping, batches, bad input."""

import pytest
import torch

from gptfast import GPTModel, generate, generate_text_simple, generate_tokens

CFG = {"vocab_size": 61, "context_length": 8, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(CFG, kernels="torch").eval()


def reference_greedy(model, idx, n, context):  # written independently of gptfast.generation
    for _ in range(n):
        logits = model(idx[:, -context:])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def test_greedy_matches_a_plain_loop_and_crops_past_the_context(model):
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        expected = reference_greedy(model, idx, 12, CFG["context_length"])  # grows past 8 tokens
    out = generate_text_simple(model, idx, 12, CFG["context_length"])
    assert out.shape == (2, 15) and torch.equal(out, expected)
    assert torch.equal(generate(model, idx, 12), expected)  # temperature 0 is greedy
    assert torch.equal(generate(model, idx, 12), generate(model, idx, 12))


def test_sampling_is_reproducible_with_a_seeded_generator(model):
    idx = torch.tensor([[7, 8]])
    run = lambda seed: generate(model, idx, 10, temperature=1.5, top_k=5,
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    outs = {tuple(run(s)[0].tolist()) for s in range(6)}
    assert len(outs) > 1  # different seeds, different samples


def test_top_k_1_sampling_is_greedy(model):
    idx = torch.tensor([[3, 1, 4]])
    sampled = generate(model, idx, 6, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(model, idx, 6))


def test_top_k_restricts_samples_to_the_k_most_likely(model):
    idx = torch.tensor([[9, 9, 9]])
    with torch.no_grad():
        top3 = set(model(idx)[0, -1].topk(3).indices.tolist())
    for seed in range(20):
        nxt = generate(model, idx, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert nxt[0, -1].item() in top3


def test_eos_stops_each_row_and_pads(model):
    idx = torch.tensor([[1, 2], [5, 6]])
    greedy = generate(model, idx, 6)
    eos = greedy[0, 3].item()  # the second token row 0 generates
    out = generate(model, idx, 6, eos_id=eos)
    row0 = out[0, 2:].tolist()
    assert row0[:2] == greedy[0, 2:4].tolist()
    assert all(t == eos for t in row0[1:])  # padded with eos after finishing
    if eos not in greedy[1, 2:].tolist():
        assert out.shape[1] == greedy.shape[1]  # row 1 never finished: all steps ran
        assert torch.equal(out[1], greedy[1])


def test_streaming_yields_one_column_per_step(model):
    idx = torch.tensor([[1, 2, 3]])
    steps = list(generate_tokens(model, idx, 4))
    assert len(steps) == 4 and all(s.shape == (1, 1) for s in steps)
    assert torch.equal(torch.cat([idx, *steps], 1), generate(model, idx, 4))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative int"),
    ({"idx": torch.zeros(1, 0, dtype=torch.long)}, "non-empty"),
    ({"idx": torch.tensor([[1, 61]])}, "token id 61 is out of range"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_k": 0}, "top_k must be between 1 and the vocabulary size"),
    ({"top_k": 62}, "top_k must be between 1 and the vocabulary size"),
])
def test_bad_arguments_get_clear_errors(model, kwargs, match):
    args = {"idx": torch.tensor([[1, 2]]), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, **args)
    with pytest.raises(ValueError, match=match):  # checked on the call, not on first iteration
        generate_tokens(model, **args)
