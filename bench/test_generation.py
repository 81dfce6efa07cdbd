"""Greedy generation: gptfast's KV-cache decoding vs the chapter's uncached loop, in tokens/s.

GPT-2 124M and 355M (random weights, dropout 0) cast to bf16 with ``model.to(torch.bfloat16)``
(weights and KV cache in bf16, no autocast), batch 1 and 8, a 16-token prompt, 256 new tokens.
Providers, side by side on the same weights:

  uncached         the chapter's ``generate_text_simple`` (kernels="torch"): each step re-runs
                   the whole sequence (the speedup baseline)
  kv-torch         ``generate(use_cache=True, cuda_graph=False)``, kernels="torch": a
                   plain-PyTorch KV cache
  kv-triton        the same with kernels="triton": flash-attention prefill, split-K decode
                   attention, fused LayerNorms
  kv-triton-graph  kv-triton with each decode step replayed as a CUDA graph (generate's default
                   on CUDA)

Timing: one sample is a whole ``generate()`` call, what a caller waits for (prefill, 256 steps,
cache allocation and graph capture included). One warm-up call (compiles the kernels; its
tokens are the ones checked), then 1-3 rounds of one call (3 for calls up to 1 s, 2 up to 1.5 s,
else 1, judged from the warm-up, an upper bound), each timed with CUDA events and with
pytest-benchmark's synchronising timer; medians. No ``do_bench``: a call takes from a tenth of a
second to seconds, and do_bench would repeat it dozens of times.

Bandwidth: decoding reads every weight once per step plus the KV cache. Bytes per step =
``decode_step_bytes``: the weights that multiply each token (all but the token and position
embedding tables, of which a step reads one row per sequence) in bf16, plus keys and values of
the mean cache length over the decode steps (prompt + new/2), x the steps per second (new tokens
/ call time: prefill and capture count against it, so this is a lower bound), as a fraction of
the copy bandwidth measured in this run. The same byte count for every provider, so the
uncached loop's number is an effective bandwidth.

Agreement: greedy tokens of two correct bf16 implementations may part at near-ties, so on the
GPU the check is teacher-forced: the generated sequence is run once through the model in
float64 (the same bf16 weights), and each new token's deficit (max logit - the chosen token's
logit) is taken. A provider within 2x eager's logit error (the 2x rule) chooses tokens within
twice its error of the best, so the bound is 4 x eager bf16's max logit error on the same
sequence + one bf16 ulp of the largest logit. '= uncached' counts the leading new tokens that
equal the uncached loop's in every row (information, not a check).

CPU: a tiny fp32 model with kernels="triton" under the Triton interpreter, whose cached greedy
tokens must equal the chapter loop's; and plain PyTorch timed on the CPU (fp32, 4 layers, width
256, vocabulary 4096, batch 1, 16-token prompt, 64 new tokens, one thread: on a busy machine
more threads than free cores swamp the difference): kv-torch vs uncached, same tokens, the gain
recorded in the CPU summary.
"""

import copy
import statistics
import time

import pytest
import torch

from bench._metrics import decode_step_bytes
from bench._providers import optional, require_model_kernels
from bench._runner import BENCH_MARK, INTERPRETER_ONLY, LIMITS, RECORDS, Case
from gptfast.kernels.testing import max_err

pytestmark = BENCH_MARK

OP = "generation"
SIZES = ("124M", "355M")
BATCHES = (1, 8)
PROMPT, NEW = 16, 256
PROVIDERS = ("uncached", "kv-torch", "kv-triton", "kv-triton-graph")  # the baseline first
BASELINE = "uncached"
KERNELS = {"uncached": "torch", "kv-torch": "torch", "kv-triton": "triton",
           "kv-triton-graph": "triton"}
ROUNDS_S = 3.0  # rounds of one call: as many (1-3) as fit in about this long
CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA run: generation is timed on the GPU"
)
CPU_CFG = {"vocab_size": 4096, "context_length": 128, "emb_dim": 256, "n_heads": 4,
           "n_layers": 4, "drop_rate": 0.0, "qkv_bias": False}
CPU_NEW = 64
BASE_MS: dict[tuple, float] = {}  # case key -> the uncached loop's ms
BASE_TOKENS: dict[tuple, torch.Tensor] = {}  # case key -> the uncached loop's tokens


def gpu_cases(quick: bool) -> list[Case]:
    return [
        Case(OP, p, f"{size} B{B} prompt{PROMPT} new{NEW}",
             {"config": size, "B": B, "prompt": PROMPT, "new": NEW}, "bf16", "greedy",
             ours=p != BASELINE)
        for size in (SIZES[:1] if quick else SIZES)
        for B in BATCHES
        for p in PROVIDERS
    ]


def model_for(cfg, provider, device, dtype):
    """The seeded model in ``dtype`` (weights, and so the KV cache), eval mode, the provider's
    kernels."""
    GPTModel = optional("gptfast", "GPTModel", "gptfast is not available yet")
    if KERNELS[provider] == "triton":
        require_model_kernels()
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTModel(cfg, kernels=KERNELS[provider])
    return model.to(dtype).eval()


