"""Hugging Face transformers integration: ``attn_implementation="gptfast"``, ``apply(model)``
and the fused training loss ``causal_lm_loss(model, input_ids, labels)``.

Importing this module (transformers is imported here, never by ``gptfast`` itself) registers
``"gptfast"`` twice with transformers, as its functional attention API asks:

- ``AttentionInterface``: the attention function, ``gptfast.kernels.attention`` (flash attention, with
  per-row key/query lengths for padded batches);
- ``AttentionMaskInterface``: the mask function that turns the model's 2-D padding mask into
  those lengths. Without one, transformers would build no mask at all for an unknown name and
  padding would be silently ignored.

So ``GPT2LMHeadModel.from_pretrained(path, attn_implementation="gptfast")``,
``model.set_attn_implementation("gptfast")`` and ``apply(model)`` (attention + every
``nn.LayerNorm`` through ``gptfast.kernels.swap_layer_norms`` + the loss) all run our kernels.

Loss. A causal LM's logits (tokens x vocab: 0.8 GB in bf16 at 8 x 1024 tokens of GPT-2) exist
in training only to be reduced to the loss. ``causal_lm_loss`` computes transformers' causal-LM
loss (labels shifted inside, -100 ignored, ``num_items_in_batch``, ``shift_labels``) from the
base model's last hidden state with ``gptfast.kernels.linear_cross_entropy``, never making
them; ``apply`` makes the model's own forward do so in training mode with labels (the
Trainer's ``model(**batch).loss``), returning ``logits=None`` there as Liger-Kernel does.

Masks. transformers hands the mask function the tokenizer's (batch, kv_len) padding mask and
the kind of mask the model wants (causal or bidirectional), with the query offset of a KV cache.
A mask the kernel can express is returned as a (batch, width) bool tensor (the form that
FlashAttention models already pass through their layers), tagged with the ``Padding`` it
stands for: each row's valid tokens one contiguous run, all rows padded on the same side
(right: training batches; left: batched generation). Anything else, as a mask with holes,
rows padded on different sides, packed sequences, sliding windows or a 4-D mask made by the
caller, runs through transformers' SDPA path instead, with one ``FallbackWarning`` per reason
(``warnings.simplefilter("error", FallbackWarning)`` makes it an error): never a silently
wrong answer.

Cost: deciding the side and validating a 2-D mask reads values, so the mask function does a
handful of (batch, kv_len) reductions and one device-to-host copy of five booleans: one host
sync per forward (not per layer; transformers' own SDPA mask does a similar one to skip
all-ones masks). A forward without a padding mask does none.
"""

import dataclasses
import functools
import inspect
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptfast import kernels

NAME = "gptfast"
MIN_TRANSFORMERS = (5, 17)  # tested: 5.17 (the GPU machine) and 5.25 (CI)
BELOW_TRANSFORMERS = (6, 0)
SUPPORTED_TRANSFORMERS = ">=5.17,<6"


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"gptfast.hf needs Hugging Face transformers {SUPPORTED_TRANSFORMERS} "
            "(pip install 'gptfast-triton[hf]')"
        ) from exc
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRANSFORMERS:
        raise ImportError(
            f"gptfast.hf needs transformers {SUPPORTED_TRANSFORMERS}, found "
            f"{transformers.__version__} (its attention and mask interfaces differ)"
        )
    if version >= BELOW_TRANSFORMERS:
        warnings.warn(
            f"gptfast.hf is tested with transformers {SUPPORTED_TRANSFORMERS}, found "
            f"{transformers.__version__}", stacklevel=3,
        )
    return transformers


_import_transformers()

from transformers import masking_utils  # noqa: E402
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_outputs import (
    CausalLMOutputWithCrossAttentions,
    CausalLMOutputWithPast,
)
from transformers.activations import NewGELUActivation  # noqa: E402
from transformers.modeling_utils import AttentionInterface, PreTrainedModel  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils.generic import ModelOutput


class FallbackWarning(UserWarning):
    """A mask the kernel cannot express ran through transformers' SDPA attention instead."""


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"gptfast attention: {reason}; this attention runs through transformers' SDPA "
            "path instead (correct, not our kernel)", FallbackWarning, stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Padding masks -> per-row lengths
# --------------------------------------------------------------------------------------------


class Unexpressible(ValueError):
    """A padding mask that per-row lengths cannot describe."""


