"""The end-of-run summary: a Markdown table per op, the same data as JSON, and PNG plots.

A record is a dict written by bench/_runner.py (or bench/test_generation.py) for each case;
``columns`` lists the fields each op's table shows (the model's records add ``tokens_per_s``,
``mfu`` and ``peak_gib``; generation's ``tokens_per_s`` and ``same_tokens``). Times are
milliseconds; ``value`` is GB/s or TFLOP/s per ``metric``. ``meta["static_report"]``, when
present (runs without CUDA), is the sm_90 table of ``python -m gptfast.kernels.report``.
"""

import json
from pathlib import Path

OP_TITLES = {
    "layer_norm": "LayerNorm",
    "add_layer_norm": "Fused residual add + LayerNorm",
    "attention": "Attention",
    "model": "GPT model",
    "model_padded": "GPT model, padded batch (lengths 25% to 100% of T; real tokens counted)",
    "generation": "Greedy generation",
    "linear_cross_entropy": "Fused linear + cross-entropy",
    "host": "Host cost per call (us, GPU work excluded; bench/test_host.py)",
    "host_decode": "Host cost per generated token (us, greedy, KV cache, no CUDA graph)",
}
METRICS = {
    "layer_norm": "GB/s", "add_layer_norm": "GB/s", "attention": "TFLOP/s", "model": "TFLOP/s",
    "model_padded": "TFLOP/s", "generation": "GB/s", "linear_cross_entropy": "TFLOP/s",
}
NO_GPU_NOTE = (
    "**No GPU timings were taken**: no CUDA device was available. The agreement cases ran at "
    "small shapes under the Triton interpreter; their times are interpreter wall times and say "
    "nothing about speed. Only the plain-PyTorch CPU generation case (shape `cpu ...`) measures "
    "speed, that of this CPU, and the host-cost tables that of the host path (compiled kernels' "
    "launches stubbed)."
)


def _fmt(x, spec=".4g", none="-"):
    return none if x is None else format(x, spec)


def _err(r):
    if r.get("err") is None:
        return "-"
    return f"{r['err']:.1e} ({r['worst']})" if r.get("worst") else f"{r['err']:.1e}"


def _ok(r):
    if r.get("agrees") is None:
        return "-"
    return "yes" if r["agrees"] else "**NO**"


def groups(records):
    """Records grouped by (op, shape, dtype, mode), in order of first appearance."""
    out: dict[tuple, list] = {}
    for r in records:
        out.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    return out


def _field(key, spec=".4g"):
    return lambda r: _fmt(r.get(key), spec)


_HEAD = [("shape", "---", _field("shape", "")), ("dtype", "---", _field("dtype", "")),
         ("mode", "---", _field("mode", "")), ("provider", "---", _field("provider", "")),
         ("ms (events)", "--:", _field("ms")), ("ms (loop)", "--:", _field("ms_wall"))]
_AGREEMENT = [("max err", "--:", _err), ("eager err", "--:", _field("eager_err", ".1e")),
              ("agrees", "---", _ok)]


def _same_tokens(r):
    same, new = r.get("same_tokens"), r.get("params", {}).get("new")
    return "-" if same is None else f"{same}/{new}"


def _meets(r):
    return f"<= {r['target']:g}x: {'yes' if r['meets'] else '**NO**'}"


def columns(op, metric) -> list[tuple]:
    """(header, alignment, cell function) of each column of an op's table."""
    if op == "host":
        return [("op", "---", _field("shape", "")), ("mode", "---", _field("mode", "")),
                ("us", "--:", _field("us", ".1f")), ("ATen us", "--:", _field("aten_us", ".1f")),
                ("ratio", "--:", _field("ratio", ".2f")), ("target", "---", _meets),
                ("launches", "--:", _field("launches")),
                ("ATen launches", "--:", _field("aten_launches")),
                ("host reads", "--:", _field("host_reads")),
                ("ATen counterpart", "---", _field("aten_name", ""))]
    if op == "host_decode":
        return [("shape", "---", _field("shape", "")), ("provider", "---", _field("provider", "")),
                ("us/token", "--:", _field("us_per_token", ".0f")),
                ("launches/token", "--:", _field("launches_per_token", ".1f")),
                ("host reads/token", "--:", _field("host_reads_per_token", ".1f"))]
    if op in ("model", "model_padded"):
        return _HEAD + [
            ("speedup", "--:", _field("speedup", ".2f")),
            ("tokens/s", "--:", _field("tokens_per_s", ".0f")),
            ("TFLOP/s", "--:", _field("value", ".1f")), ("MFU %", "--:", _field("mfu", ".1f")),
            ("peak GiB", "--:", _field("peak_gib", ".2f")),
        ] + _AGREEMENT
    if op == "generation":
        return _HEAD + [
            ("tokens/s", "--:", _field("tokens_per_s", ".0f")),
            ("speedup vs uncached", "--:", _field("speedup", ".2f")),
            ("GB/s", "--:", _field("value", ".1f")),
            ("% of copy BW", "--:", _field("pct_limit", ".1f")),
            ("= uncached", "--:", _same_tokens),
        ] + _AGREEMENT
    limit = "% of copy BW" if metric == "GB/s" else "% of matmul"
    if op == "linear_cross_entropy":  # the point of the fusion is memory: its peak too
        return _HEAD + [
            ("speedup", "--:", _field("speedup", ".2f")), (metric, "--:", _field("value", ".1f")),
            ("peak extra MiB", "--:", _field("peak_extra_mib", ".0f")),
        ] + _AGREEMENT
    return _HEAD + [
        ("speedup", "--:", _field("speedup", ".2f")), (metric, "--:", _field("value", ".1f")),
        (limit, "--:", _field("pct_limit", ".1f")),
    ] + _AGREEMENT


