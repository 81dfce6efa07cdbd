"""Running one benchmark case: agreement check, warm-up, two timers, one record.

GPU case (``run_gpu_case``):
  1. agreement: the provider's outputs (and gradients, for modes with a backward) against a
     float64 reference, next to eager PyTorch's in the same dtype (gptfast.kernels.testing, 2x rule);
  2. warm-up call outside any timed region (Triton autotuning, torch.compile);
  3. CUDA-event timing with ``triton.testing.do_bench`` (median, L2 flushed between calls);
  4. pytest-benchmark's ``pedantic`` loop timed with ``sync_timer`` (synchronise + perf_counter
     at both ends of a round of back-to-back calls, so launch and sync overhead are amortised);
  5. a record (bench/_report.py) in ``RECORDS`` and in ``benchmark.extra_info``.
Throughput, % of the device limit and speedup over eager use the CUDA-event time. A case of
our own kernels whose agreement breaks the 2x rule fails (after it is recorded); third-party
providers are recorded with ``agrees: False`` and flagged in the summary instead. A check may
return ``{"ok": None}`` alone where no elementwise agreement can be measured (the model's
dropout cases, which fail in their check instead): recorded with ``agrees: None``.

Interpreter case (``run_interpreter_case``, CPU without CUDA): one call timed once, agreement
recorded and asserted the same way.
"""

import math

import pytest
import torch

from bench._metrics import sync_timer
from gptfast.kernels.testing import agreement, max_err

RECORDS: list[dict] = []  # every case of this session, for the summary
LIMITS: dict = {}  # device limits measured this session (empty without CUDA)
EAGER_MS: dict[tuple, float] = {}  # (op, shape, dtype, mode) -> baseline's CUDA-event ms
BASELINE = {"model": "torch", "model_padded": "hf-sdpa"}  # each op's speedup baseline
BENCH_MARK = pytest.mark.benchmark(timer=sync_timer)

ROUND_MS = 2.0  # a pedantic round lasts at least this long (many launches per sync)
LOOP_MS = 100.0  # and all rounds together about this long
WARMUP_MS, REP_MS = 25, 100  # do_bench's warm-up and measuring time

GPU_ONLY = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU timing cases skip (interpreter agreement cases run instead)",
)
INTERPRETER_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CUDA run: every timing case checks agreement at its own shape",
)


def baseline(op: str) -> str:
    return BASELINE.get(op, "eager")


class Case:
    """One op x shape x dtype x mode x provider. ``params`` holds the shape's numbers."""

    def __init__(self, op, provider, shape, params, dtype, mode, ours=None):
        self.op, self.provider, self.shape, self.params = op, provider, shape, params
        self.dtype, self.mode = dtype, mode
        self.ours = provider == "triton" if ours is None else ours

    @property
    def key(self):
        return (self.op, self.shape, self.dtype, self.mode)

    @property
    def id(self):
        return "-".join([self.shape.replace(" ", "-"), self.dtype, self.mode, self.provider])

    def __repr__(self):
        return f"Case({self.op} {self.id})"


def param(case: Case, marks=()):
    return pytest.param(case, id=case.id, marks=marks)


# --- numerics -------------------------------------------------------------------------------


def evaluate(forward, inputs, in_names, out_names, grad_outputs=None) -> dict:
    """``forward(*inputs)``'s outputs by name and, given ``grad_outputs`` (one per output),
    the gradients of the inputs, named 'd' + input name."""
    with_grad = grad_outputs is not None
    leaves = [t.detach().requires_grad_(with_grad) for t in inputs]
    with torch.set_grad_enabled(with_grad):
        outs = forward(*leaves)
    vals = {name: o.detach() for name, o in zip(out_names, outs)}
    if with_grad:
        grads = torch.autograd.grad(outs, leaves, grad_outputs)
        vals.update({"d" + name: g for name, g in zip(in_names, grads)})
    return vals


def check_against_eager(values: dict, eager, inputs, in_names, out_names, grads, dtype) -> dict:
    """``compare`` a provider's ``values`` with ``eager`` run on ``inputs`` in their dtype and
    in float64 (the reference), with the same upstream ``grads`` (None: forward only)."""
    eager_vals = evaluate(eager, inputs, in_names, out_names, grads)
    ref = evaluate(eager, [t.double() for t in inputs], in_names, out_names,
                   grads and [g.double() for g in grads])
    return compare(values, eager_vals, ref, dtype)


def compare(vals: dict, eager: dict, ref: dict, dtype: torch.dtype) -> dict:
    """2x-eager rule on each named value, with an absolute slack of one unit in the last place
    of ``dtype`` at the reference's largest magnitude. Returns the worst value's numbers; each
    value's also carry ``vs_eager``, its max difference from eager's."""
    per = {}
    for name, r in ref.items():
        atol = torch.finfo(dtype).eps * r.abs().max().item()
        per[name] = agreement(vals[name], eager[name], r, factor=2.0, atol=atol)
        per[name]["vs_eager"] = max_err(vals[name], eager[name])

    def badness(name):
        a = per[name]
        if not a["ok"]:
            return math.inf
        return a["err"] / a["bound"] if a["bound"] > 0 else 0.0

    worst = max(per, key=badness)
    return {
        "ok": all(a["ok"] for a in per.values()),
        "worst": worst,
        **{k: per[worst][k] for k in ("err", "eager_err", "bound", "vs_eager")},
        "outputs": per,
    }