def padding_side(mask: Tensor) -> tuple[str | None, Tensor | None]:
    """(side, key_lens) of a (batch, width) bool padding mask (True = a real token).

    ``(None, None)``: no padding. ``("right", lens)``: row b's tokens are [0, lens[b]);
    ``("left", lens)``: its last lens[b] positions. An all-padding row has length 0 and fits
    either side. Raises ``Unexpressible`` for a row with holes or rows padded on different
    sides, or one padded on both sides. One host sync (five booleans).
    """
    batch, width = mask.shape
    if batch == 0 or width == 0:
        return None, None
    pos = torch.arange(width, device=mask.device)
    count = mask.sum(1)
    first = torch.where(mask, pos, width).amin(1)
    end = torch.where(mask, pos + 1, 0).amax(1)
    empty = count == 0
    right, left = empty | (first == 0), empty | (end == width)
    checks = torch.stack([
        (count == width).all(),  # no padding
        (empty | (end - first == count)).all(),  # each row one run
        (right | left).all(),  # no row padded on both sides
        right.all(),
        left.all(),
    ])
    full, solid, one_side, right, left = checks.tolist()
    if full:
        return None, None
    if not solid:
        raise Unexpressible("a padding mask with holes (a row's tokens are not one run)")
    if not one_side:
        raise Unexpressible("a padding mask with a row padded on both sides")
    if right:
        return "right", end.to(torch.int32)
    if left:
        return "left", (width - first).to(torch.int32)
    raise Unexpressible("a padding mask with rows padded on different sides")


@dataclass
class Padding:
    """What a tagged 2-D mask stands for: keys [0, width) of the KV tensors are the ones any
    query may see (queries are the last of them when causal), and per-row lengths."""

    causal: bool
    side: str | None = None  # None: no padding within the width
    key_lens: Tensor | None = None
    _query_lens: dict = field(default_factory=dict)

    def query_lens(self, q_len: int, width: int) -> Tensor | None:
        """Valid queries per row, for the kernel's windows (cached per query length).

        Causal: a query whose own token is padding gets none (the kernel returns zeros there),
        so that the kernel's causal alignment on each row's window is the model's. Full
        attention: every query attends the row's real keys, as in transformers' masks.
        """
        if not self.causal or self.side is None:
            return None
        if q_len not in self._query_lens:
            if self.side == "right":  # the queries are the last q_len of the width positions
                lens = self.key_lens - (width - q_len)
            else:
                lens = self.key_lens
            self._query_lens[q_len] = lens.clamp(0, q_len).to(torch.int32)
        return self._query_lens[q_len]


def _tag(mask: Tensor, padding: Padding) -> Tensor:
    mask._gptfast = padding
    return mask


def _sdpa_mask(reason: str, **mask_args) -> Tensor | None:
    """transformers' SDPA mask for a case our lengths cannot express, tagged with the reason."""
    mask = masking_utils.sdpa_mask(**mask_args)
    if mask is not None:
        mask._gptfast_fallback = reason
    return mask


def gptfast_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                 mask_function=masking_utils.causal_mask_function,
                 attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """The ``AttentionMaskInterface`` function: None (no mask needed), a tagged (batch, width)
    bool mask, or (what the kernel cannot express) transformers' 4-D SDPA mask."""
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function,
                attention_mask=attention_mask, **kwargs)
    causal = mask_function is masking_utils.causal_mask_function
    if not causal and mask_function is not masking_utils.bidirectional_mask_function:
        return _sdpa_mask("a mask pattern other than causal or full (sliding window, packed "
                          "sequences, custom mask functions)", **args)
    if kv_offset != 0:
        return _sdpa_mask("a KV cache window with an offset (sliding-window cache)", **args)
    # Keys past the last query's position are invisible to every causal query (the rest of a
    # static cache): cutting them makes the queries end where the keys end, the kernel's
    # bottom-right causal alignment.
    width = min(kv_length, int(q_offset) + q_length) if causal else kv_length
    if attention_mask is None:
        if width == kv_length:
            return None
        ones = torch.ones(batch_size, width, dtype=torch.bool, device=kwargs.get("device", "cpu"))
        return _tag(ones, Padding(causal))
    mask = masking_utils.prepare_padding_mask(attention_mask, kv_length, 0)[:, :width]
    try:
        side, key_lens = padding_side(mask)
    except Unexpressible as exc:
        return _sdpa_mask(str(exc), **args)
    if side is None and width == kv_length:
        return None
    return _tag(mask, Padding(causal, side, key_lens))


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------


