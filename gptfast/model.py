"""The GPT-2 model of the book chapter, with switchable LayerNorm and attention kernels.

Module names, creation order, parameters and state_dict keys are the chapter's, so its
checkpoints load here and ``torch.manual_seed(s)`` gives bit-identical initial weights.
``kernels`` picks the implementation of LayerNorm and attention per model:
"torch" (eager PyTorch, the chapter's math), "triton" (this package's fused kernels) or
"auto" (Triton for CUDA inputs, torch otherwise), decided at each forward call; with Triton
kernels, inference also takes the MLP's GELU in its first product's epilogue and a decode step's
linear layers in one kernel each (``gptfast.kernels.linear``).
"""

import contextlib
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast.compiled import TrainingLoss, compile_loss
from gptfast.config import check_config
from gptfast.kv_cache import CacheSlot, CacheStep, KVCache, ModelCache, causal_mask

KERNEL_CHOICES = ("auto", "torch", "triton")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    return kernels


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    return kernels == "triton" or (kernels == "auto" and x.is_cuda)


def label(name: str, owner: nn.Module | None = None):
    """A ``record_function`` range for the profiler, only while one runs (it costs ~10 µs otherwise).

    With ``owner``, the range is named ``f"{owner.name}.{name}"``; the owner's name is read only
    while profiling, so torch.compile does not specialise a graph on it.
    """
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name if owner is None else f"{owner.name}.{name}")
    return contextlib.nullcontext()


_KERNELS = []  # the kernels package once imported


def triton_ops():
    """The kernels package, imported on first use so the torch path never needs Triton (once:
    an import statement costs microseconds per call, and a decode step makes dozens). Traced by
    torch.compile, the import itself: a branch on the cache would be a guard that fails once the
    cache is filled, a recompile of the first graph."""
    if torch.compiler.is_compiling():
        from gptfast import kernels

        return kernels
    if not _KERNELS:
        try:
            from gptfast import kernels
        except ImportError as exc:
            raise RuntimeError(f"kernels='triton' needs the Triton kernels, which failed to import: {exc}")
        _KERNELS.append(kernels)
    return _KERNELS[0]


def plain_linears(*modules: nn.Module) -> bool:
    """Whether each module is a plain ``nn.Linear`` without hooks: then the fused paths may use
    its weight and bias directly. A wrapped or replaced layer (an adapter such as LoRA, a
    quantized linear) or a hooked one keeps its own forward."""
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
               for m in modules)


