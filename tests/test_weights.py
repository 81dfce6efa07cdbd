"""Loading weights: an independent oracle (Hugging Face GPT-2), chapter checkpoints, bad files."""

import pytest
import torch

from gptfast import GPTModel, load_gpt2, load_weights
from gptfast.weights import chapter_to_hf, hf_to_chapter
from tests.chapter_model import ChapterGPTModel

transformers = pytest.importorskip("transformers")


def hf_gpt2(n_embd, n_head, n_layer=2, vocab=113, n_positions=40, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so a mis-mapping cannot hide
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def cfg_for(hf):
    c = hf.config
    return {"vocab_size": c.vocab_size, "context_length": c.n_positions, "emb_dim": c.n_embd,
            "n_heads": c.n_head, "n_layers": c.n_layer, "drop_rate": 0.0, "qkv_bias": True}


@pytest.mark.parametrize("n_embd, n_head", [(64, 4), (96, 4), (80, 2), (72, 3)])  # head dims 16, 24, 40, 24
def test_hf_safetensors_logits_match_transformers(tmp_path, n_embd, n_head):
    hf = hf_gpt2(n_embd, n_head)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "model.safetensors"
    ours = load_weights(GPTModel(cfg_for(hf), kernels="torch"), path).eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 33))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-5


def test_load_gpt2_infers_the_config_from_safetensors_and_config_json(tmp_path):
    hf = hf_gpt2(72, 3, n_layer=3)  # emb 72 is no GPT-2 size: heads come from config.json
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_gpt2(tmp_path / "model.safetensors", kernels="torch").eval()
    assert model.cfg == cfg_for(hf)
    idx = torch.randint(0, 113, (1, 12))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5


def test_hf_state_dict_object_loads_too():
    hf = hf_gpt2(64, 4)
    ours = load_weights(GPTModel(cfg_for(hf), kernels="torch"), hf.state_dict()).eval()
    idx = torch.randint(0, 113, (1, 10))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-5


def test_chapter_pth_checkpoint_round_trip(tmp_path):
    cfg = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": False}
    torch.manual_seed(5)
    chapter = ChapterGPTModel(cfg).eval()
    path = tmp_path / "model.pth"
    torch.save({"model_state_dict": chapter.state_dict()}, path)  # the book's training checkpoint
    ours = load_weights(GPTModel(cfg, kernels="torch"), path).eval()
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(ours(idx), chapter(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_chapter_to_hf_is_the_exact_inverse_in_gpt2lmheadmodel_keys(qkv_bias):
    cfg = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": qkv_bias}
    torch.manual_seed(5)
    state = {k: v for k, v in GPTModel(cfg, kernels="torch").state_dict().items()
             if not k.endswith(".att.mask")}
    exported = chapter_to_hf(state)
    back = hf_to_chapter(exported)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     tie_word_embeddings=False)
    expected = {k: v.shape for k, v in transformers.GPT2LMHeadModel(config).state_dict().items()
                if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    with_bias = chapter_to_hf(state, zero_qkv_bias=True)  # GPT2LMHeadModel's c_attn has a bias
    assert {k: v.shape for k, v in with_bias.items()} == expected
    biases = [k for k in expected if k.endswith("c_attn.bias")]
    assert len(biases) == 2 and all(k in exported for k in biases) == qkv_bias
    assert qkv_bias or not any(with_bias[k].any() for k in biases)


def test_missing_key_is_named(tmp_path):
    hf = hf_gpt2(64, 4)
    state = hf.state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"checkpoint is missing .h\.1\.mlp\.c_fc\.bias"):
        load_weights(GPTModel(cfg_for(hf), kernels="torch"), state)


def test_shape_mismatch_names_key_and_both_shapes():
    hf = hf_gpt2(64, 4)
    cfg = {**cfg_for(hf), "context_length": 32}
    with pytest.raises(ValueError, match=r"'pos_emb\.weight': checkpoint has shape \(40, 64\), the model expects \(32, 64\)"):
        load_weights(GPTModel(cfg, kernels="torch"), hf.state_dict())


def test_config_mismatch_qkv_bias_and_layers():
    hf = hf_gpt2(64, 4)
    with pytest.raises(ValueError, match="set cfg\\['qkv_bias'\\] = True"):
        load_weights(GPTModel({**cfg_for(hf), "qkv_bias": False}, kernels="torch"), hf.state_dict())
    with pytest.raises(ValueError, match=r"checkpoint has 2 transformer blocks, the model's n_layers is 3"):
        load_weights(GPTModel({**cfg_for(hf), "n_layers": 3}, kernels="torch"), hf.state_dict())


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_gpt2(tmp_path / "nope.safetensors")