def gptfast_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The ``AttentionInterface`` function: q (batch, heads, Tq, D), k/v (batch, kv_heads, Tk,
    D) -> ((batch, Tq, heads, D), None). ``dropout`` is what the module passes (its config's
    attention dropout in training, 0 in eval)."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"gptfast attention: {name} is not supported (use 'eager' or 'sdpa')")
    padding = getattr(attention_mask, "_gptfast", None)
    if attention_mask is not None and padding is None and attention_mask.dim() != 4:
        raise ValueError(
            f"gptfast attention: a {attention_mask.dim()}-D attention mask that transformers' "
            "mask functions did not make (the model does not build its masks through "
            "masking_utils); only 4-D masks can be handed to SDPA as they are")
    fallback = None
    if kwargs.get("position_bias") is not None:
        fallback = "a position bias (relative attention)"
    elif attention_mask is not None and padding is None:
        fallback = getattr(attention_mask, "_gptfast_fallback",
                           f"a {attention_mask.dim()}-D attention mask given to the model")
    if fallback is not None:
        _warn_once(fallback)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if padding is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = kernels.attention(query, key, value, causal=causal, scale=scaling, dropout_p=dropout)
        return out.transpose(1, 2), None
    width = attention_mask.shape[1]
    key, value = key[:, :, :width], value[:, :, :width]
    lengths = {}
    if padding.side is not None:
        lengths = dict(key_lens=padding.key_lens, padding=padding.side,
                       query_lens=padding.query_lens(query.shape[2], width))
    out = kernels.attention(query, key, value, causal=padding.causal, scale=scaling,
                            dropout_p=dropout, **lengths)
    return out.transpose(1, 2), None


def register() -> None:
    """Register ``"gptfast"`` with transformers (done on import; repeating it is harmless)."""
    AttentionInterface.register(NAME, gptfast_attention)
    AttentionMaskInterface.register(NAME, gptfast_mask)


register()


# --------------------------------------------------------------------------------------------
# The training loss of causal LMs, fused with the output head
# --------------------------------------------------------------------------------------------

# The model types (config.model_type) whose causal-LM class (transformers'
# MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) has a forward that is exactly: base model, logits =
# lm_head(last hidden state), transformers' ForCausalLMLoss, nothing after it (read in their
# sources, 5.25; tested, tests/test_hf_loss.py). Others scale or soft-cap the logits (Gemma 2/3, Cohere,
# Granite) or add auxiliary losses (mixture-of-experts), which the fused op would silently drop.
LOSS_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
_LOSS_KWARGS = ("shift_labels", "num_items_in_batch", "ignore_index")  # ForCausalLMLoss's


def _loss_support(model: nn.Module) -> str | None:
    """Why ``model``'s training loss cannot be fused, or None."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in LOSS_MODEL_TYPES}
    if name not in supported or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) != name:
        return (f"{name} (model_type {model_type!r}) is not one of the causal LMs whose loss "
                f"gptfast fuses ({', '.join(sorted(supported))}): their logits are exactly the "
                "output head of the last hidden state, with transformers' causal-LM loss")
    if "_loss_function" in model.__dict__ or getattr(model, "loss_type", None) not in (
            None, "ForCausalLM"):
        return f"{name} has a loss_function of its own (not transformers' ForCausalLMLoss)"
    return _head_support(model)


def _head_support(model: PreTrainedModel) -> str | None:
    """Why the output head cannot go into the fused op (checked on every call: an adapter
    wrapping the head after ``apply`` must not be bypassed), or None."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return (f"the output head of {type(model).__name__} is "
                f"{type(head).__name__ if head is not None else 'missing'}, not a plain "
                "torch.nn.Linear (an adapter or a quantised head would be bypassed)")
    return None


def _require(reason: str | None, what: str) -> None:
    if reason is not None:
        raise ValueError(f"gptfast.hf.{what}: {reason}; keep transformers' loss "
                         "(gptfast.hf.apply(model, loss=False))")


