"""The model keeps the chapter's promises: keys, shapes, initial weights, forward, checkpoints."""

import io

import pytest
import torch

import gptfast
from gptfast import GPTModel
from tests.chapter_model import ChapterGPTModel

SMALL = {"vocab_size": 97, "context_length": 24, "emb_dim": 48, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.1, "qkv_bias": False}


def build_both(cfg, seed=123):
    torch.manual_seed(seed)
    chapter = ChapterGPTModel(cfg)
    torch.manual_seed(seed)
    ours = GPTModel(cfg, kernels="torch")
    return chapter, ours


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_state_dict_keys_and_shapes_match_the_chapter(qkv_bias):
    chapter, ours = build_both({**SMALL, "qkv_bias": qkv_bias})
    ref = chapter.state_dict()
    got = ours.state_dict()
    assert list(got) == list(ref)  # same keys, same order, masks included
    for key in ref:
        assert got[key].shape == ref[key].shape, key
    assert "trf_blocks.1.att.W_query.weight" in got and "trf_blocks.0.norm1.scale" in got
    assert "trf_blocks.0.ff.layers.0.weight" in got and "final_norm.shift" in got


def test_seeded_initial_weights_are_bit_identical():
    chapter, ours = build_both(SMALL, seed=7)
    for (key, a), (_, b) in zip(chapter.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), key


def test_forward_agrees_with_the_chapter_in_fp32():
    chapter, ours = build_both(SMALL)
    chapter.eval(), ours.eval()
    idx = torch.randint(0, SMALL["vocab_size"], (3, 17))
    torch.testing.assert_close(ours(idx), chapter(idx), rtol=1e-5, atol=1e-5)


def test_chapter_book_example_output_shape():
    torch.manual_seed(123)
    model = GPTModel(gptfast.GPT_CONFIG_124M, kernels="torch")
    batch = torch.tensor([[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]])
    assert model(batch).shape == (2, 4, 50257)


def test_chapter_checkpoint_with_mask_buffers_loads_strictly():
    chapter, _ = build_both(SMALL, seed=1)
    buf = io.BytesIO()
    torch.save(chapter.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "trf_blocks.0.att.mask" in state
    torch.manual_seed(99)
    ours = GPTModel(SMALL, kernels="torch")
    ours.load_state_dict(state, strict=True)
    # no T x T buffer is kept per layer
    assert not [name for name, _ in ours.named_buffers()]
    chapter.eval(), ours.eval()
    idx = torch.randint(0, SMALL["vocab_size"], (2, 9))
    torch.testing.assert_close(ours(idx), chapter(idx), rtol=1e-5, atol=1e-5)


def test_our_checkpoint_loads_strictly_into_the_chapter_model():
    chapter, ours = build_both(SMALL, seed=3)
    torch.nn.init.normal_(ours.trf_blocks[0].att.W_key.weight)
    chapter.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(chapter.trf_blocks[0].att.W_key.weight, ours.trf_blocks[0].att.W_key.weight)
    assert torch.equal(chapter.trf_blocks[1].att.mask, torch.triu(torch.ones(24, 24), 1))


def test_mask_of_the_wrong_size_is_named():
    chapter, ours = build_both(SMALL)
    state = chapter.state_dict()
    state["trf_blocks.0.att.mask"] = torch.ones(5, 5)
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.att\.mask.*\(5, 5\)"):
        ours.load_state_dict(state)


def test_use_kernels_switches_without_touching_weights():
    model = GPTModel(SMALL, kernels="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.use_kernels("triton") is model
    assert model.kernels == "triton" and model.trf_blocks[1].norm2.kernels == "triton"
    assert model.trf_blocks[0].att.kernels == "triton" and model.final_norm.kernels == "triton"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_auto_kernels_use_torch_for_cpu_inputs():
    chapter, ours = build_both(SMALL)
    ours.use_kernels("auto")
    chapter.eval(), ours.eval()
    idx = torch.randint(0, SMALL["vocab_size"], (1, 5))
    torch.testing.assert_close(ours(idx), chapter(idx), rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_training_only():
    model = GPTModel({**SMALL, "drop_rate": 0.5}, kernels="torch")
    idx = torch.randint(0, SMALL["vocab_size"], (2, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.tensor([[1, 97]]), ValueError, "token id 97 is out of range for vocab_size 97"),
        (torch.tensor([[-1, 2]]), ValueError, "token id -1 is out of range"),
        (torch.zeros(1, 25, dtype=torch.long), ValueError, "sequence length 25 exceeds the context length 24"),
        (torch.zeros(1, 3), TypeError, "int64 or int32 tensor, got torch.float32"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"shape \(batch, seq_len\), got \(3,\)"),
    ],
)
def test_bad_token_ids_get_clear_errors(bad, error, match):
    model = GPTModel(SMALL, kernels="torch")
    with pytest.raises(error, match=match):
        model(bad)


def test_unknown_kernels_value_and_config_keys_are_rejected():
    with pytest.raises(ValueError, match="kernels must be one of"):
        GPTModel(SMALL, kernels="cuda")
    with pytest.raises(ValueError, match="kernels must be one of"):
        GPTModel(SMALL, kernels="torch").use_kernels("fast")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['emb_size'\]"):
        GPTModel({**SMALL, "emb_size": 10})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['qkv_bias'\]"):
        GPTModel({k: v for k, v in SMALL.items() if k != "qkv_bias"})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTModel({**SMALL, "n_heads": 5})


def test_triton_on_cpu_without_interpreter_says_it_needs_cuda(monkeypatch):
    import gptfast.kernels._common as common

    monkeypatch.setattr(common, "INTERPRETING", False)
    model = GPTModel(SMALL, kernels="triton")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "name, total",
    [("124M", 163_009_536), ("355M", 406_212_608), ("774M", 838_220_800), ("1558M", 1_637_792_000)],
)
def test_parameter_counts_match_the_chapter(name, total):
    from gptfast.cli import parameter_counts

    with torch.device("meta"):
        model = GPTModel(gptfast.get_config(name), kernels="torch")
    counts = parameter_counts(model)
    assert counts["total"] == total
    assert counts["tied"] == total - 50257 * model.cfg["emb_dim"]
