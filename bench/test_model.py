"""The whole GPT model in bf16 autocast: a prefill forward (no grad) and a training step.

GPT-2 124M and 355M (``gptfast.get_config``, dropout 0), batches of 8 x 1024 and 2 x 512 tokens;
the training step also with dropout 0.1 (the chapter's rate; shape "... dropout 0.1"). A
training step is forward, cross-entropy (on fp32 logits), backward, AdamW step
(``fused=True``) and ``zero_grad(set_to_none=True)``. Providers, side by side on the same
weights:

  torch    gptfast ``GPTModel(kernels="torch")``: the chapter's eager math (the speedup baseline)
  triton   gptfast ``GPTModel(kernels="triton")``: fused LayerNorm / residual add + LayerNorm,
           flash attention
  triton-loss  the triton model with the training loss from ``GPTModel.loss``: output head and
           cross-entropy fused (``gptfast.kernels.linear_cross_entropy``, no (tokens x vocab) logits);
           (training step only: its forward is triton's)
  triton-compile  the triton model with every transformer block torch.compile'd as for
           ``compile`` (the kernels are ``gptfast::`` custom ops: one graph per block, no
           breaks; Inductor fuses the matmul epilogues, GELU and the other elementwise work)
  triton-recipe  ``GPTModel.compile_loss()``, the fastest recipe in one call: the triton model's
           whole loss (fused head included) one torch.compile graph with its backward, Inductor,
           mode "default" (training step only; under the CPU interpreter: backend "aot_eager")
  triton-graphs  the same with ``compile_loss(mode="reduce-overhead")``: the compiled loss and its
           backward each replayed as one CUDA graph (no host launches per kernel; CUDA only,
           training step only)
  compile  the chapter's architecture with ``F.scaled_dot_product_attention(is_causal=True)``
           as each attention's math, every transformer block torch.compile'd (regional
           compilation: one compiled block serves all layers, so the compile costs one block's
           time instead of the whole model's; embeddings, final norm and head run eager)
  hf-eager, hf-sdpa  Hugging Face ``GPT2LMHeadModel`` with ``attn_implementation="eager"`` /
           ``"sdpa"``, built offline from a ``GPT2Config`` of the same size with our weights
           (untied head, like the chapter's)
  hf-gptfast  the same patched by ``gptfast.hf.apply(model, loss=True)``: our flash attention
           (``attn_implementation="gptfast"``), every LayerNorm ``gptfast.kernels.LayerNorm``,
           and, for the training step, the loss as the Trainer gets it, ``model(input_ids,
           attention_mask, labels=...).loss``, with the head and cross-entropy fused
           (``gptfast.kernels.linear_cross_entropy``, ``logits=None``: no (tokens x vocab) logits)

Padded batch (op ``model_padded``): the same B x T batch right-padded, the rows' lengths spread
evenly from 25% to 100% of T (the fine-tuning case), with the tokenizer-style 2-D attention
mask; the loss covers the real tokens only (targets -100 at the padding). Providers: hf-sdpa
(SDPA with the mask transformers builds, logits + cross-entropy: the speedup baseline) and
hf-gptfast (per-row lengths, padded key tiles never read; the fused loss). Counted work, tokens/s and MFU use the real tokens only (each row
charged the FLOPs of its own length). Agreement: the logits of the first two rows' real tokens
(the two shortest) and the gradients of their loss, against the chapter model run on each of
those rows alone at its own length (float64, and eager bf16).

tokens/s = B·T / the step's CUDA-event time. TFLOP/s counts ``model_flops_per_token`` (PaLM /
nanoGPT: 6·N + 12·L·d·T per token for a training step, a third of it for the forward;
N = every parameter except the token and position embedding tables, output head included:
85.0M + 38.6M for 124M, 302.2M + 51.5M for 355M); MFU = that over the bf16 matmul peak
measured in the same run (8192³, not the data-sheet number). Peak memory is
``torch.cuda.max_memory_allocated`` over one step after a warm-up step: weights, optimizer
state, inputs, activations and logits, with nothing else resident.

Agreement: each provider runs the timed batch (no extra compile for another shape); its logits
on the first two sequences, the loss over them (the other sequences do not enter it, so the
gradients are those of the two) and every parameter's gradient (HF's mapped to the chapter's
names) are compared with the chapter model in float64 on those sequences, next to eager bf16
(2x rule). Only our provider fails a case on disagreement; others are flagged. A dropout case
has no elementwise reference (each provider draws its own masks; its dropout-0 case checks its
numbers): it fails unless its step runs dropout (two losses of the same batch differ) with a
finite loss and gradients, and its "agrees" column is "-".
"""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from bench._metrics import model_flops_per_token, peak_memory
from bench._providers import (
    compile_blocks,
    compile_settings,
    hf_gpt2,
    optional,
    require_model_kernels,
    use_sdpa,
)
from bench._runner import (
    BENCH_MARK,
    INTERPRETER_ONLY,
    RECORDS,
    Case,
    compare,
    run_gpu_case,
    run_interpreter_case,
)

