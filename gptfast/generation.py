"""Text generation: the chapter's greedy loop, and sampling with temperature and top-k."""

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptfast.decoding import KVCacheDecoder, uncached

# The most new tokens one call generates: ~1000 GPT-2 context windows. Past the context every
# step re-runs a whole window, so a bigger request (10**30) is a mistake that would run until
# killed; longer texts take several calls (or a consumer that stops a generate_tokens stream).
MAX_NEW_TOKENS = 2**20


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The chapter's greedy decoding: append the most likely next token, ``max_new_tokens`` times.

    ``idx`` is a (batch, n) tensor of token ids; the model sees at most the last
    ``context_size`` tokens. The arguments are checked as ``generate`` checks them.
    """
    max_new_tokens, context_size, _ = _check_args(model, idx, max_new_tokens, context_size, 0.0,
                                                  None, None, None, None)
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate_tokens(
    model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, eos_id=None,
    generator=None, use_cache=True, cuda_graph=None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each row, a (batch, 1) tensor per step (see ``generate``).

    Arguments are checked when this is called, before the first token is computed. Each stream
    owns its KV cache: several streams on one model may be consumed in any interleaving.
    """
    steps, context_size, sampling = _check_args(
        model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator, cuda_graph)
    use_cache = _check_use_cache(model, use_cache)
    return _token_stream(model, idx, steps, context_size, sampling, use_cache, cuda_graph)


def _check_use_cache(model, use_cache) -> bool:
    if use_cache not in (True, False):
        raise TypeError(f"use_cache must be True or False, got {use_cache!r}")
    return bool(use_cache) and hasattr(model, "new_cache")


# generate() and generate_batch() look for the end (every row emitted eos_id) once every this
# many tokens: a host sync per token would stall the GPU's queue each time. They may compute up
# to EOS_CHECK_EVERY - 1 tokens past the end, which they cut off; streams check every token.
EOS_CHECK_EVERY = 16


@dataclass(frozen=True)
class Sampling:
    """How each next token is picked (checked arguments of ``generate``)."""

    temperature: float
    top_k: int | None
    eos_id: int | None
    generator: torch.Generator | None


class Pick:
    """The next token of each row, (batch, 1), from its last logits: greedy, or sampled with
    temperature and top-k; rows that emitted ``eos_id`` keep emitting it (``done``, on the
    device). Greedy picking is ``graph_safe`` (no RNG, no host sync): a CUDA-graph decoder
    captures it with its step, and ``state`` is what it changes."""

    def __init__(self, sampling: Sampling, batch: int, device):
        self.sampling = sampling
        self.graph_safe = sampling.temperature == 0.0
        eos = sampling.eos_id is not None
        self.done = torch.zeros(batch, 1, dtype=torch.bool, device=device) if eos else None
        self.state = (self.done,) if eos else ()

    def __call__(self, logits):
        s = self.sampling
        if s.temperature == 0.0:  # top-k keeps the largest logit: it cannot change the argmax
            token = torch.argmax(logits, dim=-1, keepdim=True)
        else:
            logits = logits.float()
            if s.top_k is not None:
                kth_largest = torch.topk(logits, s.top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth_largest, -torch.inf)
            probs = torch.softmax(logits / s.temperature, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=s.generator)
        if self.done is not None:  # finished rows keep emitting eos_id
            token = token.masked_fill(self.done, s.eos_id)
            self.done |= token == s.eos_id
        return token


def _token_stream(model, idx, max_new_tokens, context_size, sampling, use_cache, cuda_graph,
                  check_every=1):
    if use_cache and max_new_tokens:
        next_tokens = KVCacheDecoder(model, idx.shape[0], context_size, cuda_graph,
                                     tokens=idx.shape[1] + max_new_tokens)
    else:
        next_tokens = uncached(model, context_size)
    try:
        yield from _sample(next_tokens, idx, max_new_tokens, sampling, check_every)
    finally:
        if use_cache and max_new_tokens:
            next_tokens.close()


def _sample(next_tokens, idx, max_new_tokens, sampling: Sampling, check_every=1):
    """Yield each step's tokens, (batch, 1); stop once every row emitted eos_id, looked for
    every ``check_every`` steps (a host sync)."""
    pick = Pick(sampling, idx.shape[0], idx.device)
    for step in range(max_new_tokens):
        with torch.no_grad():
            token = next_tokens(idx, pick)
        idx = torch.cat((idx, token), dim=1)
        yield idx[:, -1:]  # not ``token``: a graph's output, which its next replay overwrites
        if pick.done is not None and (step + 1) % check_every == 0 and bool(pick.done.all()):
            return


