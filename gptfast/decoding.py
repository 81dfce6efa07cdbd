"""Next tokens for generation: recompute the window each step, or use a KV cache.

Both are callables ``next_tokens(idx, pick)``: the next token of each row of the growing token
ids ``idx``, picked from its logits by ``pick`` (see ``gptfast.generation``). ``uncached`` is
the chapter's way: every step runs the whole (cropped) sequence through the model, so step
cost grows with its length. ``KVCacheDecoder`` runs the prompt once (prefill, flash attention)
and then one token per step against the cache (decode attention). Once the sequence outgrows
``context_size``, the chapter crops it to the last ``context_size`` tokens, which shifts every
position; no cached key is valid then, so each such step re-runs the cropped window (prefill),
exactly as the uncached loop does.

A decode step keeps its positions on the device (a (batch,) tensor, advanced in place), so a
step makes no host sync and its launch plans do not change from one step to the next. On CUDA
the one-token step is captured once as a CUDA graph and replayed, which removes the per-kernel
launch cost that dominates batch-1 decoding; a ``pick`` that is graph-safe (greedy: no RNG, no
host sync) is captured with it, and the graph then feeds its own token to the next step: one
replay per token and nothing else on the host.

Each decoder owns its cache (``model.new_cache``) and installs it on the model only while its
own forward calls (and its graph capture) run, putting back whatever was installed before; a
captured graph reads and writes the tensors of the cache it was captured with. So several
decoders on one model, stepped in any interleaving, never see each other's keys and values.
"""

import contextlib

import torch


def uncached(model, context_size):
    def next_tokens(idx, pick):
        return pick(model(idx[:, -context_size:])[:, -1])

    return next_tokens


class KVCacheDecoder:
    """Callable ``next_tokens(idx, pick)`` for a growing ``idx``, backed by the model's KV cache.

    ``prompt_lens`` (a (batch,) tensor on the model's device) marks right-padded prompts of
    different lengths: row b's prompt is ``idx[b, :prompt_lens[b]]``, its first new token is
    predicted there, and each later token goes to the row's own next position. Causal attention
    keeps the padding out of every real token's view, and each decode step overwrites it.
    (Rows must then fit the context: no cropping.) Each call's last token must be the previous
    call's result (a graph-captured pick feeds it to the next step itself). ``tokens``: the
    longest sequence it will see, when that fits the context (a smaller cache: less memory, and
    decode attention splits fewer keys); None: the context.
    """

    def __init__(self, model, batch_size, context_size, cuda_graph=None, prompt_lens=None,
                 tokens=None):
        self.model = model
        max_len = context_size if tokens is None or tokens > context_size else tokens
        self.cache = model.new_cache(batch_size, max_len=max_len)
        self.context_size = context_size
        self.prompt_lens = prompt_lens
        self.pos = 0  # columns of idx in the cache
        device = model.tok_emb.weight.device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = None
        # where each row's next token goes: the decode steps' start_pos, advanced in place
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)

    def __call__(self, idx, pick):
        n = idx.shape[1]
        if self.pos == 0 or n > self.context_size or n != self.pos + 1:
            window = idx[:, -self.context_size:]  # prefill (again, once cropping shifts positions)
            self.pos = window.shape[1]
            with self._installed():
                logits = self.model(window, start_pos=0)
            if self.prompt_lens is None:
                self.positions.fill_(self.pos)
                return pick(logits[:, -1])
            self.positions.copy_(self.prompt_lens)
            return pick(logits[torch.arange(idx.shape[0], device=idx.device), self.prompt_lens - 1])
        self.pos += 1
        token = idx[:, -1:]
        if not self.cuda_graph:
            with self._installed():
                logits = self._step(token)
            return pick(logits)
        if self.graph is None:
            with self._installed():
                self._capture(token, pick)
        if not self.pick_captured:
            self.static_token.copy_(token)
        self.graph.replay()
        return self.static_out if self.pick_captured else pick(self.static_out)

    def _step(self, token):
        """One token per row at its position: the last position's logits; positions advance."""
        logits = self.model(token, start_pos=self.positions)[:, -1]
        self.positions += 1
        return logits

    def _capture(self, token, pick):
        """Record one decode step, with ``pick`` if it is graph-safe (then the graph writes its
        token to its own input, for the next replay).

        The warm-up runs (on a side stream: compile kernels, settle allocations) write this
        step's keys/values at its own positions, which the replay that follows writes again;
        the state they advance (positions, the input token, the pick's finished rows) is put
        back after each, so the replay starts from the state a plain step would.
        """
        self.static_token = token.clone()
        self.pick_captured = getattr(pick, "graph_safe", False)
        state = (self.positions, self.static_token, *(pick.state if self.pick_captured else ()))
        saved = [t.clone() for t in state]

        def step():
            logits = self._step(self.static_token)
            if not self.pick_captured:
                return logits
            out = pick(logits)
            self.static_token.copy_(out)
            return out

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = step()

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
