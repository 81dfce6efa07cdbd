"""The KV cache of ``GPTModel``: per-layer key/value buffers and what one cached forward call
shares between its layers.

``KVCache`` holds one attention layer's keys and values (and its fused query/key/value weights),
``ModelCache`` a generation's layers, ``CacheSlot`` where a model's layers find the installed
one (``GPTModel.set_cache``), and ``CacheStep`` the positions of one forward call's tokens with
the tensors made from them once per call (decode lengths, scatter index, eager mask).
"""

import torch


class KVCache:
    """Pre-allocated keys and values of one attention layer, (batch, heads, max_len, head_dim).

    Plain tensors held outside the module's buffers: never in the state_dict, never moved by
    ``.to()``. Keys and values are the two halves ``k``, ``v`` of one (2, batch, heads, max_len,
    head_dim) buffer ``kv``, so that one kernel appends both. ``update`` writes new keys/values
    at a ``CacheStep``'s positions: an int (every row at the same position) or per-row
    positions (no host sync: CUDA-graph friendly); ``append`` writes them from the fused
    projection's output. The layer's query/key/value weights concatenated (``fused_qkv``) live
    here too, made on first use.
    """

    def __init__(self, batch, heads, max_len, head_dim, dtype, device):
        self.kv = torch.zeros(2, batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]
        self._qkv, self._qkv_stamp = None, None

    def update(self, k, v, step: "CacheStep"):
        """Write keys and values (batch, heads, t, head_dim) at the step's positions."""
        self.append(torch.stack((k, v)).to(self.kv.dtype), step)

    def append(self, kv, step: "CacheStep"):
        """Write ``kv`` (2, batch, heads, t, head_dim) at the step's positions: one kernel for
        keys and values. (Written through ``kv``, not its ``k``/``v`` views: in grad mode the
        buffer then joins the autograd graph as a whole.)"""
        if step.per_row:
            self.kv.scatter_(3, step.scatter_index(kv.shape), kv)
        else:
            self.kv[:, :, :, step.start:step.start + step.t] = kv

    def fused_qkv(self, att) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``att``'s query, key and value weights (and biases) stacked into one (3 d, d) weight,
        so that one GEMM projects a step. Made on first use and again whenever one of them was
        replaced or changed in place (its version counter: an optimizer step, load_state_dict);
        a change through ``.data`` bypasses the counter and is not seen."""
        linears = (att.W_query, att.W_key, att.W_value)
        params = [m.weight for m in linears] + [m.bias for m in linears if m.bias is not None]
        stamp = [(id(p), p._version) for p in params]
        if stamp != self._qkv_stamp:
            with torch.no_grad():
                weight = torch.cat([m.weight for m in linears])
                bias = torch.cat(params[3:]) if len(params) == 6 else None
            self._qkv, self._qkv_stamp = (weight, bias), stamp
        return self._qkv


class CacheStep:
    """Where one forward call's tokens go in the KV cache, shared by its layers: ``start`` (the
    position of the first token, an int or a (batch,) tensor of per-row positions) and ``t``
    tokens. The tensors every layer needs (positions, decode lengths, scatter index, eager
    mask) are made once per call, not once per layer."""

    def __init__(self, start, t, device):
        self.start, self.t = start, t
        self.per_row = not isinstance(start, int)
        self._index = self._mask = None
        # prefill: t tokens at an int position, flash attention over the cache's first end
        self.prefill = not self.per_row and (start == 0 or t > 1)
        if not self.per_row:
            self.positions = torch.arange(start, start + t, device=device)
            self.lens = start + t  # cached positions after this call
            return
        start = start.long()
        self.positions = start[:, None] if t == 1 else start[:, None] + torch.arange(t, device=device)
        self.lens = (start + t).to(torch.int32)

    def mask(self, tk: int) -> torch.Tensor:
        """Eager attention's mask over tk keys (True: hidden): query i of row b sits at
        lens[b] - t + i and sees the keys up to it."""
        if self._mask is None:
            if not self.per_row:
                self._mask = causal_mask(self.t, tk, self.positions.device)
            else:
                keys = torch.arange(tk, device=self.positions.device)
                self._mask = (keys > self.positions[:, :, None])[:, None]
        return self._mask

    def scatter_index(self, shape) -> torch.Tensor:
        """The per-row positions as a scatter index over a (2, batch, heads, t, head_dim) source
        (an expanded view: no copy)."""
        if self._index is None:
            self._index = self.positions[None, :, None, :, None].expand(shape)
        return self._index


class CacheSlot:
    """Where a model's installed ``ModelCache`` lives, shared by its attention layers, so that
    installing a cache (once per generation step, see ``GPTModel.set_cache``) is one assignment."""

    __slots__ = ("cache",)

    def __init__(self):
        self.cache: ModelCache | None = None


class ModelCache:
    """One generation's KV cache: a ``KVCache`` per layer, made by ``GPTModel.new_cache``.

    It belongs to whoever made it; ``GPTModel.set_cache`` installs it on the model (each layer
    then appends to its own ``KVCache``), so several generations on one model each keep their own.
    """

    def __init__(self, layers: list[KVCache]):
        self.layers = layers
        self.batch_size, heads, self.max_len, head_dim = layers[0].k.shape
        self.layout = (len(layers), heads, head_dim)
        self.dtype, self.device = layers[0].k.dtype, layers[0].k.device


def causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    """(tq, tk) bool, True where query i may not see key j: j > i + tk - tq."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).triu(1 + tk - tq)
