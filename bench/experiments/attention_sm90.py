"""One side-by-side run of the Hopper attention variants, the generic kernels and SDPA's backends.

    PYTHONPATH=. python -m bench.experiments.attention_sm90 --out $OUT      # on an H100/H200
    TRITON_INTERPRET=1 python -m bench.experiments.attention_sm90 --dry-run --out /tmp/x  # CPU

Shapes (bf16, causal, 12 heads, B x T = 16384 tokens): T = 1024, 2048, 4096 at head dims 64 and
128 without dropout, T = 1024 at both head dims with dropout 0.1, and the issue's training shape
B=8 T=1024 D=64 with dropout. Three phases:

1. Compile and check, in parallel worker processes (``--workers``): every config of the
   variants' spaces (``gptfast.kernels.attention_sm90.SPACE``) and the generic kernels run once
   at their class's first shape (which compiles them), then each variant config goes through
   the public op against float64 at one shape (B=4 H=4 T=1024; FlashAttention's 2x rule on the
   output and the three gradients, as the tests apply it). A config that fails, errs or kills
   its worker is left out of the timings (a crash would poison the main process's CUDA context).
   The one-pass backward (``bwd1``, whose programs wait on each other) runs there once at every
   timed shape of its class first: a hang (a broken dispatch-order assumption) ends at the
   worker timeout instead of hanging the timings.
2. Kernel timings: each kernel launched directly (no autograd), ``triton.testing.do_bench``
   medians (L2 cleared between calls): forward per FWD config, dQ (with the fused delta) per DQ
   config, dK/dV per DKDV config, the one-pass backward (its preprocess + kernel) per BWD1
   config, and the generic path's forward, preprocess + dQ and preprocess + dK/dV.
3. End to end, through the public ``attention`` (autograd, host overhead included, as a model
   sees it): generic, the fastest variants of phase 2 put in place with ``tuning.use`` (where
   they win; the two-launch pair and the one-pass backward each in place too), and SDPA's
   cuDNN, flash and default backends, forward and forward + backward.

Writes ``attention_sm90.md`` (the tables, printed last too) and ``attention_sm90.json`` (every
figure, the checks, the errors, and the tuning-table entries of the winners) under ``--out``.
Bound on the runtime: phase 1 spreads ~50 compiles over the workers with one timeout
(``--worker-timeout``, 150 s); phases 2 and 3 time ~250 calls at ``--warmup``/``--rep``
milliseconds each (10/40: ~0.1 s a call); past ``--budget`` seconds from the start (default 210)
the remaining rows are skipped and marked so. Expected on an H200: ~40 s of compiling, ~60 s of
timing.
"""

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._metrics import attention_flops
from gptfast.kernels import attention, tuning
from gptfast.kernels.attention import attention_dropout_mask, effective_dropout_p
from gptfast.kernels.testing import agreement

generic = sys.modules["gptfast.kernels.attention"]
sm90 = sys.modules["gptfast.kernels.attention_sm90"]
KERNELS = {"fwd": sm90.FWD, "dq": sm90.DQ, "dkdv": sm90.DKDV, "bwd1": sm90.BWD1}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BF16 = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    T: int
    D: int
    p: float

    @property
    def cls(self) -> str:
        return sm90.shape_class(BF16, 64 if self.D <= 64 else 128, self.p > 0)

    @property
    def name(self) -> str:
        return f"B{self.B} H{self.H} T{self.T} D{self.D}" + (f" p={self.p}" if self.p else "")