pytestmark = BENCH_MARK

OP = "model"
SIZES = ("124M", "355M")
BATCHES = ((8, 1024), (2, 512))  # (B, T)
PROVIDERS = ("torch", "triton", "triton-loss", "triton-compile", "triton-recipe", "triton-graphs",
             "compile", "hf-eager", "hf-sdpa", "hf-gptfast")  # the baseline first
TRAIN_ONLY = ("triton-loss", "triton-recipe", "triton-graphs")  # their forward is triton's
RECIPES = {"triton-recipe": "default", "triton-graphs": "reduce-overhead"}  # compile_loss modes
DROPOUT = 0.1  # the chapter's rate, for the training step's second case
QUICK_DROPOUT = ("torch", "triton-recipe", "compile")  # the baseline, ours vs issue 23's target
PADDED = "model_padded"
PADDED_PROVIDERS = ("hf-sdpa", "hf-gptfast")  # the baseline (bench._runner.BASELINE) first
OURS = ("triton", "triton-loss", "triton-compile", "triton-recipe", "triton-graphs", "hf-gptfast")
MODES = ("fwd", "train")
CHECKED = 2  # sequences compared with float64
EMBEDDINGS = ("tok_emb.weight", "pos_emb.weight")  # lookups: no FLOPs


def gpu_cases(quick: bool) -> list[Case]:
    sizes = [("124M", 8, 1024)] if quick else [(s, B, T) for s in SIZES for B, T in BATCHES]
    cases = []
    for size, B, T in sizes:
        params = {"config": size, "B": B, "T": T}
        for mode in MODES:
            cases += [Case(OP, p, f"{size} B{B} T{T}", params, "bf16", mode, ours=p in OURS)
                      for p in PROVIDERS if not (p in TRAIN_ONLY and mode == "fwd")]
            if mode == "train":
                cases += [Case(OP, p, f"{size} B{B} T{T} dropout {DROPOUT}",
                               {**params, "dropout": DROPOUT}, "bf16", mode, ours=p in OURS)
                          for p in PROVIDERS if not quick or p in QUICK_DROPOUT]
            cases += [Case(PADDED, p, f"{size} B{B} T{T} padded", params, "bf16", mode,
                           ours=p in OURS) for p in PADDED_PROVIDERS]
    return cases


def padded_lengths(B: int, T: int) -> list[int]:
    """Row lengths spread evenly from 25% to 100% of T, shortest first."""
    return [round(T / 4 + (T - T / 4) * b / max(B - 1, 1)) for b in range(B)]


def right_padding(lengths, T, device) -> torch.Tensor:
    """The tokenizer's (B, T) attention mask of right-padded rows (1 = real token)."""
    pos = torch.arange(T, device=device)
    return (pos < torch.tensor(lengths, device=device)[:, None]).long()


def config(name: str, dropout: float = 0.0) -> dict:
    get_config = optional("gptfast", "get_config", "gptfast is not available yet")
    return {**get_config(name), "drop_rate": dropout}


def chapter_model(cfg, device):
    """The model in fp32 with kernels="torch", seeded: every provider starts from these weights."""
    GPTModel = optional("gptfast", "GPTModel", "gptfast is not available yet")
    torch.manual_seed(0)
    with torch.device(device):
        return GPTModel(cfg, kernels="torch")