def markdown(records, meta) -> str:
    lines = [f"# Benchmark results: {meta.get('device', '?')}", ""]
    for key in ("torch", "triton", "date", "run", "commit"):
        if meta.get(key):
            lines.append(f"- {key}: {meta[key]}")
    limits = meta.get("limits") or {}
    if limits:
        copy = _fmt(limits.get("copy_gbps"), ".0f")
        matmul = _fmt(limits.get("matmul_tflops"), ".0f")
        lines.append(
            f"- device limits measured in this run: copy {copy} GB/s (bytes read + written), "
            f"bf16 matmul {matmul} TFLOP/s"
        )
    lines.append("")
    if not meta.get("gpu"):
        lines += [NO_GPU_NOTE, ""]
    if not records:
        lines += ["No benchmark case ran.", ""]
    by_op: dict[str, list] = {op: [] for op in OP_TITLES}
    for r in records:
        by_op.setdefault(r["op"], []).append(r)
    for op, recs in by_op.items():
        if not recs:
            continue
        cols = columns(op, METRICS.get(op) or recs[0].get("metric") or "-")
        lines += [
            f"## {OP_TITLES.get(op, op)}",
            "",
            "| " + " | ".join(head for head, _, _ in cols) + " |",
            "|" + "|".join(align for _, align, _ in cols) + "|",
        ]
        for grp in groups(recs).values():
            for r in grp:
                lines.append("| " + " | ".join(cell(r) for _, _, cell in cols) + " |")
        lines.append("")
    if meta.get("static_report"):
        lines += ["## Static kernel report (compiled for the GPU, no GPU needed)", "",
                  meta["static_report"], ""]
    return "\n".join(lines)


def write_summary(records, meta, outdir, stem="summary", plots=True) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` (and, with ``plots``, PNGs) under ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    md, js = outdir / f"{stem}.md", outdir / f"{stem}.json"
    md.write_text(markdown(records, meta) + "\n")
    js.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str) + "\n")
    return [md, js, *(write_plots(records, meta, outdir, stem) if plots else [])]


def _pick(records, key, preferred):
    """Keep the records whose ``params[key]`` is the preferred value (else the most common)."""
    values = [r["params"][key] for r in records]
    if not values:
        return records
    best = preferred if preferred in values else max(set(values), key=values.count)
    return [r for r in records if r["params"][key] == best]


def _sweep_plot(ax_row, records, x_key, ylabel, limit):
    for ax, mode in zip(ax_row, ("fwd", "bwd", "fwd+bwd")):
        recs = [r for r in records if r["mode"] == mode and r.get("value") is not None]
        for provider in dict.fromkeys(r["provider"] for r in recs):
            pts = sorted((r["params"][x_key], r["value"]) for r in recs
                         if r["provider"] == provider)
            ax.plot(*zip(*pts), marker="o", label=provider)
        if limit:
            ax.axhline(limit, color="grey", linestyle="--", label="device limit")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(mode)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")


def write_plots(records, meta, outdir, stem) -> list[Path]:
    """LayerNorm GB/s vs width and attention TFLOP/s vs length, one PNG each (GPU runs only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    timed = [r for r in records if r.get("value") is not None and r.get("ms") is not None]
    limits = meta.get("limits") or {}
    written = []
    for op, x_key, ylabel, limit, prefs in (
        ("layer_norm", "N", "GB/s", limits.get("copy_gbps"), {"dtype": "bf16"}),
        ("add_layer_norm", "N", "GB/s", limits.get("copy_gbps"), {"dtype": "bf16"}),
        ("attention", "T", "TFLOP/s", limits.get("matmul_tflops"),
         {"dtype": "bf16", "D": 64, "causal": True, "H": 12}),
    ):
        recs = [dict(r, params={**r["params"], "dtype": r["dtype"]})
                for r in timed if r["op"] == op]
        for key, value in prefs.items():
            recs = _pick(recs, key, value)
        if not recs:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
        _sweep_plot(axes[0], recs, x_key, ylabel, limit)
        fixed = ", ".join(f"{k}={recs[0]['params'][k]}" for k in prefs)
        fig.suptitle(f"{OP_TITLES[op]} on {meta.get('device', '?')} ({fixed})")
        fig.tight_layout()
        path = Path(outdir) / f"{stem}-{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
