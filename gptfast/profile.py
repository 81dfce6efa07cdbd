"""``python -m gptfast profile``: run the model under ``torch.profiler``, say where time goes.

One profiled *step* is a forward pass (``--mode forward``, no grad), a training step
(``train``: forward, cross-entropy ``loss``, ``backward``, AdamW ``optimizer`` step, each in a
``record_function`` range of that name) or a ``generate()`` call (``generate``). The loop runs
``wait + warmup + active`` steps under ``torch.profiler.schedule(repeat=1)``; only the active
steps are recorded. Each step ends with ``torch.cuda.synchronize()`` on CUDA, so its kernels
finish inside its ``ProfilerStep#`` range.

Where the time goes, by family
------------------------------
The *timeline* is the CUDA device on CUDA and the profiling thread on CPU. Its pieces are:

- on CUDA, each kernel (and memcpy/memset) with its device time, attributed to the CPU op
  that launched it (``FunctionEvent.kernels``, i.e. the profiler's correlation id);
- on CPU, each op with its self CPU time (time in the op, not in the ops it calls).

A piece gets the model *label* around its op: the innermost enclosing range named by
``gptfast.model.label`` ("trf_blocks.3.att", "final_norm", ...) or "loss"/"backward"/
"optimizer". Backward ops run outside those ranges (on another thread on CUDA), so an op under
an autograd node gets the label of the forward op that made the node (same ``sequence_nr`` and
forward thread, the profiler's own forward/backward link).

The first rule that matches, on the kernel name, then the launching op's name, picks the family:

1. a kernel named ``flash``/``attn``/``attention``/``fmha``/``sdpa`` → attention, one named
   ``layer_norm``/``layernorm`` → LayerNorm;
2. a batched matmul (``bmm``) inside an ``*.att`` range → attention: these are eager
   attention's QKᵀ and AV, which flash attention does inside its own kernel;
3. a GEMM library's kernel (cuBLAS, cuBLASLt, CUTLASS, cuDNN: a name with ``gemm``/``gemv``/
   ``cutlass``/``xmma``/``cublas``/``nvjet``/``splitKreduce``, e.g.
   ``cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1``, ``sm90_xmma_gemm_...``,
   ``nvjet_tst_...``, ``ampere_bf16_s16816gemm_...``, ``cutlass3x_sm90_tensorop_gemm_...``) →
   matmul, whichever op launched it (the Q/K/V/out projections, the feed-forward, the output
   head, the fused loss's logit chunks);
4. an op named as in 1 → attention / LayerNorm (the Triton kernels' own names, such as
   ``_fwd_kernel``, say nothing: their ops ``Attention``, ``LayerNorm``... do);
5. ``mm``/``addmm``/``bmm``/``matmul``/``linear`` ops → matmul;
6. anything else inside ``*.att`` → attention (eager masking, scaling, softmax, dropout);
7. anything else inside ``*.norm1``/``*.norm2``/``final_norm`` → LayerNorm (the chapter's
   LayerNorm is a handful of reduction and elementwise kernels; ``norm2`` includes the residual
   add, which the Triton path fuses into it);
8. everything else → elementwise/other (embedding, GELU, residual adds, dropout, loss, AdamW).

So both kernel sets are compared on the same work: attention = everything the attention core
does, LayerNorm = everything the norms do. The Triton path's ops are autograd Functions
(``Attention``, ``LayerNorm``, ``AddLayerNorm`` and their ``...Backward`` nodes; under
torch.compile the ``gptfast::*`` ops), whose names match rule 4, so their kernels count right
even where no label encloses them.

*idle* is the rest of the timeline. On CUDA: the active steps' wall time minus the union of
the kernels' intervals, i.e. the gaps where the GPU waits for the CPU to launch work. On CPU:
the active steps' wall time minus the summed self time of all ops (clamped at 0): Python, the
autograd engine and profiler overhead between ops. The shares are of families + idle, so they
sum to 100%. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and not reported on
CPU (the profiler's allocation tracking would add its own overhead to the timings).

Files: ``OUT/trace.json`` (Chrome trace format). A profile exports only once, so with
``--tensorboard`` the TensorBoard file is a copy of it in ``OUT/tensorboard``, named as
``torch.profiler.tensorboard_trace_handler`` names its files (no tensorboard package needed).
fp16 training runs without a GradScaler: fine for timing, not for training.
"""

