"""gptfast.hf: attn_implementation="gptfast", apply(), padded batches, generation, fallbacks.

Tiny random Hugging Face GPT-2 and BERT models (2 layers, 64 wide, sequences <= 16), no
downloads: ``from_pretrained`` loads what ``save_pretrained`` wrote to tmp_path. Every result
is compared with transformers' eager attention in float64 (the reference) and in fp32 (the
error budget, 2x rule), on the positions that hold real tokens.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("gptfast.hf")

from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

from gptfast import kernels  # noqa: E402
from gptfast.kernels.testing import assert_agrees  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 97
ATOL = 1e-5


def gpt2_config(**kw):
    base = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32, attn_pdrop=0.0,
                resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2Config(**{**base, **kw})


def bert_config(**kw):
    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertConfig(**{**base, **kw})


def perturbed(model):
    """Non-trivial LayerNorm parameters (HF initialises them to 1 and 0)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def saved(tmp_path_factory, name, cls, config):
    """A directory holding ``cls(config)``, seeded and ``perturbed``, as save_pretrained writes it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    perturbed(cls(config)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return saved(tmp_path_factory, "gpt2", GPT2LMHeadModel, gpt2_config())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return saved(tmp_path_factory, "bert", BertModel, bert_config())


def load(cls, path, attn, dtype=torch.float32):
    return cls.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(DEVICE).eval()


def three(cls, path, via="from_pretrained", dtype=torch.float32):
    """(float64 eager, eager, ours) of the same weights, the last two in ``dtype``; ours loaded
    with attn_implementation="gptfast" or patched by apply()."""
    ref = load(cls, path, "eager", torch.float64)
    eager = load(cls, path, "eager", dtype)
    if via == "from_pretrained":
        ours = load(cls, path, "gptfast", dtype)
    else:
        ours = load(cls, path, "eager", dtype)
        hf.apply(ours)
    return ref, eager, ours


@pytest.fixture(autouse=True)
def fresh_warnings():
    hf._warned.clear()  # each test sees its own first fallback warning
    yield
    hf._warned.clear()


def token_ids(shape, low=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, tuple(shape), generator=g).to(DEVICE)


def padding_mask(lengths, T, side):
    """(B, T) int mask with each row's ``lengths[b]`` tokens on the given side."""
    pos = torch.arange(T)
    lens = torch.tensor(lengths)[:, None]
    mask = pos < lens if side == "right" else pos >= T - lens
    return mask.long().to(DEVICE)


def outputs_and_grads(model, ids, mask, valid):
    """The model's output at the real tokens (``valid``: (B, T) bool) and the gradient of a
    loss over those positions for every parameter it reaches (not BERT's pooler)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    picked = out[valid]
    (picked.square().mean() + picked.mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return picked.detach(), grads


def slack(ref, dtype):
    """ATOL in fp32; one unit in the last place at the reference's largest value in fp16/bf16."""
    return ATOL if dtype == torch.float32 else torch.finfo(dtype).eps * ref.abs().max().item()


def assert_model_agrees(models, ids, mask, valid, dtype=torch.float32):
    ref, eager, ours = (outputs_and_grads(m, ids, mask, valid) for m in models)
    assert ours[0].dtype == dtype
    assert_agrees(ours[0], eager[0], ref[0], atol=slack(ref[0], dtype), what="outputs")
    assert ours[1].keys() == eager[1].keys() == ref[1].keys()
    for name, r in ref[1].items():
        assert_agrees(ours[1][name], eager[1][name], r, atol=slack(r, dtype), what=f"grad {name}")


def kernel_calls(monkeypatch, op="attention"):
    """Record the keyword arguments of every ``kernels.<op>`` call gptfast.hf makes."""
    calls = []
    real = getattr(kernels, op)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf.kernels, op, spy)
    return calls


# --- registration, switching, apply ----------------------------------------------------------


def test_gptfast_is_registered_for_attention_and_masks():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["gptfast"] is hf.gptfast_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS["gptfast"] is hf.gptfast_mask


def test_from_pretrained_runs_our_kernel_and_matches_eager(gpt2_dir, monkeypatch):
    models = three(GPT2LMHeadModel, gpt2_dir)
    assert models[2].config._attn_implementation == "gptfast"
    calls = kernel_calls(monkeypatch)
    ids = token_ids((2, 13))
    valid = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    assert_model_agrees(models, ids, None, valid)
    assert len(calls) == 2 and all(c["causal"] for c in calls)  # one per layer


def test_set_attn_implementation_switches_both_ways(gpt2_dir):
    eager = load(GPT2LMHeadModel, gpt2_dir, "eager")
    model = copy.deepcopy(eager)
    ids = token_ids((2, 9))
    model.set_attn_implementation("gptfast")
    assert model.config._attn_implementation == "gptfast"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eager(ids).logits)


