"""Text generation: the chapter's greedy loop, and sampling with temperature and top-k."""

from collections.abc import Iterator

import torch

from gptfast.decoding import KVCacheDecoder, uncached


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The chapter's greedy decoding: append the most likely next token, ``max_new_tokens`` times.

    ``idx`` is a (batch, n) tensor of token ids; the model sees at most the last
    ``context_size`` tokens.
    """
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

    Arguments are checked when this is called, before the first token is computed.
    """
    context_size = _check_args(model, idx, max_new_tokens, context_size, temperature, top_k)
    return _token_stream(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id,
                         generator, use_cache and hasattr(model, "setup_cache"), cuda_graph)


def _token_stream(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator,
                  use_cache, cuda_graph):
    if use_cache and max_new_tokens:
        next_logits = KVCacheDecoder(model, idx.shape[0], context_size, cuda_graph)
    else:
        next_logits = uncached(model, context_size)
    try:
        yield from _sample(next_logits, idx, max_new_tokens, temperature, top_k, eos_id, generator)
    finally:
        if use_cache and max_new_tokens:
            next_logits.close()


def _sample(next_logits, idx, max_new_tokens, temperature, top_k, eos_id, generator):
    done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = next_logits(idx).float()
        if top_k is not None:
            kth_largest = torch.topk(logits, top_k).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, -torch.inf)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None:  # finished rows keep emitting eos_id
            idx_next = idx_next.masked_fill(done, eos_id)
            done |= idx_next == eos_id
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next
        if eos_id is not None and bool(done.all()):
            return


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
    (models without ``setup_cache`` always recompute); the tokens are those of the uncached
    loop. ``cuda_graph`` (default: on for CUDA models) replays the decode step as a CUDA graph.
    """
    new = list(generate_tokens(
        model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator,
        use_cache, cuda_graph,
    ))
    return torch.cat([idx, *new], dim=1)


def generate_batch(
    model, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None,
    cuda_graph=None,
) -> list[torch.Tensor]:
    """Generate after several prompts of different lengths at once, with the KV cache.

    ``prompts``: a list of 1-D token-id tensors (or lists). Returns, per prompt, a 1-D tensor:
    the prompt and its new tokens (cut after ``eos_id`` when the row emits it). The prompts are
    right-padded into one batch; each row predicts from its own last token and continues at its
    own positions, so greedy results equal generating each prompt alone. Rows that would outgrow
    the context (and need the chapter's cropping at different steps) are generated one by one.
    """
    device = model.tok_emb.weight.device
    rows = [torch.as_tensor(p, dtype=torch.long, device=device).flatten() for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    lens = [r.numel() for r in rows]
    args = (temperature, top_k, eos_id, generator)
    if max(lens) + max_new_tokens > model.cfg["context_length"]:
        return [generate(model, r[None], max_new_tokens, None, *args, True, cuda_graph)[0] for r in rows]
    idx = torch.zeros(len(rows), max(lens), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        idx[b, :lens[b]] = r
    context_size = _check_args(model, idx, max_new_tokens, None, temperature, top_k)
    decoder = KVCacheDecoder(model, len(rows), context_size, cuda_graph,
                             prompt_lens=torch.tensor(lens, device=device))
    try:
        new = list(_sample(decoder, idx, max_new_tokens, *args))
    finally:
        decoder.close()
    new = torch.cat(new, 1) if new else idx[:, :0]
    out = []
    for r, tokens in zip(rows, new):
        if eos_id is not None and (tokens == eos_id).any():
            tokens = tokens[: int((tokens == eos_id).nonzero()[0]) + 1]
        out.append(torch.cat([r, tokens]))
    return out


def _check_args(model, idx, max_new_tokens, context_size, temperature, top_k) -> int:
    cfg = getattr(model, "cfg", None)
    if context_size is None:
        if cfg is None:
            raise ValueError("context_size is required for models without a .cfg dict")
        context_size = cfg["context_length"]
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a non-empty (batch, n) tensor of token ids, got {shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if context_size <= 0:
        raise ValueError(f"context_size must be positive, got {context_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= (cfg or {}).get("vocab_size", top_k):
        raise ValueError(f"top_k must be between 1 and the vocabulary size, got {top_k}")
    if cfg is not None:
        from gptfast.model import check_token_range

        check_token_range(idx, cfg["vocab_size"])
    return context_size
