"""Providers that may be missing (our kernels while they are written, Liger-Kernel, Hugging Face
transformers), torch.compile'd eager ops, and the whole-model baselines, shared by the
benchmark modules."""

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def optional(module: str, attr: str, why: str | None = None):
    """``module.attr``, or skip the case saying what is missing."""
    mod = pytest.importorskip(module, reason=why or f"{module} is not available yet")
    if not hasattr(mod, attr):
        pytest.skip(f"{module}.{attr} is not available yet")
    return getattr(mod, attr)


def liger_layer_norm():
    """Liger-Kernel's LayerNorm autograd function, ``apply(x, weight, bias, eps)``, or a skip.

    Third-party code: any import failure (not only a missing package) skips its cases.
    """
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        pytest.skip(
            "Liger-Kernel is not installed (pip install liger-kernel; on the offline GPU "
            "machine bench/gpu_check.sh installs the wheels found in .gpu_wheels/)"
        )
    except Exception as exc:  # noqa: BLE001 - a broken third-party install must not fail us
        pytest.skip(f"Liger-Kernel failed to import: {type(exc).__name__}: {exc}")
    return LigerLayerNormFunction


def compile_settings() -> None:
    """Room in dynamo's cache for every case of a run (it recompiles per shape, dtype and grad
    mode), and no donated buffers: the backward-only cases call backward repeatedly through one
    graph (retain_graph=True), which donated buffers forbid."""
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    torch._functorch.config.donated_buffer = False


@functools.cache
def compiled(fn):
    """torch.compile of an eager op, specialised to each shape (one compile per case)."""
    compile_settings()
    return torch.compile(fn, dynamic=False)


def seeded(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, dtype, gen, scale=1.0, shift=0.0) -> torch.Tensor:
    """Normal samples drawn in fp32 (same values for every dtype), then cast."""
    x = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
    return (x * scale + shift).to(dtype)


def require_model_kernels() -> None:
    """Skip unless the kernels package exports what GPTModel(kernels="triton") calls."""
    from gptfast import kernels

    names = ("layer_norm", "add_layer_norm", "attention")
    missing = [n for n in names if not callable(getattr(kernels, n, None))]
    if missing:
        pytest.skip(f"the kernels package does not export {', '.join(missing)} yet")


# --- whole-model baselines (bench/test_model.py) ----------------------------------------------


def _sdpa_attend(self, queries, keys, values):
    """A MultiHeadAttention's attention math by torch SDPA (no KV cache: Tq == Tk, so SDPA's
    top-left causal mask is the chapter's)."""
    p = self.dropout.p if self.training else 0.0
    return F.scaled_dot_product_attention(queries, keys, values, dropout_p=p, is_causal=True)


def use_sdpa(model):
    """The chapter model (kernels="torch") with each attention's math done by SDPA, in place."""
    for block in model.trf_blocks:
        block.att._attend = types.MethodType(_sdpa_attend, block.att)
    return model


def compile_blocks(model):
    """torch.compile each transformer block in place (regional compilation): the blocks share
    one compiled graph, so compile time is one block's, not the model's. Embeddings, final norm
    and head stay eager."""
    compile_settings()
    for block in model.trf_blocks:
        block.compile(dynamic=False)
    return model