def test_apply_reports_what_it_replaced(gpt2_dir):
    model = load(GPT2LMHeadModel, gpt2_dir, "sdpa")
    params = {n: p for n, p in model.named_parameters()}
    report = hf.apply(model)
    assert report.attn_implementation == ("sdpa", "gptfast")
    assert report.attention_modules == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert report.layer_norms == ["transformer.h.0.ln_1", "transformer.h.0.ln_2",
                                  "transformer.h.1.ln_1", "transformer.h.1.ln_2",
                                  "transformer.ln_f"]
    assert all(type(model.get_submodule(n)) is kernels.LayerNorm for n in report.layer_norms)
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameters
    assert "5 modules swapped" in str(report)
    assert report.gelus == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]  # gelu_new
    assert all(type(model.get_submodule(n)) is torch.nn.GELU for n in report.gelus)
    assert "GELU: 2 modules fused" in str(report)
    again = hf.apply(model)  # idempotent: nothing left to replace
    assert again.attn_implementation == ("gptfast", "gptfast") and again.layer_norms == []
    assert again.gelus == []


def test_the_fused_gelu_is_gelu_new(gpt2_dir):
    """NewGELUActivation (eight elementwise ops) and the one-kernel tanh GELU that replaces it:
    the same function (float64: to rounding), forward and backward; gelu=False keeps it."""
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
    new, fused = NewGELUActivation()(x), torch.nn.GELU(approximate="tanh")(x)
    torch.testing.assert_close(fused, new, rtol=1e-12, atol=1e-14)
    grads = [torch.autograd.grad(y.sum(), x)[0] for y in (new, fused)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)
    model = load(GPT2LMHeadModel, gpt2_dir, "sdpa")
    assert hf.apply(model, gelu=False).gelus == []
    assert type(model.transformer.h[0].mlp.act) is NewGELUActivation


def test_apply_rejects_what_is_not_a_transformers_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.apply(torch.nn.Sequential(torch.nn.LayerNorm(8)))


def test_dropout_follows_the_model_config_in_training_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(attn_pdrop=0.25)).save_pretrained(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="gptfast").to(DEVICE)
    calls = kernel_calls(monkeypatch)
    ids = token_ids((1, 8))
    model.train()(ids)
    model.eval()(ids)
    assert [c["dropout_p"] for c in calls] == [0.25, 0.25, 0.0, 0.0]


def test_unsupported_attention_features_are_refused():
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="softcap"):
        hf.gptfast_attention(torch.nn.Module(), q, q, q, None, softcap=30.0)


# --- padding masks -> lengths (no kernel involved) ---------------------------------------------


@pytest.mark.parametrize("rows, side, lens", [
    ([[1, 1, 1], [1, 1, 1]], None, None),
    ([[1, 1, 0], [1, 0, 0], [1, 1, 1]], "right", [2, 1, 3]),
    ([[0, 1, 1], [0, 0, 1], [1, 1, 1]], "left", [2, 1, 3]),
    ([[0, 0, 0], [1, 1, 0]], "right", [0, 2]),  # an all-padding row fits either side
    ([[0, 0, 0], [0, 1, 1]], "left", [0, 2]),
])
def test_padding_side_finds_the_side_and_lengths(rows, side, lens):
    got_side, got_lens = hf.padding_side(torch.tensor(rows, dtype=torch.bool))
    assert got_side == side
    assert (got_lens is None) if lens is None else got_lens.tolist() == lens
    assert got_lens is None or got_lens.dtype == torch.int32


@pytest.mark.parametrize("rows, problem", [
    ([[1, 0, 1], [1, 1, 1]], "holes"),
    ([[0, 1, 0], [1, 1, 1]], "both sides"),
    ([[1, 1, 0], [0, 1, 1]], "different sides"),
])
def test_padding_side_rejects_what_lengths_cannot_say(rows, problem):
    with pytest.raises(hf.Unexpressible, match=problem):
        hf.padding_side(torch.tensor(rows, dtype=torch.bool))


# --- padded batches: GPT-2 (causal) and BERT (full attention) ----------------------------------


