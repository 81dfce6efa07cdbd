"""The GPT-2 model of the book chapter, with switchable LayerNorm and attention kernels.

Module names, creation order, parameters and state_dict keys are the chapter's, so its
checkpoints load here and ``torch.manual_seed(s)`` gives bit-identical initial weights.
``kernels`` picks the implementation of LayerNorm and attention per model:
"torch" (eager PyTorch, the chapter's math), "triton" (this package's fused kernels) or
"auto" (Triton for CUDA inputs, torch otherwise), decided at each forward call.
"""

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast.config import check_config

KERNEL_CHOICES = ("auto", "torch", "triton")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    return kernels


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    return kernels == "triton" or (kernels == "auto" and x.is_cuda)


def label(name: str):
    """A ``record_function`` range for the profiler, only while one runs (it costs ~10 µs otherwise)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


@functools.cache
def triton_ops():
    """The kernels package, imported on first use so the torch path never needs Triton."""
    try:
        import kernels
    except ImportError as exc:
        raise RuntimeError(f"kernels='triton' needs the Triton kernels, which failed to import: {exc}")
    return kernels


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

    def forward(self, x):
        return self.layers(x)


@functools.lru_cache(maxsize=4)
def _chapter_mask(context_length, dtype, device):
    return torch.triu(torch.ones(context_length, context_length, dtype=dtype, device=device), 1)


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
        self.register_load_state_dict_pre_hook(self._drop_chapter_mask)

    def forward(self, x):
        b, num_tokens, _ = x.shape
        split = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries, keys, values = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        if use_triton(self.kernels, x):
            p = self.dropout.p if self.training else 0.0
            context_vec = triton_ops().attention(queries, keys, values, causal=True, dropout_p=p)
        else:
            context_vec = self._eager_attention(queries, keys, values)
        context_vec = context_vec.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)

    def _eager_attention(self, queries, keys, values):
        t = queries.shape[2]
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = torch.ones(t, t, dtype=torch.bool, device=queries.device).triu(1)
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The chapter's persistent buffer comes first, as in its state_dict (one shared tensor).
        w = self.W_query.weight
        destination[prefix + "mask"] = _chapter_mask(self.context_length, w.dtype, w.device)
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

    def forward(self, x):
        shortcut = x
        with label(self.name + ".norm1"):
            h = self.norm1(x)
        with label(self.name + ".att"):
            x = self.drop_shortcut(self.att(h))
        with label(self.name + ".norm2"):
            if use_triton(self.kernels, x):  # residual add fused into norm2: one pass over x
                n = self.norm2
                h, x = triton_ops().add_layer_norm(x, shortcut, n.scale, n.shift, n.eps)
            else:
                x = x + shortcut
                h = self.norm2(x)
        with label(self.name + ".ff"):
            return x + self.drop_shortcut(self.ff(h))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, dropout, transformer blocks, final norm, output head."""

    def __init__(self, cfg, kernels="auto"):
        super().__init__()
        check_config(cfg)
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        for i, block in enumerate(self.trf_blocks):
            block.name = f"trf_blocks.{i}"
        self.use_kernels(kernels)

    def use_kernels(self, kernels: str) -> "GPTModel":
        """Switch LayerNorm and attention to "torch", "triton" or "auto"; weights are untouched."""
        self.kernels = check_kernels(kernels)
        for module in self.modules():
            if isinstance(module, (LayerNorm, MultiHeadAttention, TransformerBlock)):
                module.kernels = kernels
        return self

    def forward(self, in_idx):
        self._check_ids(in_idx)
        batch_size, seq_len = in_idx.shape
        with label("embedding"):
            tok_embeds = self.tok_emb(in_idx)
            pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
            x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        with label("final_norm"):
            x = self.final_norm(x)
        with label("out_head"):
            return self.out_head(x)

    def _check_ids(self, in_idx):
        if not isinstance(in_idx, torch.Tensor) or in_idx.dtype not in (torch.int64, torch.int32):
            what = in_idx.dtype if isinstance(in_idx, torch.Tensor) else type(in_idx).__name__
            raise TypeError(f"token ids must be an int64 or int32 tensor, got {what}")
        if in_idx.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, seq_len), got {tuple(in_idx.shape)}")
        if in_idx.shape[1] > self.cfg["context_length"]:
            raise ValueError(
                f"sequence length {in_idx.shape[1]} exceeds the context length "
                f"{self.cfg['context_length']}; crop the input (generate() does)"
            )
        # Checking values reads the data back; on CUDA that would sync every forward, so the
        # range check runs for CPU inputs only (generate() checks prompts wherever they are).
        if in_idx.device.type == "cpu" and in_idx.numel():
            check_token_range(in_idx, self.cfg["vocab_size"])


def check_token_range(ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = ids.min().item(), ids.max().item()
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is out of range for vocab_size {vocab_size}")