def _until_all_ended(new: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``new`` (batch, steps) up to the step where the last row emitted ``eos_id``, as a check
    after every step would have stopped it."""
    if eos_id is None or new.shape[1] == 0:
        return new
    ended = ((new == eos_id).cumsum(dim=1) > 0).all(dim=0)  # every row has emitted it by then
    return new[:, :int(ended.int().argmax()) + 1] if bool(ended[-1]) else new


def generate(
    model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, eos_id=None,
    generator=None, use_cache=True, cuda_graph=None,
):
    """Generate up to ``max_new_tokens`` tokens after each row of ``idx``; returns (batch, n + new).

    temperature 0 is greedy; > 0 samples from softmax(logits / temperature), restricted to the
    ``top_k`` most likely tokens when given, drawing from ``generator`` (a ``torch.Generator`` on
    the model's device) for reproducible samples. With ``eos_id``, a row that emits it is
    finished (it is padded with ``eos_id`` while other rows go on) and generation stops when
    every row is. ``context_size`` defaults to the model's context length; longer inputs are
    cropped to their last ``context_size`` tokens, as in the chapter.

    ``use_cache`` (default) keeps keys and values in a KV cache so each step runs one token
    (models without ``new_cache`` always recompute); the tokens are those of the uncached
    loop. ``cuda_graph`` (default: on for CUDA models) replays the decode step as a CUDA graph.
    """
    steps, context_size, sampling = _check_args(
        model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator, cuda_graph)
    use_cache = _check_use_cache(model, use_cache)
    new = list(_token_stream(model, idx, steps, context_size, sampling, use_cache, cuda_graph,
                             EOS_CHECK_EVERY))
    new = _until_all_ended(torch.cat(new, dim=1), sampling.eos_id) if new else idx[:, :0]
    return torch.cat([idx, new], dim=1)


def generate_batch(
    model, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None,
    cuda_graph=None,
) -> list[torch.Tensor]:
    """Generate after several prompts of different lengths at once, with the KV cache.

    ``prompts``: a list of 1-D integer token-id tensors (or lists of ints). Returns, per prompt,
    a 1-D tensor: the prompt and its new tokens (cut after ``eos_id`` when the row emits it). The
    prompts are right-padded into one batch; each row predicts from its own last token and
    continues at its own positions, so greedy results equal generating each prompt alone. Rows
    that would outgrow the context (and need the chapter's cropping at different steps) are
    generated one by one.
    """
    if not all(hasattr(model, a) for a in ("cfg", "tok_emb", "new_cache")):
        raise TypeError(
            f"generate_batch needs a GPTModel (with .cfg and a KV cache), got {type(model).__name__}"
        )
    device = model.tok_emb.weight.device
    rows = _prompt_rows(prompts, device)
    lens = [r.numel() for r in rows]
    idx = torch.zeros(len(rows), max(lens), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        idx[b, :lens[b]] = r
    steps, context_size, sampling = _check_args(
        model, idx, max_new_tokens, None, temperature, top_k, eos_id, generator, cuda_graph)
    if max(lens) + steps > context_size:
        args = (temperature, top_k, eos_id, generator, True, cuda_graph)
        return [generate(model, r[None], steps, None, *args)[0] for r in rows]
    decoder = KVCacheDecoder(model, len(rows), context_size, cuda_graph,
                             prompt_lens=torch.tensor(lens, device=device),
                             tokens=max(lens) + steps)
    try:
        new = list(_sample(decoder, idx, steps, sampling, EOS_CHECK_EVERY))
    finally:
        decoder.close()
    new = torch.cat(new, 1) if new else idx[:, :0]
    out = []
    for r, tokens in zip(rows, new):
        if eos_id is not None and (tokens == eos_id).any():
            tokens = tokens[: int((tokens == eos_id).nonzero()[0]) + 1]
        out.append(torch.cat([r, tokens]))
    return out


def _prompt_rows(prompts, device) -> list[torch.Tensor]:
    """Each prompt as a 1-D int64 tensor; never a silent cast of floats, strings or 2-D input."""
    what = "prompts must be a non-empty list of non-empty 1-D token-id sequences"
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{what} (encode text first), got {type(prompts).__name__}")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.dtype not in (torch.int64, torch.int32) or p.dim() != 1:
                raise ValueError(f"{what}: prompts[{i}] is a {p.dtype} tensor of shape {tuple(p.shape)}")
            rows.append(p.to(device=device, dtype=torch.long))
            continue
        if not isinstance(p, (list, tuple)) or not all(_is_int(t) for t in p):
            raise TypeError(f"{what}: prompts[{i}] is {p!r:.60}, not a sequence of ints")
        rows.append(torch.tensor([int(t) for t in p], dtype=torch.long, device=device))
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError(what)
    return rows


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_args(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator,
                cuda_graph) -> tuple[int, int, Sampling]:
    """Every argument of ``generate`` checked (numpy scalars accepted), before any state changes."""
    cfg = getattr(model, "cfg", None)
    if not callable(model):
        raise TypeError(f"model must be a torch module (callable), got {type(model).__name__}")
    if context_size is None:
        if cfg is None:
            raise ValueError("context_size is required for models without a .cfg dict")
        context_size = cfg["context_length"]
    if not _is_int(context_size) or context_size <= 0:
        raise ValueError(f"context_size must be a positive int, got {context_size!r}")
    if cfg is not None and context_size > cfg["context_length"]:
        raise ValueError(
            f"context_size {context_size} exceeds the model's context length {cfg['context_length']}"
        )
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or 0 in idx.shape:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a non-empty (batch, n) tensor of token ids, got {shape}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must hold int64 or int32 token ids, got {idx.dtype}")
    weight = getattr(getattr(model, "tok_emb", None), "weight", None)
    if weight is not None and weight.device != idx.device:
        raise ValueError(f"idx is on {idx.device} but the model is on {weight.device}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be at most 2**20 = {MAX_NEW_TOKENS} per call, got "
                         f"{max_new_tokens} (for longer texts, call again with the output)")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy) and a finite number, got {temperature!r}")
    vocab = (cfg or {}).get("vocab_size")
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= (vocab or top_k)):
        raise ValueError(f"top_k must be between 1 and the vocabulary size ({vocab}), an int, got {top_k!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < (vocab or eos_id + 1)):
        raise ValueError(f"eos_id must be a token id (an int in [0, {vocab})), got {eos_id!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != idx.device.type:
            raise ValueError(f"generator is on {generator.device}, the tokens on {idx.device}")
    if cuda_graph not in (None, True, False):
        raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
    if cuda_graph and idx.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got {idx.device}")
    if cfg is not None:
        from gptfast.model import check_token_range

        check_token_range(idx, cfg["vocab_size"])
    sampling = Sampling(float(temperature), None if top_k is None else int(top_k),
                        None if eos_id is None else int(eos_id), generator)
    return int(max_new_tokens), int(context_size), sampling