import contextlib
import os
import re
import shutil
import socket
import time
import warnings
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from gptfast.config import CONFIGS, check_config, get_config
from gptfast.generation import generate
from gptfast.model import KERNEL_CHOICES, GPTModel, label

TINY_CONFIG = {"vocab_size": 1000, "context_length": 256, "emb_dim": 64, "n_heads": 4,
               "n_layers": 2, "drop_rate": 0.1, "qkv_bias": False}
MODES = ("forward", "train", "generate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILIES = ("attention", "LayerNorm", "matmul", "elementwise/other", "idle")

LABEL = re.compile(r"embedding|trf_blocks\.\d+\.(norm1|att|norm2|ff)|final_norm|out_head"
                   r"|loss|backward|optimizer")
ATTENTION = re.compile(r"flash|attn|attention|fmha|sdpa")
LAYER_NORM = re.compile(r"layer_?norm")
GEMM_KERNEL = re.compile(r"gemm|gemv|cutlass|xmma|cublas|nvjet|splitkreduce")
MATMUL = re.compile(r"matmul|linear|(^|[^a-z])(add|b|baddb)?mm([^a-z]|backward|$)")
BACKWARD_SCOPE = 1  # FunctionEvent.scope of an autograd node (RecordScope::BACKWARD_FUNCTION)


def classify(name: str, op: str = "", label: str | None = None) -> str:
    """The family of kernel (or CPU op) ``name``, launched by ``op`` inside ``label``."""
    name, op = name.lower(), op.lower()
    in_att = label is not None and label.endswith(".att")
    in_norm = label is not None and (label.endswith((".norm1", ".norm2")) or label == "final_norm")
    if ATTENTION.search(name):
        return "attention"
    if LAYER_NORM.search(name):
        return "LayerNorm"
    if in_att and "bmm" in f"{name} {op}":
        return "attention"
    if GEMM_KERNEL.search(name):
        return "matmul"
    if ATTENTION.search(op):
        return "attention"
    if LAYER_NORM.search(op):
        return "LayerNorm"
    if MATMUL.search(f"{name} {op}"):
        return "matmul"
    if in_att:
        return "attention"
    return "LayerNorm" if in_norm else "elementwise/other"


# --- running the model under the profiler -------------------------------------------------

def resolve_config(name: str) -> dict:
    if name == "tiny":
        return dict(TINY_CONFIG)
    try:
        return get_config(name)
    except ValueError as exc:
        raise ValueError(f"{exc}, or tiny") from None


def check_options(cfg, batch, seq_len, mode, kernels, dtype, device, wait, warmup, active,
                  new_tokens, top) -> None:
    """Raise ValueError/RuntimeError naming the problem before anything is built."""
    for name, value, least in (("batch", batch, 1), ("seq_len", seq_len, 1), ("active", active, 1),
                               ("wait", wait, 0), ("warmup", warmup, 0),
                               ("new_tokens", new_tokens, 1), ("top", top, 1)):
        if not isinstance(value, int) or value < least:
            kind = "positive" if least else "non-negative"
            raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if seq_len > cfg["context_length"]:
        raise ValueError(f"seq_len {seq_len} exceeds the config's context length "
                         f"{cfg['context_length']}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but CUDA is not available here "
                           f"(torch {torch.__version__}); use --device cpu")
    if device == "cpu" and kernels == "triton":
        from gptfast.kernels._common import INTERPRETING

        if not INTERPRETING:
            raise RuntimeError("kernels 'triton' on CPU needs Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before starting Python (slow), profile on "
                               "CUDA (--device cuda), or use --kernels torch")


def autocast_for(dtype: str, device: str):
    """A factory of ``torch.autocast`` contexts for bf16/fp16 (of null contexts for fp32)."""
    if dtype == "fp32":
        return contextlib.nullcontext
    with warnings.catch_warnings():  # autocast warns and turns itself off for dtypes it lacks
        warnings.simplefilter("ignore")
        supported = torch.autocast(device, dtype=DTYPES[dtype])._enabled
    if not supported:
        raise ValueError(f"dtype {dtype}: torch.autocast on {device} does not support "
                         f"{DTYPES[dtype]} in torch {torch.__version__}; use fp32 or bf16")
    return lambda: torch.autocast(device, dtype=DTYPES[dtype])


def make_step(model, mode, ids, new_tokens, amp):
    """The function one profiled step calls; ``amp()`` gives a fresh autocast context."""
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ids.is_cuda)
        targets = ids.roll(-1, dims=1)

        def step():
            with amp():
                logits = model(ids)
                with label("loss"):
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            with label("backward"):
                loss.backward()
            with label("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return step
    model.eval()
    if mode == "generate":
        def step():
            with amp():
                generate(model, ids, new_tokens)
        return step

    def step():
        with torch.no_grad(), amp():
            model(ids)
    return step


def profile_model(config="tiny", *, batch=1, seq_len=None, mode="forward", kernels="auto",
                  dtype="fp32", device=None, wait=1, warmup=1, active=3, new_tokens=8, out=None,
                  tensorboard=False, top=10, seed=0) -> dict:
    """Profile ``active`` steps of a ``config`` model (a name, "tiny" or a config dict).

    Returns the breakdown: ``families`` (ms per family, idle included), ``shares`` (% of
    ``total_ms``), ``top`` (the ``top`` kernels/ops by self time), ``peak_memory_mb`` (None on
    CPU), ``trace`` (the Chrome trace, when ``out`` is given), ``tensorboard`` (its directory).
    """
    cfg = check_config(dict(config) if isinstance(config, dict) else resolve_config(config))
    seq_len = cfg["context_length"] if seq_len is None else seq_len
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_options(cfg, batch, seq_len, mode, kernels, dtype, device, wait, warmup, active,
                  new_tokens, top)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out must name a directory (for trace.json), but {out} is a file")
    amp = autocast_for(dtype, device)
    torch.manual_seed(seed)
    model = GPTModel(cfg, kernels=kernels).to(device)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq_len), device=device)
    step = make_step(model, mode, ids, new_tokens, amp)

    trace = tb_dir = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        trace = os.path.join(out, "trace.json")
        tb_dir = os.path.join(out, "tensorboard") if tensorboard else None

    def save(prof):
        if trace:
            prof.export_chrome_trace(trace)
        if tb_dir:  # a result exports once: copy it, named as tensorboard_trace_handler names it
            os.makedirs(tb_dir, exist_ok=True)
            worker = f"{socket.gethostname()}_{os.getpid()}"
            shutil.copyfile(trace, os.path.join(tb_dir, f"{worker}.{time.time_ns()}.pt.trace.json"))

    on_cuda = device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.reset_peak_memory_stats()
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule,
                                on_trace_ready=save) as prof:
        for _ in range(wait + warmup + active):
            step()
            if on_cuda:
                torch.cuda.synchronize()
            prof.step()
    result = breakdown(prof.events(), on_cuda, top)
    name = config if isinstance(config, str) else "custom config"
    run = (f"{name} {mode}, batch {batch} x {seq_len} tokens"
           + (f" + {new_tokens} new" if mode == "generate" else "")
           + f", kernels={kernels}, {dtype} on {device}")
    result.update(run=run, trace=trace, tensorboard=tb_dir, steps=active, peak_memory_mb=(
        torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None))
    return result