class LayerNorm(nn.Module):
    """Layer normalisation with the chapter's ``scale``/``shift`` and biased variance."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))
        self.kernels = "torch"

    def forward(self, x):
        if use_triton(self.kernels, x):
            return triton_ops().layer_norm(x, self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GELU with the tanh approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )
        self.kernels = "torch"

    def forward(self, x):
        up, act, down = self.layers
        if (use_triton(self.kernels, x) and not torch.is_grad_enabled() and type(act) is GELU
                and not torch.compiler.is_compiling() and plain_linears(up, down)
                and not torch.is_autocast_enabled(x.device.type)):
            # the GELU in the first product's epilogue: a decode step's few rows in one kernel
            # each (kernels.linear), more rows through cuBLASLt's GELU epilogue on CUDA
            ops = triton_ops()
            return ops.linear(ops.linear(x, up.weight, up.bias, "gelu_tanh"), down.weight, down.bias)
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with the chapter's separate query/key/value projections.

    The chapter keeps a persistent T×T ``mask`` buffer per layer. Here the causal mask is
    built per call, and the ``mask`` key is only written to / read from state_dicts, so
    checkpoints stay interchangeable with the chapter's model.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.kernels = "torch"
        self.slot, self.layer = CacheSlot(), 0  # the model's slot and this layer's index in it
        self.register_load_state_dict_pre_hook(self._drop_chapter_mask)

    @property
    def cache(self) -> KVCache | None:
        """This layer's part of the installed KV cache (None without one)."""
        installed = self.slot.cache
        return None if installed is None else installed.layers[self.layer]

    def forward(self, x, step: CacheStep | None = None):
        b, num_tokens, _ = x.shape
        split = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        if step is None:
            queries, keys, values = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
            context_vec = self._attend(queries, keys, values)
        elif (use_triton(self.kernels, x) and not torch.is_grad_enabled()
              and not torch.compiler.is_compiling()
              and plain_linears(self.W_query, self.W_key, self.W_value, self.out_proj)):
            # one product for the three projections, on the cache's concatenated weights (a
            # copy: no gradient would reach the weights, hence not in grad mode); a decode
            # step's few rows in one kernel with the bias (kernels.linear), a prompt's in cuBLAS
            qkv = triton_ops().linear(x, *self.cache.fused_qkv(self))
            qkv = qkv.view(b, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            context_vec = self._attend_cached(qkv[0], qkv[1], qkv[2], step, qkv[1:])
            context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # a view
            return triton_ops().linear(context_vec, self.out_proj.weight, self.out_proj.bias)
        else:
            queries, keys, values = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
            context_vec = self._attend_cached(queries, keys, values, step)
        # A view for the kernels' (B, T, H, D)-strided output; a copy for eager attention's.
        context_vec = context_vec.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)

    def _attend(self, queries, keys, values):
        """Causal attention of queries over keys, aligned to the end (the last query sees every key)."""
        if use_triton(self.kernels, queries):
            p = self.dropout.p if self.training else 0.0
            return triton_ops().attention(queries, keys, values, causal=True, dropout_p=p)
        return self._eager_attention(queries, keys, values)

    def _attend_cached(self, queries, keys, values, step, kv=None):
        """Append keys/values to the cache at the step's positions (``kv``: both, from the fused
        projection; a one-token step's decode attention appends them itself), then attend over
        everything cached."""
        cache, cache_len = self.cache, step.lens
        if kv is not None and step.per_row and step.t == 1:  # decode attention appends kv
            return triton_ops().decode_attention(queries, cache.k, cache.v, cache_len,
                                                 k_new=kv[0], v_new=kv[1])
        if kv is None:
            cache.update(keys, values, step)
        else:
            cache.append(kv, step)
        if step.prefill:  # flash attention over the first cache_len positions
            return self._attend(queries, cache.k[:, :, :cache_len], cache.v[:, :, :cache_len])
        if use_triton(self.kernels, queries):
            if torch.is_grad_enabled() and any(t.requires_grad for t in (queries, cache.k, cache.v)):
                return self._attend_differentiably(queries, cache_len)
            return triton_ops().decode_attention(queries, cache.k, cache.v, cache_len)  # split-K
        if isinstance(cache_len, int):
            keys, values = cache.k[:, :, :cache_len], cache.v[:, :, :cache_len]
        else:
            keys, values = cache.k, cache.v
        return self._eager_attention(queries, keys, values, step.mask(keys.shape[2]))

    def _attend_differentiably(self, queries, cache_len):
        """A decode step in grad mode (decode attention has no backward): flash attention over
        the cache, causal on each row's first cache_len positions, as the torch path computes."""
        cache = self.cache
        p = self.dropout.p if self.training else 0.0
        if isinstance(cache_len, int):
            keys, values = cache.k[:, :, :cache_len], cache.v[:, :, :cache_len]
            return triton_ops().attention(queries, keys, values, causal=True, dropout_p=p)
        return triton_ops().attention(queries, cache.k, cache.v, causal=True, dropout_p=p,
                                      key_lens=cache_len)

    def _eager_attention(self, queries, keys, values, mask_bool=None):
        """The chapter's attention; the causal mask ends at the last key (or is ``mask_bool``)."""
        tq, tk = queries.shape[2], keys.shape[2]
        attn_scores = queries @ keys.transpose(2, 3)
        if mask_bool is None:
            mask_bool = causal_mask(tq, tk, queries.device)
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The chapter's persistent buffer comes first, as in its state_dict: a new tensor each
        # time, as each layer of each model owns its buffer there.
        w, n = self.W_query.weight, self.context_length
        destination[prefix + "mask"] = torch.ones(n, n, dtype=w.dtype, device=w.device).triu(1)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _drop_chapter_mask(self, module, state_dict, prefix, *args):
        mask = state_dict.pop(prefix + "mask", None)
        expected = (self.context_length, self.context_length)
        if mask is not None and tuple(mask.shape) != expected:
            raise ValueError(
                f"{prefix}mask: checkpoint has shape {tuple(mask.shape)}, the model's "
                f"context_length needs {expected}"
            )


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + att(norm1(x)), then x + ff(norm2(x)), with dropout on both branches."""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])
        self.kernels = "torch"
        self.name = "block"  # the profiler label; GPTModel names blocks after their state_dict prefix

    def forward(self, x, step: CacheStep | None = None):
        x, branch = self.unfinished(x, None, step)
        return x + branch

    def unfinished(self, x, branch, step: CacheStep | None = None):
        """The block on ``x`` + ``branch`` (the previous block's MLP output, its residual add
        fused into norm1, Triton kernels only; None: on ``x``) without its own last residual
        add: (x after attention, the MLP's output), for the caller, or the next block, to add."""
        with label("norm1", self):
            if branch is None:
                h = self.norm1(x)
            else:
                n = self.norm1
                h, x = triton_ops().add_layer_norm(branch, x, n.scale, n.shift, n.eps)
        shortcut = x
        with label("att", self):
            x = self.drop_shortcut(self.att(h, step))
        with label("norm2", self):
            if use_triton(self.kernels, x):  # residual add fused into norm2: one pass over x
                n = self.norm2
                h, x = triton_ops().add_layer_norm(x, shortcut, n.scale, n.shift, n.eps)
            else:
                x = x + shortcut
                h = self.norm2(x)
        with label("ff", self):
            return x, self.drop_shortcut(self.ff(h))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, dropout, transformer blocks, final norm, output head."""

    def __init__(self, cfg, kernels="auto"):
        super().__init__()
        cfg = self.cfg = check_config(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.cache_slot = CacheSlot()  # the installed KV cache, see set_cache
        for i, block in enumerate(self.trf_blocks):
            block.name = f"trf_blocks.{i}"
            block.att.slot, block.att.layer = self.cache_slot, i
        self.use_kernels(kernels)

    def use_kernels(self, kernels: str) -> "GPTModel":
        """Switch LayerNorm, attention (and, for CUDA inference, the MLP's GELU epilogue) to
        "torch", "triton" or "auto"; weights are untouched."""
        self.kernels = check_kernels(kernels)
        for module in self.modules():
            if isinstance(module, (LayerNorm, MultiHeadAttention, TransformerBlock, FeedForward)):
                module.kernels = kernels
        return self

    def new_cache(self, batch_size, max_len=None, dtype=None, device=None) -> ModelCache:
        """A KV cache for ``batch_size`` rows of up to ``max_len`` tokens (default: the context).

        ``dtype`` defaults to the autocast dtype when autocast is on, else the weights' dtype;
        ``device`` to the weights'. The model is not changed: install it with ``set_cache``.
        """
        ctx = self.cfg["context_length"]
        batch_size = _as_int("batch_size", batch_size)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        max_len = ctx if max_len is None else _as_int("max_len", max_len)
        if not 0 < max_len <= ctx:
            raise ValueError(f"max_len must be in [1, {ctx}] (or None for the context), got {max_len}")
        weight = self.tok_emb.weight
        try:
            device = torch.device(device) if device is not None else weight.device
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from exc
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        return ModelCache([
            KVCache(batch_size, b.att.num_heads, max_len, b.att.head_dim, dtype, device)
            for b in self.trf_blocks
        ])

    def set_cache(self, cache: ModelCache | None) -> "GPTModel":
        """Install ``cache`` (from ``new_cache``; None removes it): ``model(ids, start_pos=...)``
        then appends to it. Generation installs its own cache around each of its steps and puts
        back the one that was there, so streams on one model never share a cache."""
        if cache is not None:
            if not isinstance(cache, ModelCache):
                what = type(cache).__name__
                raise TypeError(f"cache must be a ModelCache from model.new_cache(), got {what}")
            cfg = self.cfg
            if cache.layout != (cfg["n_layers"], cfg["n_heads"], cfg["emb_dim"] // cfg["n_heads"]):
                raise ValueError("cache was made by a model of another shape (layers, heads, head_dim)")
        self.cache_slot.cache = cache
        return self

    @property
    def kv_cache(self) -> ModelCache | None:
        """The installed KV cache (None without one)."""
        return self.cache_slot.cache

    def setup_cache(self, batch_size, max_len=None, dtype=None, device=None) -> "GPTModel":
        """Allocate and install a KV cache (``new_cache`` then ``set_cache``); returns the model.

        While a cache is set, ``model(ids, start_pos=...)`` appends to it (see ``forward``). On a
        bad argument it raises before anything changes: the previous cache stays installed.
        """
        return self.set_cache(self.new_cache(batch_size, max_len, dtype, device))

    def reset_cache(self) -> None:
        """Remove the installed KV cache (freed unless its owner still holds it)."""
        self.set_cache(None)

    def forward(self, in_idx, start_pos=None):
        """Logits for token ids ``in_idx`` (batch, seq_len).

        With a KV cache (``setup_cache``), ``start_pos`` gives the position of ``in_idx[:, 0]``:
        an int, or a (batch,) (or 0-d) integer tensor of per-row positions; the keys and values
        of the new tokens are written to the cache there and attention covers every cached
        position up to them. A tensor's values are checked for CPU input only (no host sync).
        """
        x = self.hidden_states(in_idx, start_pos)
        with label("out_head"):
            return self.out_head(x)

    def hidden_states(self, in_idx, start_pos=None):
        """The final norm's output (batch, seq_len, emb_dim): the forward up to the output head."""
        start_pos = self._check_ids(in_idx, start_pos)
        batch_size, seq_len = in_idx.shape
        if start_pos is None:
            step, positions = None, torch.arange(seq_len, device=in_idx.device)
        else:
            step = CacheStep(start_pos, seq_len, in_idx.device)
            positions = step.positions
        with label("embedding"):
            tok_embeds = self.tok_emb(in_idx)
            pos_embeds = self.pos_emb(positions)
        if (step is None or not use_triton(self.kernels, tok_embeds)
                or torch.compiler.is_compiling()):
            x = self.drop_emb(tok_embeds + pos_embeds)
            for block in self.trf_blocks:
                x = block(x, step)
            with label("final_norm"):
                return self.final_norm(x)
        # With a KV cache and the Triton kernels, each block's last residual add is fused into
        # the next LayerNorm (the final one's too): one kernel less per layer and token; and
        # a decode step's embedding sum into the first (per-row positions: one per token).
        x, branch = tok_embeds, pos_embeds
        if pos_embeds.shape != tok_embeds.shape or (self.drop_emb.training and self.drop_emb.p):
            x, branch = self.drop_emb(tok_embeds + pos_embeds), None
        for block in self.trf_blocks:
            x, branch = block.unfinished(x, branch, step)
        with label("final_norm"):
            n = self.final_norm
            return triton_ops().add_layer_norm(branch, x, n.scale, n.shift, n.eps)[0]

    def loss(self, in_idx, targets, ignore_index=-100, check_targets=True):
        """The book's training loss (``calc_loss_batch``): mean cross-entropy of the next-token
        logits of ``in_idx`` against ``targets`` (same shape), skipping ``ignore_index``.

        With Triton kernels the output head and the loss are one fused op
        (``gptfast.kernels.linear_cross_entropy``), which never stores the (tokens x vocab) logits.
        An out-of-range target is a ValueError on every device and path (on CUDA the check reads
        one flag back: a host sync; a device-side assert would end the process's CUDA use).
        ``check_targets=False`` skips that read for targets known to be valid (the trainer's,
        which ``TokenData`` checks on the host batch by batch); a bad target then gives a NaN
        loss and NaN gradients on both paths, never torch's device-side assert.
        """
        ignore_index, read = self._check_targets(in_idx, targets, ignore_index, check_targets)
        x = self.hidden_states(in_idx)
        if use_triton(self.kernels, x):  # targets checked above: no second read in the op
            with label("out_head"):
                return triton_ops().linear_cross_entropy(x, self.out_head.weight, targets,
                                                         ignore_index=ignore_index,
                                                         check_targets=False)
        with label("out_head"):
            logits = self.out_head(x)
        if read:
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return _unread_cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index)

    def compile_loss(self, mode="default", *, fullgraph=True, dynamic=None, backend="inductor",
                     check_targets=False) -> TrainingLoss:
        """The fastest training step in one call: ``loss`` with the fused head, compiled as one
        graph with its backward (``mode="reduce-overhead"``: CUDA graphs on CUDA), returned as a
        module ``step`` (DDP can wrap it); ``loss = step(ids, targets)``, then ``loss.backward()``.
        The model is unchanged (its forward, ``loss`` and generation stay eager). Targets are not
        read back unless ``check_targets``. See ``gptfast.compiled.compile_loss``."""
        return compile_loss(self, mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend,
                            check_targets=check_targets)

    def _check_targets(self, in_idx, targets, ignore_index, check_values=True) -> int:
        """The targets checked here for both paths, as the fused loss (kernels="triton") checks
        them and in its words, so that both refuse the same input with one message; returns
        ignore_index as an int (numpy integers too). The values are read unless
        ``check_values`` is False, under torch.compile or while a CUDA graph is captured:
        returns (ignore_index as an int, whether the values were read)."""
        ids_shape = tuple(in_idx.shape) if isinstance(in_idx, torch.Tensor) else None
        if not isinstance(targets, torch.Tensor) or (ids_shape and tuple(targets.shape) != ids_shape):
            what = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a tensor shaped like the token ids {ids_shape}, "
                             f"got {what}")
        if not isinstance(check_values, bool):
            raise TypeError(f"check_targets must be True or False, got {check_values!r}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets must be int64 or int32 class indices, got {targets.dtype}")
        if isinstance(in_idx, torch.Tensor) and targets.device != in_idx.device:
            raise ValueError(f"targets are on {targets.device}, the token ids on {in_idx.device}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        ignore_index, vocab = int(ignore_index), self.cfg["vocab_size"]
        # is_compiling first, so that dynamo never traces the capture query for CUDA targets (a
        # host query returning a bool, not a graph op; traced on torch's CPU build, it raises)
        read = (check_values and not torch.compiler.is_compiling()
                and not (targets.is_cuda and torch.cuda.is_current_stream_capturing()))
        if read and targets.numel():
            bad = _bad_targets(targets, vocab, ignore_index)
            if bad.any():  # on CUDA one flag read back (a host sync)
                raise ValueError(f"target {targets[bad][0].item()} is out of range for {vocab} "
                                 f"classes (and is not ignore_index={ignore_index})")
        return ignore_index, read

    def _check_ids(self, in_idx, start_pos):
        if not isinstance(in_idx, torch.Tensor) or in_idx.dtype not in (torch.int64, torch.int32):
            what = in_idx.dtype if isinstance(in_idx, torch.Tensor) else type(in_idx).__name__
            raise TypeError(f"token ids must be an int64 or int32 tensor, got {what}")
        if in_idx.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, seq_len), got {tuple(in_idx.shape)}")
        weights = self.tok_emb.weight.device
        if in_idx.device != weights:
            raise ValueError(f"the token ids are on {in_idx.device} but the model is on {weights}")
        if in_idx.shape[1] > self.cfg["context_length"]:
            raise ValueError(
                f"sequence length {in_idx.shape[1]} exceeds the context length "
                f"{self.cfg['context_length']}; crop the input (generate() does)"
            )
        if start_pos is not None:
            start_pos = self._check_start_pos(in_idx, start_pos)
        # Checking values reads the data back; on CUDA that would sync every forward, so the
        # range check runs for CPU inputs only (generate() checks prompts wherever they are).
        # Under torch.compile it is skipped too: a data-dependent .item() would break the graph.
        if in_idx.device.type == "cpu" and in_idx.numel() and not torch.compiler.is_compiling():
            check_token_range(in_idx, self.cfg["vocab_size"])
        return start_pos

    def _check_start_pos(self, in_idx, start_pos):
        """``start_pos`` as an int or a (batch,) tensor that fits the installed cache."""
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("start_pos needs a KV cache: call model.setup_cache(batch_size) first")
        (b, t), max_len = in_idx.shape, cache.max_len
        if cache.batch_size != b:
            raise ValueError(f"the KV cache holds {cache.batch_size} rows, got a batch of {b}")
        if cache.device != in_idx.device:
            raise ValueError(f"the KV cache is on {cache.device}, the token ids on {in_idx.device}")
        if not torch.compiler.is_compiling():
            autocast = torch.is_autocast_enabled(in_idx.device.type)
            dtype = torch.get_autocast_dtype(in_idx.device.type) if autocast else self.tok_emb.weight.dtype
            if cache.dtype != dtype:
                raise ValueError(
                    f"the KV cache holds {cache.dtype} but the model computes in {dtype}: make the "
                    "cache with dtype=None (the compute dtype) or the same dtype"
                )
        if not isinstance(start_pos, (int, torch.Tensor)) or isinstance(start_pos, bool):
            if not isinstance(start_pos, numbers.Integral) or isinstance(start_pos, bool):
                raise TypeError(f"start_pos must be an int or an integer tensor, got {start_pos!r}")
            start_pos = int(start_pos)
        if isinstance(start_pos, int):
            if not 0 <= start_pos <= max_len - t:
                raise ValueError(
                    f"tokens at positions {start_pos}..{start_pos + t - 1} do not fit the "
                    f"KV cache of {max_len} positions"
                )
            return start_pos
        if start_pos.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"a start_pos tensor must be int64 or int32, got {start_pos.dtype}")
        if start_pos.device != in_idx.device:
            raise ValueError(f"start_pos is on {start_pos.device}, the token ids on {in_idx.device}")
        if start_pos.dim() == 0:
            start_pos = start_pos.expand(b)
        if tuple(start_pos.shape) != (b,):
            raise ValueError(f"a start_pos tensor must have shape ({b},) or (), got {tuple(start_pos.shape)}")
        if start_pos.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = start_pos.min().item(), start_pos.max().item()
            if lo < 0 or hi > max_len - t:
                raise ValueError(
                    f"start_pos {lo if lo < 0 else hi}: tokens at positions from there on "
                    f"({t} of them) do not fit the KV cache of {max_len} positions"
                )
        return start_pos


def _bad_targets(targets, vocab: int, ignore_index: int) -> torch.Tensor:
    """Where a target is outside [0, vocab) and not ignore_index (bool, targets' shape)."""
    return ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)


def _unread_cross_entropy(logits, targets, ignore_index: int) -> torch.Tensor:
    """``F.cross_entropy(logits, targets, ignore_index=...)`` (mean) for targets whose values were
    not read: a target out of range (and not ``ignore_index``) makes the loss, and through it
    every gradient, NaN, as the fused loss's token does, instead of the device-side assert that
    would end the process's CUDA use. Valid targets give F.cross_entropy's value exactly (times
    1.0); no host sync, so it compiles and captures."""
    bad = _bad_targets(targets, logits.shape[-1], ignore_index)
    loss = F.cross_entropy(logits, targets.masked_fill(bad, ignore_index), ignore_index=ignore_index)
    return loss * torch.where(bad.any(), float("nan"), 1.0).to(loss.dtype)


def _as_int(name, value) -> int:
    """An int from an int-like value (numpy integers too), never from a bool or a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_token_range(ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = ids.min().item(), ids.max().item()
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is out of range for vocab_size {vocab_size}")
