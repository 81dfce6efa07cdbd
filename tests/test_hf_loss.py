"""gptfast.hf's fused training loss: causal_lm_loss() and apply(model, loss=...).

Tiny random causal LMs (2 layers, 64 wide, vocabulary 97), no downloads. The fused loss and
every parameter's gradient are compared with transformers' own loss (eager attention, logits,
``ForCausalLMLoss``) in float64 (the reference) and in the same dtype (the error budget, 2x
rule), on plain and right-padded batches; the forward without labels or in eval mode must be
transformers' own.
"""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("gptfast.hf")

from transformers import (
    BertModel,
    GPT2DoubleHeadsModel,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gptfast.kernels.testing import assert_agrees
from tests.test_hf import (
    DEVICE,
    VOCAB,
    bert_config,
    gpt2_config,
    kernel_calls,
    padding_mask,
    perturbed,
    slack,
    token_ids,
)

LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
              "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 0,
              "pad_token_id": 0}
MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(gpt2_config()),  # tied head: lm_head.weight is wte.weight
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),
}


def models(kind="gpt2", dtype=torch.float32):
    """(float64 eager, eager, ours) in training mode with the same weights, ours patched by
    ``apply`` (gptfast attention, LayerNorms, fused loss)."""
    torch.manual_seed(0)
    base = perturbed(MODELS[kind]()).to(DEVICE)
    base.set_attn_implementation("eager")
    ref, eager, ours = copy.deepcopy(base).double(), base.to(dtype), copy.deepcopy(base).to(dtype)
    report = hf.apply(ours, loss=True)
    assert report.fused_loss and "loss: fused" in str(report)
    return ref.train(), eager.train(), ours.train()


def loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, out.loss.detach(), grads


def assert_loss_agrees(ms, dtype=torch.float32, **batch):
    """Loss and gradients of ours against eager and the float64 reference; returns ours' output."""
    (_, ref_loss, ref_g), (_, eager_loss, eager_g), (out, loss, grads) = (
        loss_and_grads(m, **batch) for m in ms)
    assert loss.dtype == torch.float32
    assert_agrees(loss, eager_loss.float(), ref_loss, atol=slack(ref_loss, dtype), what="loss")
    assert grads.keys() == eager_g.keys() == ref_g.keys()
    for name, r in ref_g.items():
        assert grads[name].dtype == dtype
        assert_agrees(grads[name], eager_g[name], r, atol=slack(r, dtype), what=f"grad {name}")
    return out


def head_calls(model):
    """A list that records every call of the model's output head."""
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    return calls