# --- timing ---------------------------------------------------------------------------------


def mode_fn(forward, inputs, grad_outputs, mode):
    """The callable a case times: forward only (no autograd graph), backward only (through a
    graph built once, kept with retain_graph) or forward and backward."""
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return forward(*inputs)

        return fn
    leaves = [t.detach().requires_grad_() for t in inputs]
    if mode == "bwd":
        outs = forward(*leaves)
        return lambda: torch.autograd.grad(outs, leaves, grad_outputs, retain_graph=True)
    return lambda: torch.autograd.grad(forward(*leaves), leaves, grad_outputs)


def do_bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def loop_plan(ms_hint: float) -> tuple[int, int]:
    """(rounds, iterations) for pedantic: rounds of >= ROUND_MS, about LOOP_MS in all."""
    ms_hint = max(ms_hint, 1e-4)
    iterations = int(min(1000, max(1, math.ceil(ROUND_MS / ms_hint))))
    rounds = int(min(50, max(5, math.ceil(LOOP_MS / (iterations * ms_hint)))))
    return rounds, iterations


def time_loop(benchmark, fn, ms_hint) -> float | None:
    rounds, iterations = loop_plan(ms_hint)
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median * 1e3 if stats else None


def measure_limits() -> dict:
    """Copy bandwidth (1 GiB device-to-device, bytes read + written) and bf16 matmul
    throughput (8192^3), measured with CUDA events on this device in this run."""
    src = torch.ones(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    ms = do_bench_ms(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    ms = do_bench_ms(lambda: torch.matmul(a, b, out=c))
    return {"copy_gbps": copy_gbps, "matmul_tflops": 2 * n**3 / ms / 1e9}


def _record(case, metric=None, amount=None, **fields) -> dict:
    return {
        "op": case.op,
        "provider": case.provider,
        "shape": case.shape,
        "params": dict(case.params),
        "dtype": case.dtype,
        "mode": case.mode,
        "ours": case.ours,
        "metric": metric,
        "amount": amount,
        **fields,
    }


def _finish(benchmark, case, record, agreed):
    benchmark.extra_info.update(record)
    RECORDS.append(record)
    if case.ours and agreed["ok"] is False:
        pytest.fail(
            f"{case}: {agreed['worst']} max error {agreed['err']:.3e} exceeds 2 x eager error "
            f"{agreed['eager_err']:.3e} + slack = {agreed['bound']:.3e} (or is not finite)"
        )


def run_gpu_case(benchmark, case, *, timed, check, metric, amount):
    """Measure one GPU case. ``timed(provider)`` builds the zero-argument callable to time
    (for this case's inputs and mode); ``check()`` returns ``compare(...)``'s dict; ``amount``
    is the bytes (metric 'GB/s') or FLOPs (metric 'TFLOP/s') one call must do."""
    agreed = check()
    fn = timed(case.provider)
    fn()  # warm-up: autotuning, torch.compile, cuBLAS handles
    torch.cuda.synchronize()
    ms = do_bench_ms(fn)
    benchmark.group = " ".join(case.key)
    ms_wall = time_loop(benchmark, fn, ms)
    del fn
    base = baseline(case.op)
    if case.provider == base:
        EAGER_MS[case.key] = ms
    elif case.key not in EAGER_MS:  # baseline not run (filtered out): time it here
        efn = timed(base)
        efn()
        EAGER_MS[case.key] = do_bench_ms(efn)
        del efn
    value = amount / ms / (1e6 if metric == "GB/s" else 1e9)
    limit = LIMITS.get("copy_gbps" if metric == "GB/s" else "matmul_tflops")
    record = _record(
        case,
        metric,
        amount,
        ms=ms,
        ms_wall=ms_wall,
        wall_over_events=ms_wall / ms if ms_wall else None,
        value=value,
        pct_limit=100 * value / limit if limit else None,
        speedup=EAGER_MS[case.key] / ms,
        agrees=agreed["ok"],
        **{k: agreed.get(k) for k in ("err", "eager_err", "bound", "vs_eager", "worst")},
        outputs=agreed.get("outputs"),
    )
    _finish(benchmark, case, record, agreed)


def run_interpreter_case(benchmark, case, *, run, check):
    """One agreement case on CPU: ``run()`` (the provider's evaluation, timed once) returns the
    values that ``check(values)`` compares, returning ``compare(...)``'s dict."""
    benchmark.group = " ".join(case.key)
    vals = benchmark.pedantic(run, rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    agreed = check(vals)
    record = _record(
        case,
        ms=None,
        ms_wall=stats.stats.median * 1e3 if stats else None,
        agrees=agreed["ok"],
        **{k: agreed.get(k) for k in ("err", "eager_err", "bound", "vs_eager", "worst")},
        outputs=agreed.get("outputs"),
    )
    _finish(benchmark, case, record, agreed)
