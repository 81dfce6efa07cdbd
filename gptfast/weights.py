"""Loading weights: Hugging Face GPT-2 checkpoints and the chapter's own state_dicts. No downloads.

Hugging Face GPT-2 stores its linear layers as ``Conv1D`` (weight shape (in, out), the transpose
of ``nn.Linear``) and fuses the query/key/value projections into one ``c_attn``; the output head
shares the token embedding ``wte``. ``hf_to_chapter`` maps such a state_dict to this model's keys.
"""

import json
from pathlib import Path

import torch

from gptfast.config import check_config
from gptfast.model import GPTModel

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # the four GPT-2 sizes
_HF_IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file (``.pth``/``.pt``/``.bin``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state_dict" in state:  # the book's training checkpoints
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return state


def is_hf_gpt2(state: dict) -> bool:
    return any(k == "wte.weight" or k.endswith(".wte.weight") for k in state)


def hf_to_chapter(state: dict) -> dict[str, torch.Tensor]:
    """Map a Hugging Face GPT-2 state_dict (``GPT2Model`` or ``GPT2LMHeadModel``) to chapter keys."""
    hf = {k.removeprefix("transformer."): v for k, v in state.items() if not k.endswith(_HF_IGNORED)}
    head = hf.pop("lm_head.weight", None)

    def take(key):
        if key not in hf:
            raise ValueError(f"the GPT-2 checkpoint is missing {key!r}")
        return hf.pop(key)

    out = {
        "tok_emb.weight": take("wte.weight"),
        "pos_emb.weight": take("wpe.weight"),
        "final_norm.scale": take("ln_f.weight"),
        "final_norm.shift": take("ln_f.bias"),
    }
    out["out_head.weight"] = out["tok_emb.weight"] if head is None else head
    n_layers = len({k.split(".")[1] for k in hf if k.startswith("h.")})
    for i in range(n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q, k, v = take(h + "attn.c_attn.weight").t().chunk(3, dim=0)
        out.update({b + "att.W_query.weight": q, b + "att.W_key.weight": k, b + "att.W_value.weight": v})
        if h + "attn.c_attn.bias" in hf:
            qb, kb, vb = take(h + "attn.c_attn.bias").chunk(3)
            out.update({b + "att.W_query.bias": qb, b + "att.W_key.bias": kb, b + "att.W_value.bias": vb})
        for src, dst in (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"),
                         ("mlp.c_proj", "ff.layers.2")):
            out[b + dst + ".weight"] = take(h + src + ".weight").t()
            out[b + dst + ".bias"] = take(h + src + ".bias")
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[b + dst + ".scale"] = take(h + src + ".weight")
            out[b + dst + ".shift"] = take(h + src + ".bias")
    if hf:
        raise ValueError(f"unexpected key(s) in the GPT-2 checkpoint: {sorted(hf)[:5]}")
    return {k: t.contiguous() for k, t in out.items()}


def load_weights(model: GPTModel, source) -> GPTModel:
    """Load a path or state_dict (Hugging Face GPT-2 or chapter format) into ``model``, in place."""
    state = read_checkpoint(source) if isinstance(source, (str, Path)) else dict(source)
    if is_hf_gpt2(state):
        state = hf_to_chapter(state)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def check_state_dict(model: GPTModel, state: dict) -> None:
    """Raise naming the first missing, unexpected or mis-shaped key (the ``mask`` keys are optional)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith(".att.mask")}
    given = {k: v for k, v in state.items() if not k.endswith(".att.mask")}
    for key, shape in expected.items():
        if key not in given:
            hint = " (cfg['qkv_bias'] is True but the checkpoint has no q/k/v bias)" if "W_" in key else ""
            raise ValueError(f"checkpoint is missing {key!r} of shape {tuple(shape)}{hint}")
        if given[key].shape != shape:
            raise ValueError(
                f"{key!r}: checkpoint has shape {tuple(given[key].shape)}, the model expects "
                f"{tuple(shape)}; does the config match the checkpoint?"
            )
    extra = sorted(set(given) - set(expected))
    if extra:
        hint = " (the checkpoint has q/k/v biases: set cfg['qkv_bias'] = True)" if "bias" in extra[0] else ""
        raise ValueError(f"unexpected key(s) in checkpoint: {extra[:5]}{hint}")


def infer_config(state: dict, drop_rate: float = 0.0, n_heads: int | None = None) -> dict:
    """The config a chapter-format state_dict was made with (heads from the GPT-2 size table)."""
    vocab, width = state["tok_emb.weight"].shape
    if n_heads is None and width not in HEADS_BY_WIDTH:
        raise ValueError(f"cannot infer n_heads for emb_dim {width}; pass cfg explicitly")
    return check_config({
        "vocab_size": vocab,
        "context_length": state["pos_emb.weight"].shape[0],
        "emb_dim": width,
        "n_heads": n_heads or HEADS_BY_WIDTH[width],
        "n_layers": len({k.split(".")[1] for k in state if k.startswith("trf_blocks.")}),
        "drop_rate": drop_rate,
        "qkv_bias": "trf_blocks.0.att.W_query.bias" in state,
    })


def load_gpt2(path, cfg: dict | None = None, kernels: str = "auto", drop_rate: float = 0.0) -> GPTModel:
    """Build a ``GPTModel`` from a weights file; the config is inferred unless given.

    For a Hugging Face checkpoint, ``n_head`` is read from a ``config.json`` beside the file
    when there is one. Dropout defaults to 0 (inference).
    """
    state = read_checkpoint(path)
    n_heads = None
    if is_hf_gpt2(state):
        state = hf_to_chapter(state)
        hf_config = Path(path).with_name("config.json")
        if hf_config.is_file():
            n_heads = json.loads(hf_config.read_text()).get("n_head")
    cfg = cfg or infer_config(state, drop_rate, n_heads)
    return load_weights(GPTModel(cfg, kernels=kernels), state)