# --- agreement with transformers' loss ----------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_loss_and_gradients_match_transformers_without_logits(padded):
    ms = models()
    calls = head_calls(ms[2])
    T, lengths = 13, [13, 7, 1, 10]
    ids = token_ids((len(lengths), T), low=1)
    mask = padding_mask(lengths, T, "right") if padded else None
    labels = ids.masked_fill(mask == 0, -100) if padded else ids
    out = assert_loss_agrees(ms, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and calls == []  # no (tokens x vocab) logits were made
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpt2_half_precision_loss_matches_transformers(dtype):
    ids = token_ids((3, 11), low=1)
    mask = padding_mask([11, 4, 8], 11, "right")
    assert_loss_agrees(models(dtype=dtype), dtype, input_ids=ids, attention_mask=mask,
                       labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_other_causal_lms_match_transformers(kind):
    ms = models(kind)
    calls = head_calls(ms[2])
    ids = token_ids((2, 9), low=1)
    mask = padding_mask([9, 5], 9, "right")
    out = assert_loss_agrees(ms, input_ids=ids, attention_mask=mask,
                             labels=ids.masked_fill(mask == 0, -100))
    assert out.logits is None and calls == [] and type(out).__name__ == "CausalLMOutputWithPast"


def test_trainer_keywords_num_items_in_batch_and_shift_labels():
    """What the Trainer passes: num_items_in_batch (the sum over that count, for gradient
    accumulation) and, with context parallelism, shift_labels (used unshifted)."""
    ms = models()
    ids = token_ids((2, 10), low=1)
    shifted = token_ids((2, 10), seed=1)
    shifted[1, 3:] = -100
    assert_loss_agrees(ms, input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(40))
    assert_loss_agrees(ms, input_ids=ids, labels=ids, shift_labels=shifted)
    forward = inspect.signature(ms[2].forward).parameters  # how the Trainer decides to pass them
    assert "labels" in forward and any(p.kind is p.VAR_KEYWORD for p in forward.values())


def test_causal_lm_loss_is_the_same_loss_in_any_mode():
    ref, eager, _ = models()
    ids = token_ids((3, 8), low=1)
    want = ref(input_ids=ids, labels=ids).loss
    calls = head_calls(eager)
    for mode in (True, False):
        eager.train(mode)
        got = hf.causal_lm_loss(eager, ids, ids)
        assert_agrees(got, eager(input_ids=ids, labels=ids).loss, want, atol=slack(want, torch.float32))
    assert len(calls) == 2  # only the two transformers forwards made logits


# --- what stays transformers' own -------------------------------------------------------------


def test_without_labels_or_in_eval_the_forward_is_transformers():
    _, eager, ours = models()
    ids = token_ids((2, 7), low=1)
    with torch.no_grad():
        want = eager(ids).logits
        assert torch.allclose(ours(ids).logits, want, rtol=1e-5, atol=1e-5)  # training, no labels
        ours.eval()
        eager.eval()
        out, base = ours(ids, labels=ids), eager(ids, labels=ids)  # eval: logits for metrics
    assert out.logits is not None and torch.allclose(out.loss, base.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.logits, base.logits, rtol=1e-5, atol=1e-5)


def test_tuple_outputs_copies_and_a_second_apply():
    _, _, ours = models()
    ids = token_ids((2, 6), low=1)
    loss = ours(ids, labels=ids).loss
    first = ours(ids, labels=ids, return_dict=False)[0]
    assert torch.equal(first, loss)
    twin = copy.deepcopy(ours)
    assert twin.forward.__self__ is twin and torch.equal(twin(ids, labels=ids).loss, loss)
    again = hf.apply(ours)
    assert again.fused_loss and again.loss_reason is None


def test_apply_loss_false_keeps_transformers_loss():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).to(DEVICE).train()
    report = hf.apply(model, loss=False)
    ids = token_ids((2, 6), low=1)
    assert not report.fused_loss and "forward" not in model.__dict__
    assert model(ids, labels=ids).logits is not None


# --- what cannot be fused -----------------------------------------------------------------------


def test_unsupported_models_are_refused_by_name_and_left_unchanged():
    torch.manual_seed(0)
    bert = BertModel(bert_config()).to(DEVICE)
    with pytest.raises(ValueError, match=r"BertModel \(model_type 'bert'\) is not one of"):
        hf.apply(bert, loss=True)
    assert bert.config._attn_implementation != "gptfast"  # raised before anything changed
    report = hf.apply(bert)  # loss=None: fused where supported, else the report says why
    assert not report.fused_loss and "BertModel" in report.loss_reason
    assert "loss: transformers' (BertModel" in str(report)
    double = GPT2DoubleHeadsModel(gpt2_config()).to(DEVICE)  # gpt2, but not the causal-LM class
    with pytest.raises(ValueError, match="GPT2DoubleHeadsModel"):
        hf.causal_lm_loss(double, token_ids((1, 4)), token_ids((1, 4)))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.causal_lm_loss(torch.nn.Linear(2, 2), token_ids((1, 4)), token_ids((1, 4)))


def test_a_custom_loss_function_is_refused():
    model = GPT2LMHeadModel(gpt2_config()).to(DEVICE)
    model.loss_function = lambda logits, labels, **kw: logits.sum()
    with pytest.raises(ValueError, match="loss_function of its own"):
        hf.apply(model, loss=True)


def test_a_head_wrapped_after_apply_is_refused_on_the_call():
    _, _, ours = models()
    lm_head = ours.lm_head
    ours.lm_head = torch.nn.Sequential(lm_head)  # e.g. an adapter: must not be bypassed
    ids = token_ids((1, 5), low=1)
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        ours(ids, labels=ids)


def test_bad_labels_are_named():
    _, _, ours = models()
    ids = token_ids((2, 5), low=1)
    with pytest.raises(ValueError, match=r"labels must have the inputs' shape \(2, 5\)"):
        ours(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match="give labels"):
        hf.causal_lm_loss(ours, ids)
    with pytest.raises(ValueError, match="out of range"):
        ours(ids, labels=ids.masked_fill(ids > 0, VOCAB))


def test_the_fused_op_is_what_runs(monkeypatch):
    _, _, ours = models()
    calls = kernel_calls(monkeypatch, "linear_cross_entropy")
    ids = token_ids((2, 5), low=1)
    ours(ids, labels=ids)
    ours(ids, labels=ids, num_items_in_batch=8)
    assert [c["reduction"] for c in calls] == ["mean", "sum"]


def test_the_trainer_trains_a_patched_model_as_the_original(tmp_path, monkeypatch):
    """transformers' Trainer (accelerate's loop: shuffled batches, gradient accumulation with
    num_items_in_batch, clipping, a linear schedule) trains the patched model as it trains the
    original: the same logged losses and final weights, fp32, with the fused loss (no logits) on
    every micro-step. SGD, so that the weights compare the gradients (AdamW's normalisation
    turns rounding noise in near-zero gradients into lr-sized steps)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    ids = token_ids((8, 12), low=1).cpu()  # the Trainer moves each batch to the model's device
    data = [{"input_ids": row, "labels": row} for row in ids]
    calls = kernel_calls(monkeypatch, "linear_cross_entropy")

    _, eager, ours = models()
    initial = {name: p.detach().clone() for name, p in eager.named_parameters()}
    head = head_calls(ours)
    logs = {}
    for name, model in (("eager", eager), ("ours", ours)):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, learning_rate=0.1,
                                 optim="sgd",
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 logging_steps=1, save_strategy="no", report_to=[], seed=0,
                                 use_cpu=DEVICE == "cpu", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        logs[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    fused = [c["reduction"] for c in calls]
    assert fused == ["sum"] * 6 and head == []  # 3 steps x 2 micro-steps, num_items_in_batch
    assert len(logs["ours"]) == 3
    torch.testing.assert_close(logs["ours"], logs["eager"], rtol=1e-4, atol=1e-5)
    eager_params = dict(eager.named_parameters())
    moved = max((p - initial[name]).abs().max().item() for name, p in eager_params.items())
    assert moved > 1e-2  # the steps changed the weights: their agreement below means something
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, eager_params[name], rtol=1e-5, atol=1e-6, msg=name)