def _fused_loss(model, hidden: Tensor, labels: Tensor | None, shift_labels: Tensor | None = None,
                num_items_in_batch=None, ignore_index: int = -100) -> Tensor:
    """transformers' ForCausalLMLoss of ``lm_head(hidden)`` by ``kernels.linear_cross_entropy``:
    labels shifted left (the last position ignored) unless ``shift_labels`` are given, the mean
    over non-ignored tokens, or their sum over ``num_items_in_batch``."""
    _require(_head_support(model), "causal_lm_loss")  # (also the patched forward's)
    if shift_labels is None:
        if labels is None:
            raise ValueError("gptfast.hf.causal_lm_loss: give labels (shifted inside, as "
                             "transformers does) or shift_labels (used as they are)")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
        given = "shift_labels" if labels is None else "labels"
        raise ValueError(f"gptfast.hf.causal_lm_loss: {given} must have the inputs' shape "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(shift_labels.shape)}")
    head = model.get_output_embeddings()
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = kernels.linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device),
                                        head.bias, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_loss(model: nn.Module, input_ids: Tensor | None = None,
                   labels: Tensor | None = None, attention_mask: Tensor | None = None, *,
                   shift_labels: Tensor | None = None, num_items_in_batch=None,
                   ignore_index: int = -100, **kwargs) -> Tensor:
    """The loss ``model(input_ids, attention_mask=..., labels=labels).loss`` of a causal LM
    (``LOSS_MODEL_TYPES``), with the output head and cross-entropy fused
    (``gptfast.kernels.linear_cross_entropy``): no (tokens x vocab) logits, in any mode.

    As transformers: ``labels`` (batch, length) are shifted inside (position t is scored
    against labels[t + 1], the last position against nothing), -100 (``ignore_index``) is
    ignored; ``shift_labels`` are used as given; ``num_items_in_batch`` (the Trainer's, for
    gradient accumulation) makes it the sum over that count instead of the mean. ``kwargs`` go
    to the base model (``position_ids``, ``inputs_embeds``, ...). An fp32 scalar.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"gptfast.hf.causal_lm_loss: expected a transformers PreTrainedModel, "
                        f"got {type(model).__name__}")
    _require(_loss_support(model), "causal_lm_loss")
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                           **kwargs)
    return _fused_loss(model, out.last_hidden_state, labels, shift_labels, num_items_in_batch,
                       ignore_index)


def _output(annotation, base_out: ModelOutput, loss: Tensor) -> ModelOutput:
    """The model's causal-LM output (its forward's annotated class) with the fused loss, no
    logits, and the base model's other fields (cache, hidden states, attentions)."""
    cls = annotation if isinstance(annotation, type) and issubclass(annotation, ModelOutput) \
        else None
    if cls is None or "logits" not in {f.name for f in dataclasses.fields(cls)}:
        cls = (CausalLMOutputWithCrossAttentions if "cross_attentions" in
               {f.name for f in dataclasses.fields(base_out)} else CausalLMOutputWithPast)
    names = {f.name for f in dataclasses.fields(cls)}
    rest = {k: v for k, v in base_out.items() if k in names and k not in ("loss", "logits")}
    return cls(loss=loss, logits=None, **rest)


@functools.cache
def _fused_forward(cls: type):
    """``cls.forward`` that, in training mode with ``labels`` (what the Trainer passes), runs
    the base model and ``_fused_loss`` and returns logits=None; otherwise ``cls.forward``
    itself. Same signature (``inspect.signature`` sees the original: the Trainer reads it)."""
    original = cls.forward
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values()
                   if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        arguments.pop(next(iter(signature.parameters)))  # self
        arguments.update(arguments.pop(var_kw, {}))
        labels, keep = arguments.pop("labels", None), arguments.pop("logits_to_keep", 0)
        if labels is None or not self.training or not (isinstance(keep, int) and keep == 0):
            return original(self, *args, **kwargs)  # transformers' own forward and loss
        return_dict = arguments.pop("return_dict", None)
        loss_kwargs = {k: arguments.pop(k) for k in _LOSS_KWARGS if k in arguments}
        out = self.base_model(**arguments, return_dict=True)
        loss = _fused_loss(self, out.last_hidden_state, labels, **loss_kwargs)
        result = _output(signature.return_annotation, out, loss)
        if return_dict is None:
            return_dict = self.config.return_dict
        return result if return_dict else result.to_tuple()

    forward._gptfast_loss = True
    return forward


def _fuses_loss(model: nn.Module) -> bool:
    return getattr(model.__dict__.get("forward"), "_gptfast_loss", False)