def generation(provider, model, prompt, new):
    """The zero-argument call a case times; returns (batch, prompt + new) token ids."""
    if provider == BASELINE:
        simple = optional("gptfast", "generate_text_simple")
        return lambda: simple(model, prompt, new, model.cfg["context_length"])
    generate, graph = optional("gptfast", "generate"), provider.endswith("-graph")
    return lambda: generate(model, prompt, new, use_cache=True, cuda_graph=graph)


def step_bytes(model, B, prompt_len, new) -> int:
    """``decode_step_bytes`` of ``model`` at the mean cache length of the decode steps, with the
    weights a step multiplies by: all but the embedding tables."""
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if name not in ("tok_emb.weight", "pos_emb.weight"))
    cfg, e = model.cfg, model.tok_emb.weight.element_size()
    return decode_step_bytes(weights, cfg["n_layers"], B, cfg["emb_dim"], prompt_len + new // 2, e)


def check_tokens(model, tokens, prompt_len, expected=None) -> dict:
    """Teacher-forced check of greedy ``tokens`` (see the module docstring), with ``expected``:
    also token for token equality. The dict has compare()'s fields."""
    dtype = model.tok_emb.weight.dtype
    eager = copy.deepcopy(model).use_kernels("torch")
    seq, chosen = tokens[:, :-1], tokens[:, prompt_len:]  # logits at prompt_len-1.. chose them
    with torch.no_grad():
        eager_logits = eager(seq)[:, prompt_len - 1:]
        ref = eager.double()(seq)[:, prompt_len - 1:]
    del eager
    best = ref.max(dim=-1).values
    deficit = (best - ref.gather(-1, chosen[..., None]).squeeze(-1)).max().item()
    eager_err = max_err(eager_logits, ref)
    bound = 4 * eager_err + torch.finfo(dtype).eps * ref.abs().max().item()
    equal = expected is None or torch.equal(tokens, expected)
    return {"ok": deficit <= bound and equal, "tokens_equal": equal,  # False for a NaN deficit
            "worst": "deficit", "err": deficit, "eager_err": eager_err, "bound": bound,
            "vs_eager": None}


def same_prefix(tokens, base, prompt_len) -> int:
    """Leading new tokens equal to ``base``'s in every row."""
    differ = (tokens[:, prompt_len:] != base[:, prompt_len:]).any(dim=0)
    return int(differ.nonzero()[0, 0]) if differ.any() else differ.numel()


def rounds_for(seconds: float) -> int:
    return max(1, min(3, int(ROUNDS_S / max(seconds, 1e-9))))


def timed_rounds(benchmark, fn, rounds, cuda) -> tuple[float | None, float | None]:
    """(CUDA-event ms, wall ms) medians of ``rounds`` calls of ``fn``, one call per round of
    pytest-benchmark's loop (synchronising timer); events only on CUDA."""
    events = []

    def call():
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            events.append((start, end))
        else:
            fn()

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    if cuda:
        torch.cuda.synchronize()
    stats = getattr(benchmark, "stats", None)
    ms_wall = stats.stats.median * 1e3 if stats else None
    ms = statistics.median(s.elapsed_time(e) for s, e in events) if events else None
    return ms, ms_wall


def warm_up(fn, cuda) -> tuple[torch.Tensor, float]:
    """One call: its tokens and its wall time in seconds."""
    start = time.perf_counter()
    tokens = fn()
    if cuda:
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def record(benchmark, case, ms, ms_wall, amount, agreed, same, base_ms):
    """Append a record of this case to the summary and fail if our provider disagrees."""
    p, limit = case.params, LIMITS.get("copy_gbps")
    ms_tok = ms if ms is not None else ms_wall
    value = amount / ms_tok / 1e6 if amount is not None else None
    rec = {
        "op": case.op, "provider": case.provider, "shape": case.shape, "params": dict(p),
        "dtype": case.dtype, "mode": case.mode, "ours": case.ours, "metric": "GB/s",
        "amount": amount, "ms": ms, "ms_wall": ms_wall,
        "wall_over_events": ms_wall / ms if ms and ms_wall else None,
        # no amount: an interpreter case, whose time says nothing about speed
        "tokens_per_s": p["B"] * p["new"] / ms_tok * 1e3 if amount is not None else None,
        "value": value, "pct_limit": 100 * value / limit if limit else None,
        "speedup": base_ms / ms_tok if base_ms else None,
        "same_tokens": same, "agrees": agreed["ok"],
        **{k: agreed[k] for k in ("err", "eager_err", "bound", "vs_eager", "worst")},
    }
    benchmark.group = " ".join(case.key)
    benchmark.extra_info.update(rec)
    RECORDS.append(rec)
    if case.ours and not agreed["ok"]:
        differ = "" if agreed["tokens_equal"] else "; tokens differ from the chapter loop's"
        pytest.fail(
            f"{case}: a greedy token is {agreed['err']:.3e} below the float64 model's best "
            f"logit, over 4 x eager's logit error {agreed['eager_err']:.3e} + slack = "
            f"{agreed['bound']:.3e}{differ}"
        )


def measure(provider, cfg, prompt, cuda, benchmark=None):
    """(model, tokens, event ms, wall ms) of one provider. Without ``benchmark`` (a baseline
    not run before), one more call timed by the wall clock and no event time."""
    model = model_for(cfg, provider, prompt.device, torch.bfloat16 if cuda else torch.float32)
    new = NEW if cuda else CPU_NEW
    fn = generation(provider, model, prompt, new)
    tokens, seconds = warm_up(fn, cuda)
    if benchmark is None:
        _, seconds = warm_up(fn, cuda)
        return model, tokens, None, seconds * 1e3
    ms, ms_wall = timed_rounds(benchmark, fn, rounds_for(seconds), cuda)
    return model, tokens, ms, ms_wall


def baseline(case, ms, tokens, cfg, prompt, cuda) -> tuple[float, torch.Tensor]:
    """(ms, tokens) of the uncached loop for this case's shape: this case's own when it is the
    baseline, else those recorded when it ran (or of one call made now, if it did not run)."""
    if case.provider == BASELINE:
        BASE_MS[case.key], BASE_TOKENS[case.key] = ms, tokens
    elif case.key not in BASE_MS:
        _, BASE_TOKENS[case.key], _, BASE_MS[case.key] = measure(BASELINE, cfg, prompt, cuda)
    return BASE_MS[case.key], BASE_TOKENS[case.key]


def test_generation(benchmark, case, device_limits, device):
    p = case.params
    get_config = optional("gptfast", "get_config", "gptfast is not available yet")
    cfg = {**get_config(p["config"]), "drop_rate": 0.0}
    g = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (p["B"], PROMPT), generator=g, device=device)
    model, tokens, ms, ms_wall = measure(case.provider, cfg, prompt, True, benchmark)
    agreed = check_tokens(model, tokens, PROMPT)
    base_ms, base_tokens = baseline(case, ms, tokens, cfg, prompt, True)
    amount = step_bytes(model, p["B"], PROMPT, NEW) * NEW
    record(benchmark, case, ms, ms_wall, amount, agreed, same_prefix(tokens, base_tokens, PROMPT),
           base_ms)