class HFLogits(nn.Module):
    """Hugging Face ``GPT2LMHeadModel`` behind the chapter model's call: ids -> logits.
    ``fused_loss``: the model was patched by ``gptfast.hf.apply`` and ``loss`` is its fused
    training loss (read by bench/test_model.py, as ``GPTModel.fused_loss``)."""

    def __init__(self, hf, chapter_names, fused_loss=False):
        super().__init__()
        self.hf = hf
        self.chapter_names = frozenset(chapter_names)
        self.fused_loss = fused_loss

    def forward(self, idx, attention_mask=None):
        return self.hf(input_ids=idx, attention_mask=attention_mask).logits

    def loss(self, idx, targets, attention_mask=None):
        """The training loss as the Trainer gets it, ``model(**batch).loss``, in training mode:
        fused, no logits. ``targets`` are per position (the chapter's: position t against
        targets[t]), so they go in as transformers' ``shift_labels`` (used unshifted);
        ``labels``, which asks for the loss, is the same tensor."""
        out = self.hf(input_ids=idx, attention_mask=attention_mask, labels=targets,
                      shift_labels=targets)
        if out.logits is not None:
            raise RuntimeError("hf-gptfast: the fused loss did not run (the model made logits)")
        return out.loss

    def to_chapter(self, named: dict) -> dict:
        """Tensors named as this module's parameters (e.g. gradients), renamed and reshaped as
        the chapter model's; the zero q/k/v biases the chapter model lacks are left out."""
        from gptfast.weights import hf_to_chapter

        mapped = hf_to_chapter({k.removeprefix("hf."): v for k, v in named.items()})
        return {k: v for k, v in mapped.items() if k in self.chapter_names}


def hf_gpt2(model, attn_implementation="sdpa") -> HFLogits:
    """Hugging Face GPT-2 of the chapter model's size, built offline from a ``GPT2Config``,
    holding the chapter model's weights: untied output head (as the chapter's), tanh GELU, eps
    1e-5, its dropout rates. ``attn_implementation``: "sdpa", "eager", or "gptfast"
    (``gptfast.hf.apply(model, loss=True)``: our attention, every LayerNorm swapped for
    ``gptfast.kernels.LayerNorm``, and the fused training loss). Skips if transformers is
    missing or cannot build it."""
    try:
        from transformers import AutoModelForCausalLM, GPT2Config
    except ImportError:
        pytest.skip("transformers is not installed (pip install transformers)")
    if attn_implementation == "gptfast":
        pytest.importorskip("gptfast.hf", reason="gptfast.hf needs transformers >=5.17,<6")
    cfg = model.cfg
    config = GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"], n_head=cfg["n_heads"], activation_function="gelu_new",
        layer_norm_epsilon=model.final_norm.eps, resid_pdrop=cfg["drop_rate"],
        embd_pdrop=cfg["drop_rate"], attn_pdrop=cfg["drop_rate"], tie_word_embeddings=False,
        use_cache=False, bos_token_id=cfg["vocab_size"] - 1, eos_token_id=cfg["vocab_size"] - 1,
    )
    weight = model.tok_emb.weight
    try:
        with torch.device(weight.device):
            hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001 - an old or broken install must not fail us
        pytest.skip(f"transformers cannot build GPT-2 with {attn_implementation}: "
                    f"{type(exc).__name__}: {exc}")
    hf.to(weight.dtype).train(model.training)
    from gptfast.weights import chapter_to_hf

    state = chapter_to_hf(model.state_dict(), zero_qkv_bias=True)  # GPT-2's c_attn has a bias
    missing, unexpected = hf.load_state_dict(state, strict=False)
    params = {name for name, _ in hf.named_parameters()}
    if set(missing) & params or unexpected:
        raise RuntimeError(f"weights do not map onto GPT2LMHeadModel: {missing}, {unexpected}")
    fused = False
    if attn_implementation == "gptfast":
        from gptfast.hf import apply

        fused = apply(hf, loss=True).fused_loss
    return HFLogits(hf, (name for name, _ in model.named_parameters()), fused)


def liger_fused_linear_cross_entropy():
    """Liger-Kernel's fused linear + cross-entropy as ``fn(hidden, weight, targets) -> loss``,
    or a skip (any import failure skips, as for its LayerNorm)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError:
        pytest.skip("Liger-Kernel is not installed (pip install liger-kernel)")
    except Exception as exc:  # noqa: BLE001 - a broken third-party install must not fail us
        pytest.skip(f"Liger-Kernel failed to import: {type(exc).__name__}: {exc}")
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

    def fn(hidden, weight, targets):
        out = loss_fn(weight, hidden, targets)
        return out[0] if isinstance(out, tuple) else out

    return fn