# --- reading the profile ------------------------------------------------------------------

def _is_range(event) -> bool:
    """A ``record_function`` range (model label, ProfilerStep#, Optimizer.step#...), not an op."""
    return (bool(getattr(event, "is_user_annotation", False))
            or event.name.startswith("ProfilerStep") or LABEL.fullmatch(event.name) is not None)


def _label_of(event, forward: dict) -> str | None:
    while event is not None:
        if LABEL.fullmatch(event.name):
            return event.name
        if event.scope == BACKWARD_SCOPE:  # an autograd node: where its forward op ran
            return forward.get((event.sequence_nr, event.fwd_thread))
        event = event.cpu_parent
    return None


def labeller(cpu_events):
    """A function giving a CPU event its model label (see the module docstring)."""
    forward = {}
    for e in sorted(cpu_events, key=lambda e: e.time_range.start):
        lab = _label_of(e, {})
        if e.sequence_nr >= 0 and lab not in (None, "backward", "optimizer"):
            # ops that make no autograd node share the next op's number: the last one made it
            forward[(e.sequence_nr, e.thread)] = lab
    return lambda e: _label_of(e, forward)


def timeline_pieces(events, on_device: bool):
    """(name, family, µs) per kernel on CUDA or per op (self CPU time) on CPU; and the kernels."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    label_of = labeller(cpu)
    if not on_device:
        ops = [e for e in cpu if not _is_range(e)]
        return [(e.name, classify(e.name, e.name, label_of(e)), e.self_cpu_time_total)
                for e in ops], []
    ranges = {e.name for e in cpu if _is_range(e)}  # their GPU-side spans are no kernels
    kernels = [e for e in events if e.device_type != DeviceType.CPU
               and not _is_range(e) and e.name not in ranges]
    unmatched = Counter((k.name, k.time_range.elapsed_us()) for k in kernels)
    pieces = []
    for e in cpu:
        for k in e.kernels:  # the kernels this op launched (correlation ids)
            if unmatched[(k.name, k.duration)] > 0:
                unmatched[(k.name, k.duration)] -= 1
                pieces.append((k.name, classify(k.name, e.name, label_of(e)), k.duration))
    # kernels the profiler linked to no CPU op keep the family their name gives
    unlinked = [(name, classify(name), us) for (name, us), n in unmatched.items() for _ in range(n)]
    return pieces + unlinked, kernels


def _covered(intervals) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        start = max(start, reach)
        if end > start:
            total, reach = total + end - start, end
    return total


def idle_us(events, pieces, kernels, on_device: bool) -> float:
    """Active steps' wall time not covered by kernels (CUDA) or by ops' self time (CPU)."""
    steps = [e.time_range for e in events
             if e.device_type == DeviceType.CPU and e.name.startswith("ProfilerStep")]
    if not steps:
        raise RuntimeError("the profiler recorded no ProfilerStep ranges; nothing to break down")
    wall = sum(s.elapsed_us() for s in steps)
    if not on_device:
        return max(0.0, wall - sum(us for _, _, us in pieces))
    busy = sum(_covered((max(k.time_range.start, s.start), min(k.time_range.end, s.end))
                        for k in kernels) for s in steps)
    return wall - busy


def breakdown(events, on_device: bool, top: int = 10) -> dict:
    """Time by family (ms and % of the timeline) and the ``top`` kernels/ops by self time."""
    pieces, kernels = timeline_pieces(events, on_device)
    us = dict.fromkeys(FAMILIES, 0.0)
    by_name = defaultdict(lambda: [0.0, 0, set()])
    for name, family, t in pieces:
        us[family] += t
        entry = by_name[name]
        entry[0], entry[1] = entry[0] + t, entry[1] + 1
        entry[2].add(family)
    us["idle"] = idle_us(events, pieces, kernels, on_device)
    total = sum(us.values())
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "timeline": "CUDA" if on_device else "CPU",
        "families": {f: t / 1e3 for f, t in us.items()},
        "shares": {f: 100 * t / total if total else 0.0 for f, t in us.items()},
        "total_ms": total / 1e3,
        "top": [{"name": name, "ms": t / 1e3, "calls": calls,
                 "family": families.pop() if len(families) == 1 else "mixed"}
                for name, (t, calls, families) in ranked],
    }


def format_report(result: dict) -> str:
    cuda = result["timeline"] == "CUDA"
    what, clock = ("kernels", "self CUDA time") if cuda else ("ops", "self CPU time")
    lines = [f"profile: {result['run']}",
             f"top {len(result['top'])} {what} by {clock}, {result['steps']} active step(s):",
             f"{'ms':>10}{'%':>7}{'calls':>7}  {'family':<18}name"]
    for row in result["top"]:
        share = 100 * row["ms"] / result["total_ms"] if result["total_ms"] else 0.0
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        lines.append(f"{row['ms']:>10.3f}{share:>7.1f}{row['calls']:>7}  "
                     f"{row['family']:<18}{name}")
    lines += ["", f"time by family ({result['timeline']} timeline):",
              f"  {'family':<18}{'ms':>10}{'%':>8}"]
    for family in FAMILIES:
        lines.append(f"  {family:<18}{result['families'][family]:>10.3f}"
                     f"{result['shares'][family]:>7.1f}%")
    total_share = sum(result["shares"].values())
    lines.append(f"  {'total':<18}{result['total_ms']:>10.3f}{total_share:>7.1f}%")
    peak = result["peak_memory_mb"]
    lines.append("peak memory: n/a on CPU" if peak is None
                 else f"peak memory: {peak:,.1f} MiB (torch.cuda.max_memory_allocated)")
    if result["trace"]:
        lines.append(f"trace: {result['trace']} "
                     "(open it in https://ui.perfetto.dev or chrome://tracing)")
    if result["tensorboard"]:
        lines.append(f"TensorBoard trace: {result['tensorboard']} "
                     "(tensorboard --logdir DIR, with the torch-tb-profiler plugin)")
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------

def cmd_profile(args) -> None:
    result = profile_model(
        args.config, batch=args.batch, seq_len=args.seq_len, mode=args.mode, kernels=args.kernels,
        dtype=args.dtype, device=args.device, wait=args.wait, warmup=args.warmup,
        active=args.active, new_tokens=args.new_tokens, out=args.out,
        tensorboard=args.tensorboard, top=args.top)
    print(format_report(result))


def add_profile_parser(sub) -> None:
    """Register ``profile`` on the CLI's subparsers."""
    sizes = ", ".join(name.split(" ")[1].strip("()") for name in CONFIGS)
    p = sub.add_parser("profile", help="run the model under torch.profiler: top kernels, time "
                       "by family (attention, LayerNorm, matmul, other, idle), Chrome trace")
    p.add_argument("--config", default="124M", help=f"{sizes}, or tiny (vocab 1000, context 256, "
                   "emb 64, 4 heads, 2 layers: for CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row, at most the context length (default: the context "
                        "length); in generate mode the prompt length (generate crops to the "
                        "context as it goes)")
    p.add_argument("--mode", choices=MODES, default="forward",
                   help="forward (no grad), train (forward, loss, backward, AdamW step), "
                        "generate (--new-tokens greedy tokens)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens per generate step")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="bf16/fp16 run under torch.autocast")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if present")
    p.add_argument("--wait", type=int, default=1, help="steps run before profiling")
    p.add_argument("--warmup", type=int, default=1, help="steps traced and thrown away")
    p.add_argument("--active", type=int, default=3, help="steps recorded")
    p.add_argument("--top", type=int, default=15, help="kernels (ops on CPU) to list")
    p.add_argument("--out", default="profile", help="directory for trace.json")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write a TensorBoard trace to OUT/tensorboard")
    p.set_defaults(run=cmd_profile)