def build(provider: str, cfg, device):
    model = chapter_model(cfg, device)
    if provider in ("triton", "triton-loss", "triton-compile", *RECIPES):
        require_model_kernels()
        model.use_kernels("triton")
        model.fused_loss = provider == "triton-loss"  # read by values() and training_loss()
        if provider in RECIPES:  # in __dict__, not a submodule: the loss holds the model
            cuda = model.tok_emb.weight.is_cuda
            if not cuda and RECIPES[provider] != "default":
                raise ValueError(f"provider {provider!r} replays CUDA graphs: it needs a CUDA device")
            compile_settings()  # room for every case's graph, as for the other compiled providers
            model.__dict__["recipe"] = model.compile_loss(RECIPES[provider],
                                                          backend="inductor" if cuda else "aot_eager")
        return compile_blocks(model) if provider == "triton-compile" else model
    if provider == "compile":
        return compile_blocks(use_sdpa(model))
    if provider.startswith("hf-"):
        return hf_gpt2(model, attn_implementation=provider.removeprefix("hf-"))
    if provider != "torch":
        raise ValueError(f"unknown provider {provider!r}")
    return model


def matmul_params(cfg) -> int:
    """N of ``model_flops_per_token``: the parameters except the embedding tables."""
    GPTModel = optional("gptfast", "GPTModel", "gptfast is not available yet")
    with torch.device("meta"):
        model = GPTModel(cfg, kernels="torch")
    return sum(p.numel() for name, p in model.named_parameters() if name not in EMBEDDINGS)


def checked_logits(model, idx, lengths=None):
    """(logits, positions) of the first CHECKED rows: all T positions, or with ``lengths`` the
    real tokens of each row, (N, vocab) and a (N,) index into the flattened (B, T) batch. A
    Hugging Face provider runs the padded batch with its mask; the chapter model (the
    reference) runs each checked row alone at its own length."""
    if lengths is None:
        return model(idx)[:CHECKED].flatten(0, 1), torch.arange(CHECKED * idx.shape[1])
    T = idx.shape[1]
    if hasattr(model, "hf"):
        logits = model(idx, attention_mask=right_padding(lengths, T, idx.device))
        rows = [logits[b, : lengths[b]] for b in range(CHECKED)]
    else:
        rows = [model(idx[b : b + 1, : lengths[b]])[0] for b in range(CHECKED)]
    positions = torch.cat([b * T + torch.arange(lengths[b]) for b in range(CHECKED)])
    return torch.cat(rows), positions