def shapes(dry: bool) -> list[Shape]:
    if dry:  # every class once, small: D=80 takes the d128 class
        return [Shape(1, 1, 72, 64, 0.0), Shape(1, 1, 72, 80, 0.0), Shape(1, 1, 72, 64, 0.1),
                Shape(1, 1, 72, 80, 0.1)]
    tokens, heads = 16384, 12
    out = [Shape(tokens // T, heads, T, D, 0.0) for D in (64, 128) for T in (1024, 2048, 4096)]
    out += [Shape(tokens // 1024, heads, 1024, D, 0.1) for D in (64, 128)]
    return out + [Shape(8, heads, 1024, 64, 0.1)]


def check_shape(cls: str, dry: bool) -> Shape:
    """The checks' shape: batch x heads a multiple of 16 like the timed shapes', so that the
    JIT specialises the kernels alike and the checks compile nothing new."""
    d = 64 if "-d64" in cls else (80 if dry else 128)
    p = 0.1 if cls.endswith("dropout") else 0.0
    return Shape(1, 1, 136, d, p) if dry else Shape(4, 4, 1024, d, p)


# ---- inputs and launches --------------------------------------------------------------------


class Inputs:
    """q, k, v, do as (B, T, H, D) memory seen as (B, H, T, D), as GPT-2's block makes them, and
    the generic forward's o, lse2 and delta (what the backward kernels read)."""

    def __init__(self, shape: Shape, seed: int = 0):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        B, H, T, D = shape.B, shape.H, shape.T, shape.D
        self.shape = shape
        self.q, self.k, self.v, self.do = (
            torch.randn(B, T, H, D, generator=g, device=DEVICE).to(BF16).transpose(1, 2)
            for _ in range(4))
        self.scale = D ** -0.5
        self.p = effective_dropout_p(shape.p)
        self.seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)  # in device memory
        self.block_d = generic._block_d(D)
        with tuning.use({}):
            self.o, self.lse2 = generic._forward(self.q, self.k, self.v, True, self.scale, self.p,
                                                 self.seed, None, None, False)
        self.dq, self.dk, self.dv = (torch.empty_like(t) for t in (self.q, self.k, self.v))
        self.delta = torch.empty_like(self.lse2)
        cfg = sm90.SPACE[sm90.DQ][shape.cls][0]
        sm90.backward_dq(cfg, self.do, self.q, self.k, self.v, self.o, self.lse2, self.dq, self.delta,
                         True, self.scale, self.seed, self.p, self.block_d)


def kernel_call(item: tuple, x: Inputs):
    """A no-argument function launching ``item`` once: ("fwd" | "dq" | "dkdv" | "bwd1", config) for a
    variant, ("generic", "fwd" | "bwd" | "dq" | "dkdv") for the generic path (its dq and dkdv
    each with the preprocess before them, bwd all three)."""
    kind, what = item
    a = (x.q, x.k, x.v)
    if kind == "generic":
        if what == "fwd":
            fn = lambda: generic._forward(*a, True, x.scale, x.p, x.seed, None, None, False)  # noqa: E731
        else:
            dq, dkdv = what in ("dq", "bwd"), what in ("dkdv", "bwd")
            fn = lambda: generic._backward(x.do, *a, x.o, x.lse2, True, x.scale, x.p, x.seed,  # noqa: E731
                                           None, None, False, dq, dkdv)
        return lambda: _no_plans(fn)
    if kind == "fwd":
        o, lse2 = torch.empty_like(x.o), torch.empty_like(x.lse2)
        return lambda: sm90.forward(what, *a, o, lse2, True, x.scale, x.seed, x.p, x.block_d)
    if kind == "dq":
        dq, delta = torch.empty_like(x.dq), torch.empty_like(x.delta)
        return lambda: sm90.backward_dq(what, x.do, *a, x.o, x.lse2, dq, delta, True, x.scale,
                                        x.seed, x.p, x.block_d)
    if kind == "bwd1":
        dq = torch.empty_like(x.dq)
        return lambda: sm90.backward1(what, x.do, *a, x.o, x.lse2, dq, x.dk, x.dv, True, x.scale,
                                      x.seed, x.p, x.block_d)
    return lambda: sm90.backward_dkdv(what, x.do, *a, x.lse2, x.delta, x.dk, x.dv, True, x.scale,
                                      x.seed, x.p, x.block_d)


def _no_plans(fn):
    with tuning.use({}):  # the generic kernels' static heuristics, whatever tables exist
        return fn()


def items(cls: str) -> list[tuple]:
    out = [("generic", w) for w in ("fwd", "bwd", "dq", "dkdv")]
    return out + [(kind, cfg) for kind, kernel in KERNELS.items() for cfg in sm90.SPACE[kernel][cls]]


def item_plans(cls: str, item: tuple) -> dict:
    """The plans that put a variant config in place for the public op: a DQ or DKDV config
    with the other backward kernel's first config (the backward takes both or neither); a BWD1
    config with both (it goes first; the pair serves a backward without dK)."""
    kind, cfg = item
    if kind == "fwd":
        return {sm90.FWD: {cls: cfg}}
    firsts = {k: {cls: sm90.SPACE[k][cls][0]} for k in (sm90.DQ, sm90.DKDV)}
    return firsts | {KERNELS[kind]: {cls: cfg}}


def label(item: tuple) -> str:
    kind, what = item
    return f"generic {what}" if kind == "generic" else f"{kind} {sm90._variant(what)}"


# ---- the 2x rule at one shape ---------------------------------------------------------------


def eager(q, k, v, keep, p):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    T = q.shape[-2]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    w = torch.softmax(s, dim=-1)
    if keep is not None:
        w = w * keep.to(w.dtype) / (1.0 - p)
    return w @ v


def outputs_and_grads(fn, leaves, do):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, do)]


def check(plans: dict, shape: Shape) -> dict:
    """The public op under ``plans`` vs float64, the flash rule per output (2x eager bf16's
    error plus one bf16 ulp of the reference's largest magnitude)."""
    x = Inputs(shape, seed=7)
    p = x.p
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    keep = None
    if p:  # the mask of the seed the op draws from the generator
        keep = attention_dropout_mask(generic.dropout_seed(gen()), shape.B, shape.H, shape.T,
                                      shape.T, p, device=DEVICE)

    def ours(q, k, v):
        return attention(q, k, v, causal=True, dropout_p=shape.p, generator=gen())

    leaves = (x.q, x.k, x.v)
    with tuning.use(plans):
        kernel = outputs_and_grads(ours, leaves, x.do)
    ref_fn = lambda q, k, v: eager(q, k, v, keep, p)  # noqa: E731
    eager_bf16 = outputs_and_grads(ref_fn, leaves, x.do)
    ref = outputs_and_grads(ref_fn, [t.double() for t in leaves], x.do.double())
    result = {}
    for name, a, e, r in zip(("o", "dq", "dk", "dv"), kernel, eager_bf16, ref):
        slack = torch.finfo(BF16).eps * max(r.abs().max().item(), 1.0)
        agree = agreement(a, e, r, atol=slack)
        result[name] = {"err": agree["err"], "bound": agree["bound"], "ok": agree["ok"]}
    result["ok"] = all(v["ok"] for v in result.values())
    return result


# ---- phase 1: compile and check in workers --------------------------------------------------


def worker(part: str, dry: bool) -> None:
    """Run (compiling) and check this worker's share of the items; one JSON line per item."""
    i, n = map(int, part.split("/"))
    todo = [(s.cls, item) for s in _first_shapes(dry) for item in items(s.cls)][i::n]
    inputs = {}
    for cls, item in todo:
        record = {"cls": cls, "item": label(item)}
        try:
            shape = next(s for s in _first_shapes(dry) if s.cls == cls)
            x = inputs.setdefault(cls, Inputs(shape))
            kernel_call(item, x)()
            if item[0] == "bwd1":  # every timed shape: a hang ends here, at the worker timeout
                for other in (s for s in shapes(dry) if s.cls == cls and s != shape):
                    kernel_call(item, Inputs(other))()
            _sync()
            if item[0] != "generic":
                record["check"] = check(item_plans(cls, item), check_shape(cls, dry))
            record["ok"] = item[0] == "generic" or record["check"]["ok"]
        except Exception as exc:  # reported: the main process leaves the item out
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        print(json.dumps(record), flush=True)


def _first_shapes(dry: bool) -> list[Shape]:
    """One shape per class: the first of ``shapes()``."""
    seen = {}
    for s in shapes(dry):
        seen.setdefault(s.cls, s)
    return list(seen.values())


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def run_workers(n: int, dry: bool, timeout: float) -> dict:
    """{(cls, label): record} from ``n`` worker processes; items of a worker that died or timed
    out without reporting them are recorded as not run."""
    cmd = [sys.executable, "-m", "bench.experiments.attention_sm90", *(["--dry-run"] if dry else [])]
    procs = [subprocess.Popen([*cmd, "--worker", f"{i}/{n}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    records, deadline = {}, time.monotonic() + timeout
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = f"timed out after {timeout:.0f} s\n{err}"
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                records[(r["cls"], r["item"])] = r
        todo = [(s.cls, label(item)) for s in _first_shapes(dry) for item in items(s.cls)][i::n]
        for key in todo:
            if key not in records:
                records[key] = {"cls": key[0], "item": key[1], "ok": False,
                                "error": f"worker {i} died before it (exit {proc.returncode}): {err[-400:]}"}
    return records


# ---- phases 2 and 3: timings ----------------------------------------------------------------


class Clock:
    """do_bench medians on CUDA (L2 cleared between calls); one timed call on CPU (dry run)."""

    def __init__(self, warmup: float, rep: float, budget: float):
        self.warmup, self.rep, self.end = warmup, rep, time.monotonic() + budget

    def ms(self, fn) -> float | str:
        if time.monotonic() > self.end:
            return "skipped (budget)"
        try:
            if CUDA:
                import triton

                return triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                               return_mode="median")
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
        except Exception as exc:  # the row records it; the others go on
            return f"error: {type(exc).__name__}: {str(exc)[:200]}"


def tflops(shape: Shape, mode: str, ms) -> float | None:
    if not isinstance(ms, float):
        return None
    return attention_flops(shape.B, shape.H, shape.T, shape.T, shape.D, True, mode) / ms / 1e9


def kernel_rows(clock: Clock, ok: dict, dry: bool) -> list[dict]:
    rows = []
    for shape in shapes(dry):
        x = Inputs(shape)
        for item in items(shape.cls):
            if not ok.get((shape.cls, label(item)), {}).get("ok"):
                continue
            ms = clock.ms(kernel_call(item, x))
            kind = item[1] if item[0] == "generic" else item[0]
            rows.append({"shape": shape.name, "cls": shape.cls, "kind": kind, "item": label(item),
                         "config": None if item[0] == "generic" else item[1], "ms": ms})
    return rows


def best_per_shape(rows: list[dict]) -> dict:
    """{(shape, kind): (ms, item)} of the fastest variant config of each kernel per shape."""
    best = {}
    for r in rows:
        if r["config"] is not None and isinstance(r["ms"], float):
            key = (r["shape"], r["kind"])
            if key not in best or r["ms"] < best[key][0]:
                best[key] = (r["ms"], r["item"])
    return best


def winners(rows: list[dict]) -> dict:
    """Per class, the variant config of each kernel with the least ms summed over the class's
    shapes, where it beats the generic kernel's sum (fwd against the generic forward; dq + dkdv
    against the generic backward's three launches; bwd1 against that and the dq + dkdv pair):
    {tuning kernel: {cls: config}}."""
    best = {}
    for cls in sorted({r["cls"] for r in rows}):
        mine = [r for r in rows if r["cls"] == cls]
        total = _totals(mine)
        fwd, dq, dkdv, bwd1 = (_fastest(total, kind) for kind in KERNELS)
        if fwd and fwd[0] < total.get(("fwd", "generic fwd"), math.inf):
            best.setdefault(sm90.FWD, {})[cls] = _config(mine, "fwd", fwd[1])
        generic_bwd = total.get(("bwd", "generic bwd"), math.inf)
        if dq and dkdv and dq[0] + dkdv[0] < generic_bwd:
            best.setdefault(sm90.DQ, {})[cls] = _config(mine, "dq", dq[1])
            best.setdefault(sm90.DKDV, {})[cls] = _config(mine, "dkdv", dkdv[1])
        pair = dq[0] + dkdv[0] if dq and dkdv else math.inf
        if bwd1 and bwd1[0] < min(pair, generic_bwd):
            best.setdefault(sm90.BWD1, {})[cls] = _config(mine, "bwd1", bwd1[1])
    return best


def fastest_configs(rows: list[dict]) -> dict:
    """{tuning kernel: {cls: config}}: each kernel's config of the least summed ms per class."""
    out = {}
    for cls in sorted({r["cls"] for r in rows}):
        mine = [r for r in rows if r["cls"] == cls]
        total = _totals(mine)
        for kind, kernel in KERNELS.items():
            if found := _fastest(total, kind):
                out.setdefault(kernel, {})[cls] = _config(mine, kind, found[1])
    return out


def _totals(rows: list[dict]) -> dict:
    """{(kind, item): ms summed over the shapes}, for the items measured at every shape."""
    n = len({r["shape"] for r in rows})
    runs = {}
    for r in rows:
        runs.setdefault((r["kind"], r["item"]), []).append(r["ms"])
    return {key: sum(ms) for key, ms in runs.items()
            if len(ms) == n and all(isinstance(t, float) for t in ms)}


def _fastest(total: dict, kind: str) -> tuple | None:
    """(ms, item) of the fastest variant of ``kind`` in ``total``, None if none was measured."""
    return min(((ms, item) for (k, item), ms in total.items()
                if k == kind and item != f"generic {kind}"), default=None)


def _config(rows: list[dict], kind: str, item: str) -> dict:
    return next(r["config"] for r in rows if (r["kind"], r["item"]) == (kind, item))


def sdpa(backend: str | None):
    """SDPA's forward with one backend (None: its default choice), causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}

    def run(q, k, v, p):
        with sdpa_kernel(names[backend]) if backend else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
    return run


def _ours(plans: dict):
    """The public op under ``plans`` ({}: the generic kernels)."""
    def run(q, k, v, p):
        with tuning.use(plans):
            return attention(q, k, v, causal=True, dropout_p=p)
    return run


def end_to_end_rows(clock: Clock, best: dict, fastest: dict, dry: bool) -> list[dict]:
    """``best``: the winners; ``fastest``: each kernel's fastest config per class, winner or
    not, for the rows of the two-launch pair and of the one-pass backward."""
    pair = {k: v for k, v in best.items() if k != sm90.BWD1}
    pair |= {k: fastest[k] for k in (sm90.DQ, sm90.DKDV) if k in fastest}
    one_pass = pair | ({sm90.BWD1: fastest[sm90.BWD1]} if sm90.BWD1 in fastest else {})
    providers = {"gptfast generic": _ours({}), "gptfast sm90 plans": _ours(best),
                 "gptfast sm90 pair": _ours(pair), "gptfast sm90 one-pass": _ours(one_pass),
                 "sdpa cudnn": sdpa("cudnn"), "sdpa flash": sdpa("flash"), "sdpa default": sdpa(None)}
    rows = []
    for shape in shapes(dry):
        x = Inputs(shape)
        leaves = [t.detach().requires_grad_() for t in (x.q, x.k, x.v)]
        for name, run in providers.items():
            fwd = lambda run=run, a=leaves, p=shape.p: run(*a, p)  # noqa: E731
            both = lambda fwd=fwd, a=leaves, do=x.do: torch.autograd.grad(fwd(), a, do)  # noqa: E731
            for mode, call in (("fwd", fwd), ("fwd+bwd", both)):
                ms = clock.ms(call)
                rows.append({"shape": shape.name, "provider": name, "mode": mode, "ms": ms,
                             "tflops": tflops(shape, mode, ms)})
    return rows


# ---- report ---------------------------------------------------------------------------------


def _cell(ms) -> str:
    """A time, or the start of what stood in its place (the JSON keeps all of it)."""
    return f"{ms:.4f}" if isinstance(ms, float) else " ".join(str(ms).split())[:60]


def markdown(checks: dict, krows: list[dict], erows: list[dict], best: dict, meta: dict) -> str:
    lines = [f"# Hopper attention variants: {meta['device']}", "",
             (f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, "
              f"{meta['seconds']:.0f} s. bf16, causal; ms are do_bench medians (L2 cleared)."), "",
             "## Checks (2x rule vs float64, one shape per class)", "",
             "| class | config | ok | worst err / bound | note |", "|---|---|---|--:|---|"]
    for (cls, item), r in sorted(checks.items()):
        c = r.get("check") or {}
        worst = max((v["err"] / v["bound"] for k, v in c.items() if k != "ok" and v["bound"]),
                    default=None)
        lines.append(f"| {cls} | {item} | {'yes' if r['ok'] else 'NO'} | "
                     f"{'-' if worst is None else f'{worst:.2f}'} | {' '.join(r.get('error', '').split())[:160]} |")
    lines += summary(krows, erows, meta["dry"])
    lines += ["", "## Kernels, launched directly (ms)", "",
              "| shape | kernel | config | ms | TFLOP/s |", "|---|---|---|--:|--:|"]
    for r in krows:
        shape = next(s for s in shapes(meta["dry"]) if s.name == r["shape"])
        mode = {"fwd": "fwd", "bwd": "bwd", "bwd1": "bwd"}.get(r["kind"])
        flops = f"{tflops(shape, mode, r['ms']):.0f}" if mode and isinstance(r["ms"], float) else "-"
        lines.append(f"| {r['shape']} | {r['kind']} | {r['item']} | {_cell(r['ms'])} | {flops} |")
    lines += ["", "## End to end through `attention` / SDPA (ms, TFLOP/s)", "",
              "| shape | mode | " + " | ".join(_providers(erows)) + " |",
              "|---|---|" + "--:|" * len(_providers(erows))]
    for shape in dict.fromkeys(r["shape"] for r in erows):
        for mode in ("fwd", "fwd+bwd"):
            cells = []
            for p in _providers(erows):
                r = next(r for r in erows if (r["shape"], r["mode"], r["provider"]) == (shape, mode, p))
                tf = f" ({r['tflops']:.0f})" if r["tflops"] else ""
                cells.append(_cell(r["ms"]) + tf)
            lines.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "## Winners (tuning-table entries: gptfast/kernels/configs/<device>.json)", "",
              "```json", json.dumps(best, indent=1, sort_keys=True), "```"]
    return "\n".join(lines)


def summary(krows: list[dict], erows: list[dict], dry: bool) -> list[str]:
    """Per shape, ms (TFLOP/s): the generic kernels and the fastest variant of each kernel at
    that shape (launched directly), and SDPA's cuDNN and flash backends (end to end)."""
    best = best_per_shape(krows)
    cols = ["fwd generic", "fwd variant", "bwd generic", "bwd variants (dq + dkdv)",
            "bwd one-pass", "fwd+bwd generic", "fwd+bwd variants", "cuDNN fwd", "cuDNN fwd+bwd",
            "flash fwd", "flash fwd+bwd"]
    lines = ["", "## Summary per shape: ms (TFLOP/s), kernels launched directly; SDPA end to end", "",
             "| shape | " + " | ".join(cols) + " |", "|---|" + "--:|" * len(cols)]
    for shape in shapes(dry):
        name = shape.name
        gen_fwd, gen_bwd = (_ms(krows, shape=name, item=f"generic {k}") for k in ("fwd", "bwd"))
        fwd = best.get((name, "fwd"), (None,))[0]
        bwd = _add(best.get((name, "dq"), (None,))[0], best.get((name, "dkdv"), (None,))[0])
        one_pass = best.get((name, "bwd1"), (None,))[0]
        either = min((t for t in (bwd, one_pass) if t is not None), default=None)
        values = [("fwd", gen_fwd), ("fwd", fwd), ("bwd", gen_bwd), ("bwd", bwd), ("bwd", one_pass),
                  ("fwd+bwd", _add(gen_fwd, gen_bwd)), ("fwd+bwd", _add(fwd, either))]
        values += [(mode, _ms(erows, shape=name, provider=f"sdpa {backend}", mode=mode))
                   for backend in ("cudnn", "flash") for mode in ("fwd", "fwd+bwd")]
        cells = ["-" if ms is None else f"{ms:.4f} ({tflops(shape, mode, ms):.0f})" for mode, ms in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _ms(rows: list[dict], **match) -> float | None:
    """The ms of the first row with the given fields, None if none has a time."""
    return next((r["ms"] for r in rows if isinstance(r["ms"], float)
                 and all(r[k] == v for k, v in match.items())), None)


def _add(*parts):
    return None if None in parts else sum(parts)


def _providers(erows):
    return list(dict.fromkeys(r["provider"] for r in erows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.experiments.attention_sm90",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="directory for attention_sm90.md/.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, on CPU under the interpreter")
    ap.add_argument("--workers", type=int, default=8, help="compile/check processes (default 8)")
    ap.add_argument("--worker-timeout", type=float, help="seconds (default 150; dry run 1200)")
    ap.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up ms (default 10)")
    ap.add_argument("--rep", type=float, default=40.0, help="do_bench measuring ms (default 40)")
    ap.add_argument("--budget", type=float,
                    help="seconds from the start before rows are skipped (default 210; dry run 1800)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not CUDA and not args.dry_run:
        ap.error("no CUDA device: pass --dry-run (with TRITON_INTERPRET=1) to check the plumbing")
    if args.worker:
        worker(args.worker, args.dry_run)
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    start = time.monotonic()
    timeout = args.worker_timeout or (1200.0 if args.dry_run else 150.0)
    budget = args.budget or (1800.0 if args.dry_run else 210.0)
    checks = run_workers(max(1, args.workers), args.dry_run, timeout)
    clock = Clock(args.warmup, args.rep, budget - (time.monotonic() - start))
    krows = kernel_rows(clock, checks, args.dry_run)
    best = winners(krows)
    erows = end_to_end_rows(clock, best, fastest_configs(krows), args.dry_run)
    meta = {"device": torch.cuda.get_device_name() if CUDA else "CPU (dry run, interpreter)",
            "torch": torch.__version__, "triton": _triton_version(), "commit": _commit(),
            "seconds": time.monotonic() - start, "dry": args.dry_run}
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(checks, krows, erows, best, meta)
    (args.out / "attention_sm90.md").write_text(text + "\n")
    blob = {"meta": meta, "shapes": [asdict(s) | {"cls": s.cls} for s in shapes(args.dry_run)],
            "checks": list(checks.values()), "kernels": krows, "end_to_end": erows, "winners": best}
    (args.out / "attention_sm90.json").write_text(json.dumps(blob, indent=1, default=str) + "\n")
    print(text)
    return 0 if all(r["ok"] for r in checks.values()) else 1


def _triton_version() -> str:
    import triton

    return triton.__version__


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
