"""The whole GPT model (124M, batch 8 x 1024 tokens, bf16 autocast): forward and a training
step (forward, cross-entropy, backward, fused AdamW step) with kernels="triton" vs "torch".

Throughput is TFLOP/s over ``model_flops`` (2 FLOPs per Linear weight per token plus causal
attention; a training step counts 3x the forward); % of limit is the matmul peak, i.e. MFU.
Agreement: logits (and, for the training step, the loss and every parameter's gradient,
concatenated) on the first two sequences, against the model in float64.
"""

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from bench._metrics import model_flops
from bench._providers import optional, require_model_kernels
from bench._runner import (
    BENCH_MARK,
    INTERPRETER_ONLY,
    Case,
    compare,
    run_gpu_case,
    run_interpreter_case,
)

pytestmark = BENCH_MARK

OP = "model"
B, T = 8, 1024
PROVIDERS = ("torch", "triton")  # the baseline first
MODES = ("fwd", "train")
CHECKED = 2  # sequences compared with float64


def gpu_cases(quick: bool) -> list[Case]:
    params = {"B": B, "T": T, "config": "124M"}
    return [
        Case(OP, p, f"124M B{B} T{T}", params, "bf16", mode) for mode in MODES for p in PROVIDERS
    ]


def base_model(cfg, device):
    """The model in fp32 with kernels="torch", seeded; dropout off for repeatable numbers."""
    GPTModel = optional("gptfast", "GPTModel", "gptfast is not available yet")
    torch.manual_seed(0)
    with torch.device(device):
        return GPTModel({**cfg, "drop_rate": 0.0}, kernels="torch")


def values(model, idx, targets, mode, amp):
    """Logits and, for ``train``, the loss and all parameter gradients (one flat vector)."""
    ctx = torch.autocast(idx.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    if mode == "fwd":
        with torch.no_grad(), ctx:
            return {"logits": model(idx)}
    with ctx:
        logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    flat = torch.cat([g.flatten() for g in grads])
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": flat}


def check(model, base, idx, targets, mode, amp, dtype):
    vals = values(model, idx, targets, mode, amp)
    eager = values(base, idx, targets, mode, amp)
    ref = values(copy.deepcopy(base).double(), idx, targets, mode, amp=False)
    return compare(vals, eager, ref, dtype)


def step_fn(model, idx, targets, mode):
    """The callable a case times: an inference forward, or a whole training step."""
    amp = torch.autocast(idx.device.type, dtype=torch.bfloat16)
    if mode == "fwd":

        def forward():
            with torch.no_grad(), amp:
                return model(idx)

        return forward
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def train_step():
        with amp:
            logits = model(idx)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train_step


def linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_model(benchmark, case, device_limits, device):
    cfg = optional("gptfast", "GPT_CONFIG_124M", "gptfast is not available yet")
    if case.provider == "triton":
        require_model_kernels()
    base = base_model(cfg, device)
    model = copy.deepcopy(base).use_kernels(case.provider)
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, cfg["vocab_size"], (B, T), generator=g, device=device)
    targets = torch.randint(0, cfg["vocab_size"], (B, T), generator=g, device=device)
    sub = idx[:CHECKED], targets[:CHECKED]
    run_gpu_case(
        benchmark,
        case,
        timed=lambda name: step_fn(
            model if name == case.provider else copy.deepcopy(base).use_kernels(name),
            idx, targets, case.mode,
        ),
        check=lambda: check(model, base, *sub, case.mode, amp=True, dtype=torch.bfloat16),
        metric="TFLOP/s",
        amount=model_flops(linear_params(base), B, T, cfg["n_layers"], cfg["emb_dim"], case.mode),
    )


@INTERPRETER_ONLY
def test_model_interpreter(benchmark):
    """A tiny GPT (2 layers, head dim 16, odd length) in fp32, training-step gradients, under
    the Triton interpreter on CPU."""
    cfg = optional("gptfast", "GPT_CONFIG_124M", "gptfast is not available yet")
    require_model_kernels()
    tiny = {**cfg, "vocab_size": 97, "context_length": 32, "emb_dim": 64, "n_heads": 4,
            "n_layers": 2}
    base = base_model(tiny, "cpu")
    model = copy.deepcopy(base).use_kernels("triton")
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, 97, (2, 23), generator=g) for _ in range(2))
    case = Case(OP, "triton", "tiny B2 T23", {"B": 2, "T": 23, "config": "tiny"}, "fp32", "train")
    run_interpreter_case(
        benchmark,
        case,
        run=lambda: values(model, idx, targets, "train", amp=False),
        check=lambda vals: compare(
            vals,
            values(base, idx, targets, "train", amp=False),
            values(copy.deepcopy(base).double(), idx, targets, "train", amp=False),
            torch.float32,
        ),
    )