@INTERPRETER_ONLY
def test_generation_interpreter(benchmark):
    """Cached greedy decoding of a tiny fp32 model with kernels="triton" (prefill, decode
    attention, fused LayerNorms in the interpreter) gives the chapter loop's tokens."""
    get_config = optional("gptfast", "get_config", "gptfast is not available yet")
    tiny = {**get_config("124M"), "vocab_size": 97, "context_length": 32, "emb_dim": 64,
            "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}
    prompt_len, new = 5, 6
    prompt = torch.randint(0, 97, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    model = model_for(tiny, "kv-triton", "cpu", torch.float32)
    chapter = generation(BASELINE, copy.deepcopy(model).use_kernels("torch"), prompt, new)()
    case = Case(OP, "kv-triton", f"tiny B2 prompt{prompt_len} new{new}",
                {"config": "tiny", "B": 2, "prompt": prompt_len, "new": new}, "fp32", "greedy")
    benchmark.group = " ".join(case.key)
    tokens = benchmark.pedantic(generation("kv-triton", model, prompt, new), rounds=1)
    agreed = check_tokens(model, tokens, prompt_len, expected=chapter)
    stats = getattr(benchmark, "stats", None)
    ms_wall = stats.stats.median * 1e3 if stats else None
    record(benchmark, case, None, ms_wall, None, agreed, same_prefix(tokens, chapter, prompt_len),
           None)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@CPU_ONLY
@pytest.mark.parametrize("provider", [BASELINE, "kv-torch"])
def test_generation_cpu(benchmark, provider, one_thread):
    """Plain PyTorch on the CPU: the KV cache's gain over the chapter loop, same tokens."""
    prompt = torch.randint(0, CPU_CFG["vocab_size"], (1, PROMPT),
                           generator=torch.Generator().manual_seed(0))
    params = {"config": "cpu", "B": 1, "prompt": PROMPT, "new": CPU_NEW}
    case = Case(OP, provider, f"cpu L4 d256 B1 prompt{PROMPT} new{CPU_NEW}", params, "fp32",
                "greedy", ours=provider != BASELINE)
    model, tokens, _, ms_wall = measure(provider, CPU_CFG, prompt, False, benchmark)
    base_ms, expected = baseline(case, ms_wall, tokens, CPU_CFG, prompt, False)
    agreed = check_tokens(model, tokens, PROMPT, expected=expected)
    amount = step_bytes(model, 1, PROMPT, CPU_NEW) * CPU_NEW
    record(benchmark, case, None, ms_wall, amount, agreed, same_prefix(tokens, expected, PROMPT),
           base_ms)