@pytest.mark.parametrize("via", ["from_pretrained", "apply"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_padded_batch_matches_eager(gpt2_dir, side, via, monkeypatch):
    models = three(GPT2LMHeadModel, gpt2_dir, via)
    calls = kernel_calls(monkeypatch)
    T, lengths = 13, [13, 7, 1, 10]
    ids = token_ids((len(lengths), T), low=1)
    mask = padding_mask(lengths, T, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.FallbackWarning)  # no fallback on a plain padding mask
        assert_model_agrees(models, ids, mask, mask.bool())
    assert calls and all(c["padding"] == side and c["key_lens"].tolist() == lengths for c in calls)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpt2_padded_batch_in_half_precision_matches_eager(gpt2_dir, dtype):
    models = three(GPT2LMHeadModel, gpt2_dir, dtype=dtype)
    T, lengths = 13, [13, 7, 1, 10]
    ids = token_ids((len(lengths), T), low=1)
    mask = padding_mask(lengths, T, "left")
    assert_model_agrees(models, ids, mask, mask.bool(), dtype)


def test_bert_padded_batch_matches_eager_at_every_position(bert_dir, monkeypatch):
    models = three(BertModel, bert_dir)
    calls = kernel_calls(monkeypatch)
    T, lengths = 11, [11, 4, 8]
    ids = token_ids((len(lengths), T), low=1)
    mask = padding_mask(lengths, T, "right")
    everywhere = torch.ones_like(mask, dtype=torch.bool)  # padded queries attend the real keys
    assert_model_agrees(models, ids, mask, everywhere)
    assert calls and all(not c["causal"] and c["query_lens"] is None for c in calls)


def test_bert_after_apply_matches_eager(bert_dir):
    models = three(BertModel, bert_dir, via="apply")
    assert type(models[2].embeddings.LayerNorm) is kernels.LayerNorm
    ids = token_ids((2, 9), low=1)
    mask = padding_mask([9, 5], 9, "left")
    assert_model_agrees(models, ids, mask, mask.bool())


@pytest.mark.parametrize("cache", [None, "static"])
def test_gpt2_generate_with_left_padded_prompts_matches_eager(gpt2_dir, cache):
    eager = load(GPT2LMHeadModel, gpt2_dir, "eager")
    ours = load(GPT2LMHeadModel, gpt2_dir, "gptfast")
    lengths, T = [6, 3, 5], 6
    ids = token_ids((3, T), low=1)
    mask = padding_mask(lengths, T, "left")
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              cache_implementation=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.FallbackWarning)
        got = ours.generate(ids, **kw)
    assert torch.equal(got, eager.generate(ids, **kw))


# --- masks the kernel cannot express ------------------------------------------------------------


def test_arbitrary_4d_mask_falls_back_to_sdpa_with_one_warning(gpt2_dir, monkeypatch):
    ref, eager, ours = three(GPT2LMHeadModel, gpt2_dir)
    calls = kernel_calls(monkeypatch)
    T = 9
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(2, 1, T, T, generator=g) < 0.6) | torch.eye(T, dtype=torch.bool)
    keep = (keep & torch.ones(T, T, dtype=torch.bool).tril()).to(DEVICE)

    def additive(dtype):
        return torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(
            ~keep, torch.finfo(dtype).min)

    ids = token_ids((2, T))
    with pytest.warns(hf.FallbackWarning, match="4-D attention mask") as record:
        got = ours(ids, attention_mask=additive(torch.float32)).logits
        ours(ids, attention_mask=additive(torch.float32))
    assert len(record) == 1 and calls == []
    with torch.no_grad():
        want = eager(ids, attention_mask=additive(torch.float32)).logits
        exact = ref(ids, attention_mask=additive(torch.float64)).logits
    assert_agrees(got.detach(), want, exact, atol=ATOL, what="4-D mask logits")


@pytest.mark.parametrize("rows, reason", [
    ([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], "holes"),
    ([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], "different sides"),
])
def test_inexpressible_padding_falls_back_to_sdpa(gpt2_dir, rows, reason, monkeypatch):
    ref, eager, ours = three(GPT2LMHeadModel, gpt2_dir)
    calls = kernel_calls(monkeypatch)
    mask = torch.tensor(rows, device=DEVICE)
    ids = token_ids(mask.shape, low=1)
    with pytest.warns(hf.FallbackWarning, match=reason):
        got = ours(ids, attention_mask=mask).logits
    assert calls == []
    with torch.no_grad():
        want, exact = eager(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_agrees(got.detach()[valid], want[valid], exact[valid], atol=ATOL, what="logits")


def test_a_raw_2d_mask_reaching_the_attention_function_is_refused():
    q = torch.randn(2, 2, 4, 16, device=DEVICE)
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)  # not from gptfast_mask: no tag
    with pytest.raises(ValueError, match="2-D attention mask"):
        hf.gptfast_attention(torch.nn.Module(), q, q, q, mask)


def test_fallback_can_be_made_an_error(gpt2_dir):
    ours = load(GPT2LMHeadModel, gpt2_dir, "gptfast")
    mask = torch.tensor([[1, 0, 1, 1]], device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.FallbackWarning)
        with pytest.raises(hf.FallbackWarning, match="holes"):
            ours(torch.ones(1, 4, dtype=torch.long, device=DEVICE), attention_mask=mask)
