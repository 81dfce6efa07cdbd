"""Loading weights: Hugging Face GPT-2 checkpoints and the chapter's own state_dicts. No downloads.

Hugging Face GPT-2 stores its linear layers as ``Conv1D`` (weight shape (in, out), the transpose
of ``nn.Linear``) and fuses the query/key/value projections into one ``c_attn``; the output head
shares the token embedding ``wte``. ``hf_to_chapter`` maps such a state_dict to this model's keys,
``chapter_to_hf`` back.
"""

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from gptfast.config import check_config
from gptfast.model import GPTModel

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # the four GPT-2 sizes
_HF_IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers
ESCAPE_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def load_error(exc: BaseException) -> str:
    """Why a weights or checkpoint file did not load, in one line without terminal escape codes:
    torch's weights-only refusal comes as six lines of advice, of which this keeps the reason."""
    text = ESCAPE_CODES.sub("", str(exc))
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            return f"it pickles a Python object ({found.group(1)}), not only tensors"
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return f"not a torch file of tensors ({found.group(1).strip() if found else 'unpickling failed'})"
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    if isinstance(exc, (IndexError, KeyError)):  # torch's legacy loader on text or other data
        return "not a torch file"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{re.split(r'(?<=[.!?]) ', lines[0])[0]:.200}"  # its first sentence


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file (``.pth``/``.pt``/``.bin``).

    Any file that is not such a state_dict (truncated, garbage, a pickled module, a dict of
    non-tensors) raises a ValueError naming the file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # each format fails its own way (EOFError, SafetensorError, ...)
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (.pth/.pt/.bin)"
        raise ValueError(f"{path}: not a readable {kind} weights file ({load_error(exc)})") from exc
    if isinstance(state, dict) and "model_state_dict" in state:  # the book's training checkpoints
        state = state["model_state_dict"]
    return check_tensors(state, str(path))


def check_tensors(state, where: str) -> dict[str, torch.Tensor]:
    """``state`` as a dict of str -> tensor, or a ValueError naming ``where`` and the bad entry."""
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a state_dict (a dict of tensors), found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{where}: expected a state_dict of tensors, but {key!r} holds {type(value).__name__}"
            )
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


def chapter_to_hf(state: dict, zero_qkv_bias: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_to_chapter``: a chapter state_dict under ``GPT2LMHeadModel``'s keys
    (``transformer.`` prefix, the chapter's untied ``lm_head.weight``, Conv1D weights (in, out),
    query/key/value fused into ``c_attn``). A model without q/k/v biases gets no ``c_attn.bias``,
    unless ``zero_qkv_bias`` (``GPT2LMHeadModel`` always has one): then zeros."""
    t = "transformer."
    out = {t + "wte.weight": state["tok_emb.weight"], t + "wpe.weight": state["pos_emb.weight"],
           t + "ln_f.weight": state["final_norm.scale"], t + "ln_f.bias": state["final_norm.shift"],
           "lm_head.weight": state["out_head.weight"]}
    for i in range(_layer_count(state)):
        h, b = f"{t}h.{i}.", f"trf_blocks.{i}."
        qkv = [state[f"{b}att.W_{name}.weight"] for name in ("query", "key", "value")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv).t()
        if b + "att.W_query.bias" in state:
            out[h + "attn.c_attn.bias"] = torch.cat(
                [state[f"{b}att.W_{name}.bias"] for name in ("query", "key", "value")])
        elif zero_qkv_bias:
            out[h + "attn.c_attn.bias"] = qkv[0].new_zeros(3 * qkv[0].shape[0])
        for dst, src in (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"),
                         ("mlp.c_proj", "ff.layers.2")):
            out[h + dst + ".weight"] = state[b + src + ".weight"].t()
            out[h + dst + ".bias"] = state[b + src + ".bias"]
        for dst, src in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[h + dst + ".weight"] = state[b + src + ".scale"]
            out[h + dst + ".bias"] = state[b + src + ".shift"]
    return {k: v.contiguous() for k, v in out.items()}


def load_weights(model: GPTModel, source) -> GPTModel:
    """Load a path or state_dict (Hugging Face GPT-2 or chapter format) into ``model``, in place.

    Every mismatch is found before the model changes: on error its weights are as they were.
    """
    if not isinstance(model, GPTModel):
        raise TypeError(f"model must be a GPTModel, got {type(model).__name__}")
    if isinstance(source, (str, os.PathLike)):
        with _named(source):
            return load_weights(model, read_checkpoint(source))
    if not isinstance(source, dict):
        raise TypeError(f"source must be a path or a state_dict, got {type(source).__name__}")
    state = check_tensors(dict(source), "state_dict")
    if is_hf_gpt2(state):
        state = hf_to_chapter(state)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


@contextlib.contextmanager
def _named(path):
    """Prefix the ValueErrors raised inside with the file they are about (once)."""
    try:
        yield
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {exc}") from exc


def _layer_count(keys) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith("trf_blocks.")})


def check_state_dict(model: GPTModel, state: dict) -> None:
    """Raise naming the first missing, unexpected or mis-shaped key (the ``mask`` keys are optional)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    expected = {k: v.shape for k, v in tensors}  # the state_dict's keys, less the masks it builds
    given = {k: v for k, v in state.items() if not k.endswith(".att.mask")}
    if "tok_emb.weight" not in given:
        raise ValueError(
            "checkpoint is not a GPT-2 of the chapter's (or Hugging Face's) layout: it has no "
            f"'tok_emb.weight' (keys: {sorted(given)[:5]})"
        )
    ours, theirs = _layer_count(expected), _layer_count(given)
    if ours != theirs:
        raise ValueError(f"checkpoint has {theirs} transformer blocks, the model's n_layers is {ours}")
    for key, shape in expected.items():
        if key not in given:
            bias = key.endswith(("W_query.bias", "W_key.bias", "W_value.bias"))
            hint = " (cfg['qkv_bias'] is True but the checkpoint has no q/k/v bias)" if bias else ""
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
    for key in ("tok_emb.weight", "pos_emb.weight"):
        if key not in state or state[key].dim() != 2:
            raise ValueError(
                f"checkpoint is not a GPT-2 of the chapter's (or Hugging Face's) layout: no 2-D "
                f"{key!r} (keys: {sorted(state)[:5]})"
            )
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
    with _named(path):
        n_heads = None
        if is_hf_gpt2(state):
            state = hf_to_chapter(state)
            hf_config = Path(path).with_name("config.json")
            if hf_config.is_file():
                n_heads = _hf_heads(hf_config)
        cfg = cfg or infer_config(state, drop_rate, n_heads)
        return load_weights(GPTModel(cfg, kernels=kernels), state)


def _hf_heads(config_file: Path) -> int | None:
    """``n_head`` from a Hugging Face config.json (None when it has none)."""
    try:
        hf = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_file}: not a readable JSON config ({exc})") from exc
    n_heads = hf.get("n_head") if isinstance(hf, dict) else None
    if n_heads is not None and (not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads <= 0):
        raise ValueError(f"{config_file}: n_head must be a positive int, got {n_heads!r}")
    return n_heads