def values(model, idx, targets, mode, amp, lengths=None):
    """Logits of the first CHECKED rows (their real tokens, given ``lengths``) and, for
    ``train``, their loss and every parameter's gradient (one flat vector, parameters in name
    order, named as the chapter model's). A ``triton-loss`` or ``hf-gptfast`` model
    (``model.fused_loss``) takes its loss from ``model.loss`` over those rows (the logits then
    carry no graph; a padded batch: over the whole batch with its mask, every target but the
    checked rows' real tokens ignored); a ``triton-recipe`` model from its compiled loss over
    the whole batch, the other rows' targets ignored (the timed shape: no second compile)."""
    ctx = torch.autocast(idx.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    if mode == "fwd":
        with torch.no_grad(), ctx:
            return {"logits": checked_logits(model, idx, lengths)[0]}
    named = dict(model.named_parameters())
    recipe = model.__dict__.get("recipe")
    if recipe is not None or getattr(model, "fused_loss", False):
        with torch.no_grad(), ctx:
            logits, positions = checked_logits(model, idx, lengths)
        only = torch.full_like(targets, -100).flatten()  # the checked positions' targets alone
        only[positions] = targets.flatten()[positions.to(idx.device)]
        only = only.view_as(targets)
        with ctx:
            if recipe is not None:
                loss = recipe(idx, only)
            elif lengths is not None:  # hf-gptfast on the padded batch, with its mask
                loss = model.loss(idx, only, right_padding(lengths, idx.shape[1], idx.device))
            else:
                loss = model.loss(idx[:CHECKED], targets[:CHECKED])
    else:
        with ctx:
            logits, positions = checked_logits(model, idx, lengths)
        loss = F.cross_entropy(logits.float(), targets.flatten()[positions.to(idx.device)])
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    if hasattr(model, "to_chapter"):
        grads = model.to_chapter(grads)
    flat = torch.cat([grads[name].flatten() for name in sorted(grads)])
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": flat}


def check(model, cfg, idx, targets, mode, amp=True, dtype=torch.bfloat16, lengths=None):
    """``model`` on the whole batch vs the chapter model (same dtype, then float64) on the
    checked rows (each at its own length, given ``lengths``)."""
    vals = values(model, idx, targets, mode, amp, lengths)
    base = chapter_model(cfg, idx.device)
    sub = (idx, targets) if lengths else (idx[:CHECKED], targets[:CHECKED])
    eager = values(base, *sub, mode, amp, lengths)
    ref = values(base.double(), *sub, mode, False, lengths)
    return compare(vals, eager, ref, dtype)


def training_loss(model, idx, targets, amp, mask=None):
    """The loss a training step backpropagates: a ``triton-recipe``/``-graphs`` model's compiled loss, a
    ``triton-loss`` or ``hf-gptfast`` model's ``model.loss``, else cross-entropy of the fp32
    logits (``mask``: a padded batch's attention mask, Hugging Face providers). The model runs
    under ``amp``."""
    with amp:
        recipe = model.__dict__.get("recipe")
        if recipe is not None:
            return recipe(idx, targets)
        if getattr(model, "fused_loss", False):  # a mask only for Hugging Face providers
            return model.loss(idx, targets) if mask is None else model.loss(idx, targets, mask)
        logits = model(idx) if mask is None else model(idx, mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def check_dropout(model, idx, targets, amp=True):
    """A dropout case's check (see the module docstring): two losses of the batch from the
    training step's graph differ, and the first and its gradients are finite. Returns
    ``compare``'s ``ok`` as None: no elementwise agreement was measured."""
    ctx = torch.autocast(idx.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    loss = training_loss(model, idx, targets, ctx)
    again = training_loss(model, idx, targets, ctx).detach()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
    if not finite or torch.equal(loss.detach(), again):
        pytest.fail(f"dropout case: loss {loss.item()} then {again.item()} on the same batch "
                    f"({'equal: no dropout ran' if finite else 'not finite'})")
    return {"ok": None}


def step_fn(model, idx, targets, mode, mask=None):
    """The callable a case times: an inference forward, or a whole training step (its loss from
    ``training_loss``). ``mask``: a padded batch's attention mask (Hugging Face providers),
    whose padding the loss skips."""
    amp = torch.autocast(idx.device.type, dtype=torch.bfloat16)
    args = () if mask is None else (mask,)
    if mask is not None:
        targets = targets.masked_fill(mask == 0, -100)
    if mode == "fwd":

        def forward():
            with torch.no_grad(), amp:
                return model(idx, *args)

        return forward
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=idx.is_cuda)

    def train_step():
        training_loss(model, idx, targets, amp, mask).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train_step


def annotate(benchmark, record, tokens, peak_bytes):
    """Add tokens/s, MFU and peak memory to a record written by run_gpu_case."""
    ms = record.get("ms")
    record.update(
        tokens_per_s=tokens / ms * 1e3 if ms else None,
        mfu=record.get("pct_limit"),
        peak_gib=peak_bytes / 2**30 if peak_bytes is not None else None,
    )
    benchmark.extra_info.update(record)


def test_model(benchmark, case, device_limits, device):
    p = case.params
    cfg, B, T = config(p["config"], p.get("dropout", 0.0)), p["B"], p["T"]
    model = build(case.provider, cfg, device)
    g = torch.Generator(device=device).manual_seed(0)
    idx, targets = (
        torch.randint(0, cfg["vocab_size"], (B, T), generator=g, device=device) for _ in range(2)
    )
    lengths = padded_lengths(B, T) if case.op == PADDED else None
    mask = right_padding(lengths, T, device) if lengths else None
    peak = {}

    def timed(name):
        if name != case.provider:  # the baseline, when it was not run before this case
            return step_fn(build(name, cfg, device), idx, targets, case.mode, mask)
        fn = step_fn(model, idx, targets, case.mode, mask)
        peak["bytes"] = peak_memory(fn)
        return fn

    n = matmul_params(cfg)
    flops = sum(model_flops_per_token(n, cfg["n_layers"], cfg["emb_dim"], t, case.mode) * t
                for t in (lengths or [T] * B))
    written = len(RECORDS)
    try:
        run_gpu_case(
            benchmark,
            case,
            timed=timed,
            check=(lambda: check_dropout(model, idx, targets)) if p.get("dropout") else
            (lambda: check(model, cfg, idx, targets, case.mode, lengths=lengths)),
            metric="TFLOP/s",
            amount=flops,
        )
    finally:  # also when our provider's agreement failed the case after recording it
        if len(RECORDS) > written:
            annotate(benchmark, RECORDS[-1], sum(lengths or [T] * B), peak.get("bytes"))


TINY = {"vocab_size": 97, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2}


@INTERPRETER_ONLY
def test_model_padded_interpreter(benchmark):
    """hf-gptfast on a tiny right-padded batch (3 x 15, lengths 25%..100%) in fp32: logits of
    the first two rows' real tokens and their loss's gradients, against the chapter model run
    on each row alone, under the Triton interpreter on CPU."""
    provider = "hf-gptfast"
    tiny = {**config("124M"), **TINY}
    model = build(provider, tiny, "cpu")
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, 97, (3, 15), generator=g) for _ in range(2))
    lengths = padded_lengths(3, 15)
    case = Case(PADDED, provider, "tiny B3 T15 padded", {"B": 3, "T": 15, "config": "tiny"},
                "fp32", "train", ours=True)
    run_interpreter_case(
        benchmark,
        case,
        run=lambda: values(model, idx, targets, "train", False, lengths),
        check=lambda vals: compare(
            vals,
            *(values(m, idx, targets, "train", False, lengths)
              for m in (chapter_model(tiny, "cpu"), chapter_model(tiny, "cpu").double())),
            torch.float32,
        ),
    )


