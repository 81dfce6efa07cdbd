"""What a benchmark case counts: bytes and FLOPs each op must do, the timer, peak memory, the
device's name.

The counting models are pure functions (no GPU needed), unit-tested on CPU
(tests/test_bench_helpers.py). Sizes: M rows, N width, ``e`` bytes per element of the
activations (x, y, dy, ...), ``p`` bytes per element of weight/bias and their gradients, and
the per-row statistics (mean, rstd) are fp32. Attention follows the usual FlashAttention count.
"""

import re
import time

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
STAT_BYTES = 4  # mean and rstd are kept in fp32, one of each per row
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_mode(mode: str, modes=MODES) -> None:
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")


def layer_norm_bytes(M: int, N: int, e: int, mode: str, p: int | None = None) -> int:
    """Bytes a LayerNorm of an (M, N) input must move from/to memory.

    fwd:     read x, weight, bias; write y                        2MN·e + 2N·p
    bwd:     read x, dy, weight, mean, rstd; write dx, dw, db     3MN·e + 3N·p + 2M·4
    fwd+bwd: the forward, which in training also writes mean and rstd, then the backward
                                                                  5MN·e + 5N·p + 4M·4
    """
    _check_mode(mode)
    p = e if p is None else p
    fwd = 2 * M * N * e + 2 * N * p
    bwd = 3 * M * N * e + 3 * N * p + 2 * M * STAT_BYTES
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + 2 * M * STAT_BYTES + bwd}[mode]


def add_layer_norm_bytes(M: int, N: int, e: int, mode: str, p: int | None = None) -> int:
    """Bytes of the fused ``h = x + residual; y = LayerNorm(h)`` returning (y, h).

    fwd:     read x, residual, weight, bias; write y, h           4MN·e + 2N·p
    bwd:     read dy, dh (the gradient reaching h from the residual stream), h, weight, mean,
             rstd; write dx (x and residual share one gradient, written once), dw, db
                                                                  4MN·e + 3N·p + 2M·4
    fwd+bwd: forward (also writing mean, rstd) + backward         8MN·e + 5N·p + 4M·4
    """
    _check_mode(mode)
    p = e if p is None else p
    fwd = 4 * M * N * e + 2 * N * p
    bwd = 4 * M * N * e + 3 * N * p + 2 * M * STAT_BYTES
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + 2 * M * STAT_BYTES + bwd}[mode]


def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, causal: bool, mode: str) -> int:
    """FLOPs of attention: two matmuls of 2·Tq·Tk·D each per (batch, head) in the forward,
    halved when causal (half the scores are masked), and 2.5x the forward for the backward
    (five matmuls instead of two: recomputing S, dV, dP, dQ, dK)."""
    _check_mode(mode)
    fwd = 4 * B * H * Tq * Tk * D
    if causal:
        fwd //= 2
    bwd = fwd * 5 // 2
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def model_flops_per_token(n_params: int, n_layers: int, d_model: int, T: int, mode: str) -> int:
    """FLOPs per token of a GPT at sequence length T, the PaLM / nanoGPT estimate used for MFU.

    ``train`` (forward + backward): 6·N + 12·L·d·T. N = the parameters that multiply each token
    (2 FLOPs per weight forward, 4 backward); for the chapter's model, every parameter except
    the token and position embedding tables, which are lookups (its untied output head is
    counted: nanoGPT's N for the tied GPT-2, where the shared table is the head). 12·L·d·T:
    attention's two matmuls over T keys (4·d·T per layer forward, x3), without the causal
    halving, as in PaLM. ``fwd``: a third of it, 2·N + 4·L·d·T.
    """
    _check_mode(mode, ("fwd", "train"))
    train = 6 * n_params + 12 * n_layers * d_model * T
    return train if mode == "train" else train // 3


def decode_step_bytes(weight_bytes: int, n_layers: int, B: int, d_model: int, cache_len: int,
                      e: int) -> int:
    """Bytes one decode step (one new token per row) must read: every weight once
    (``weight_bytes``, in the dtype used) plus the KV cache, keys and values of ``cache_len``
    positions per layer and row: 2·L·B·cache_len·d·e (d = heads x head dim)."""
    return weight_bytes + 2 * n_layers * B * cache_len * d_model * e


def sync_timer() -> float:
    """perf_counter() after all queued GPU work finished: a timed region measured with this
    timer at both ends includes the completion of the kernels launched inside it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory(fn) -> int:
    """Peak bytes allocated on the CUDA device during a call of ``fn`` (after one warm-up call),
    everything already resident included (weights, optimizer state, inputs)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device_slug(name: str) -> str:
    """File-system name of a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
