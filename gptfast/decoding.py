"""Next-token logits for generation: recompute the window each step, or use a KV cache.

``uncached`` is the chapter's way: every step runs the whole (cropped) sequence through the
model, so step cost grows with its length. ``KVCacheDecoder`` runs the prompt once (prefill,
flash attention) and then one token per step against the cache (decode attention). Once the
sequence outgrows ``context_size``, the chapter crops it to the last ``context_size`` tokens,
which shifts every position; no cached key is valid then, so each such step re-runs the cropped
window (prefill), exactly as the uncached loop does.

On CUDA the one-token decode step is captured once as a CUDA graph with static inputs (token,
per-row position) and replayed, which removes the per-kernel launch cost that dominates batch-1
decoding.

Each decoder owns its cache (``model.new_cache``) and installs it on the model only while its
own forward calls (and its graph capture) run, putting back whatever was installed before; a
captured graph reads and writes the tensors of the cache it was captured with. So several
decoders on one model, stepped in any interleaving, never see each other's keys and values.
"""

import contextlib

import torch


def uncached(model, context_size):
    def next_logits(idx):
        return model(idx[:, -context_size:])[:, -1]

    return next_logits


class KVCacheDecoder:
    """Callable ``next_logits(idx)`` for a growing ``idx``, backed by the model's KV cache.

    ``prompt_lens`` (a (batch,) tensor on the model's device) marks right-padded prompts of
    different lengths: row b's prompt is ``idx[b, :prompt_lens[b]]``, its first new token is
    predicted there, and each later token goes to the row's own next position. Causal attention
    keeps the padding out of every real token's view, and each decode step overwrites it.
    (Rows must then fit the context: no cropping.)
    """

    def __init__(self, model, batch_size, context_size, cuda_graph=None, prompt_lens=None):
        self.model = model
        self.cache = model.new_cache(batch_size, max_len=context_size)
        self.context_size = context_size
        self.prompt_lens = prompt_lens
        self.pos = 0  # columns of idx in the cache
        device = model.tok_emb.weight.device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = None

    def __call__(self, idx):
        n = idx.shape[1]
        if self.pos == 0 or n > self.context_size or n != self.pos + 1:
            window = idx[:, -self.context_size:]  # prefill (again, once cropping shifts positions)
            self.pos = window.shape[1]
            with self._installed():
                logits = self.model(window, start_pos=0)
            if self.prompt_lens is None:
                return logits[:, -1]
            self.row_pos = self.prompt_lens.clone()  # where each row's next token goes
            return logits[torch.arange(idx.shape[0], device=idx.device), self.prompt_lens - 1]
        start = self.pos if self.prompt_lens is None else self.row_pos
        logits = self._decode(idx[:, -1:], start)
        self.pos += 1
        if self.prompt_lens is not None:
            self.row_pos += 1
        return logits

    def _decode(self, token, start):
        if not self.cuda_graph:
            with self._installed():
                return self.model(token, start_pos=start)[:, -1]
        if self.graph is None:
            with self._installed():
                self._capture(token, start)
        self.static_token.copy_(token)
        _assign(self.static_pos, start)
        self.graph.replay()
        return self.static_logits.clone()

    def _capture(self, token, start):
        """Record one decode step; its position is a device tensor, so replays need no host sync.

        The warm-up and capture runs write this step's own keys/values at its own positions,
        which the replay that follows writes again: the cache is left as a plain step leaves it.
        """
        self.static_token = token.clone()
        self.static_pos = torch.empty(token.shape[0], dtype=torch.long, device=token.device)
        _assign(self.static_pos, start)
        step = lambda: self.model(self.static_token, start_pos=self.static_pos)[:, -1]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile kernels, settle allocations
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = step()

    @contextlib.contextmanager
    def _installed(self):
        """This decoder's cache on the model for the duration, then the previous one again."""
        previous = self.model.kv_cache
        self.model.set_cache(self.cache)
        try:
            yield
        finally:
            self.model.set_cache(previous)

    def close(self):
        self.cache = self.graph = None


def _assign(static, value):
    """Set a static (graph input) tensor from a tensor or a Python int, without a host sync."""
    if torch.is_tensor(value):
        static.copy_(value)
    else:
        static.fill_(value)