@INTERPRETER_ONLY
@pytest.mark.parametrize("provider", ["triton", "triton-loss", "triton-recipe", "hf-gptfast"])
def test_model_interpreter(benchmark, provider):
    """A tiny GPT (2 layers, head dim 16, odd length) in fp32, training-step gradients of the
    first two of three sequences, under the Triton interpreter on CPU (triton-recipe compiled
    with AOTAutograd alone: Inductor's CPU compile would take longer than the rest of the file;
    tests/test_compile_loss.py runs the recipe through Inductor)."""
    tiny = {**config("124M"), **TINY}
    model = build(provider, tiny, "cpu")
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, 97, (3, 23), generator=g) for _ in range(2))
    case = Case(OP, provider, "tiny B3 T23", {"B": 3, "T": 23, "config": "tiny"}, "fp32", "train")
    run_interpreter_case(
        benchmark,
        case,
        run=lambda: values(model, idx, targets, "train", amp=False),
        check=lambda vals: compare(
            vals,
            *(values(m, idx[:CHECKED], targets[:CHECKED], "train", amp=False)
              for m in (chapter_model(tiny, "cpu"), chapter_model(tiny, "cpu").double())),
            torch.float32,
        ),
    )


@INTERPRETER_ONLY
def test_model_dropout_interpreter(benchmark):
    """The dropout case's check on a tiny GPT with dropout 0.1, fp32, under the Triton
    interpreter on CPU (triton: eager; tests/test_compile_loss.py compiles the recipe with
    dropout)."""
    provider, tiny = "triton", {**config("124M", DROPOUT), **TINY}
    model = build(provider, tiny, "cpu")
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, 97, (2, 9), generator=g) for _ in range(2))
    case = Case(OP, provider, f"tiny B2 T9 dropout {DROPOUT}",
                {"B": 2, "T": 9, "config": "tiny", "dropout": DROPOUT}, "fp32", "train",
                ours=True)
    run_interpreter_case(benchmark, case, run=lambda: check_dropout(model, idx, targets, amp=False),
                         check=lambda checked: checked)