# --------------------------------------------------------------------------------------------
# Patching a loaded model
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What ``apply`` replaced."""

    attn_implementation: tuple[str, str]  # (before, after)
    attention_modules: list[str]  # the attention layers now dispatching to our kernel
    layer_norms: list[str]  # the nn.LayerNorm modules now kernels.LayerNorm
    fused_loss: bool = False  # model(..., labels=...) in training: the fused loss, no logits
    loss_reason: str | None = None  # why not, when the model's loss cannot be fused
    gelus: list[str] = field(default_factory=list)  # NewGELUActivation modules now fused GELUs

    def __str__(self) -> str:
        before, after = self.attn_implementation
        loss = "fused" if self.fused_loss else f"transformers' ({self.loss_reason or 'loss=False'})"
        return (f"attention: {before} -> {after} in {len(self.attention_modules)} modules; "
                f"LayerNorm: {len(self.layer_norms)} modules swapped; "
                f"GELU: {len(self.gelus)} modules fused; loss: {loss}")


def swap_gelus(model: nn.Module) -> list[str]:
    """Make every ``NewGELUActivation`` (GPT-2's "gelu_new": the tanh GELU written as eight
    elementwise torch ops, each a pass over the activations and, in training, a saved tensor)
    an ``nn.GELU(approximate="tanh")``: the same function in one kernel forward and one backward
    (torch's, computing in fp32), nothing saved but its input. In place, as
    ``kernels.swap_layer_norms`` does: each module object stays (its hooks and flags), only its
    class changes (both hold no tensors). Returns the modules' names. Exact-type matches only:
    another activation keeps its own formula."""
    names = []
    for name, m in model.named_modules():
        if type(m) is NewGELUActivation:
            m.__class__, m.approximate = nn.GELU, "tanh"
            names.append(name)
    return names


def apply(model: nn.Module, attention: bool = True, layer_norm: bool = True,
          loss: bool | None = None, gelu: bool = True) -> Report:
    """Patch a loaded Hugging Face model in place: its attention implementation becomes
    ``"gptfast"`` (through ``set_attn_implementation``, for the model and its sub-models), every
    plain ``nn.LayerNorm`` becomes ``gptfast.kernels.LayerNorm`` (same module objects and
    Parameters), every ``NewGELUActivation`` the one-kernel tanh GELU (``swap_gelus``; ``gelu``),
    and the training loss is fused with the output head: in training mode,
    ``model(..., labels=labels)`` (what the Trainer calls) returns transformers' loss computed
    by ``causal_lm_loss`` and ``logits=None`` (Liger-Kernel's convention); without labels or in
    eval mode the forward is transformers' own. ``loss``: None fuses it where the model is
    supported (``LOSS_MODEL_TYPES``; the ``Report`` says why not), True requires it (a
    ``ValueError`` otherwise), False leaves the loss alone. Returns a ``Report``. A model whose
    attention cannot be switched, or whose loss cannot be fused with ``loss=True``, raises
    before anything is changed."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"gptfast.hf.apply: expected a transformers PreTrainedModel, got "
                        f"{type(model).__name__} (for any nn.Module, kernels.swap_layer_norms "
                        "swaps its LayerNorms)")
    reason = None if loss is False or _fuses_loss(model) else _loss_support(model)
    if loss is True:
        _require(reason, "apply")
    before = model.config._attn_implementation
    if attention and before != NAME:
        model.set_attn_implementation(NAME)  # changes nothing if the model cannot switch
        if model.config._attn_implementation != NAME:
            raise ValueError(f"gptfast.hf.apply: {type(model).__name__} does not dispatch its "
                             "attention through transformers' AttentionInterface (it kept "
                             f"{model.config._attn_implementation!r}); nothing was changed")
    after = model.config._attn_implementation
    attention_modules = [
        name for name, m in model.named_modules()
        if hasattr(m, "is_causal") and getattr(getattr(m, "config", None),
                                               "_attn_implementation", None) == NAME
    ]
    norms = []
    if layer_norm:
        norms = [name for name, m in model.named_modules() if type(m) is nn.LayerNorm]
        kernels.swap_layer_norms(model)
    gelus = swap_gelus(model) if gelu else []
    if loss is not False and reason is None and not _fuses_loss(model):
        # an instance attribute: deepcopy rebinds it to the copy, the class is untouched
        model.forward = types.MethodType(_fused_forward(type(model)), model)
    return Report((before, after), attention_modules, norms, _fuses_loss(model), reason, gelus)


__all__ = ["LOSS_MODEL_TYPES", "NAME", "SUPPORTED_TRANSFORMERS", "FallbackWarning", "Padding",
           "Report", "Unexpressible", "apply", "causal_lm_loss", "gptfast_attention",
           "gptfast_mask", "padding_side", "register", "swap_gelus"]
