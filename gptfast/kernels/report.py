"""Static kernel report: what the compiled kernels say about speed, without a GPU.

    python -m gptfast.kernels.report [--cc 90] [--cc 80] [--json] [--jobs 2]

Compiles every launch the heuristics pick at GPT-2 shapes (the ``report_cases()`` of each kernel
module: 124M..1558M widths and head counts, 8 x 1024 training tokens, batch 1 and 8 decode
steps, the fused loss's per-chunk launch, fp32 and bf16, with and without dropout) to cubin for
sm_80 (A100) and/or sm_90 (H100/H200), and prints per launch: warps, stages, tile, registers
per thread, spill bytes (stores/loads), shared memory per block, resident blocks and warps per
SM and the limit that binds them, the grid and the waves it makes on the GPU's SMs, whether the
matrix products run on wgmma (sm_90) or mma.sync, whether loads use TMA or cp.async (and the
widest plain load), and the SASS instructions of the main loop. The figures come from
gptfast/kernels/testing.py (``kernel_stats``, ``occupancy``), read from the cubin; the compilers run in
``--jobs`` subprocesses with the interpreter off, so this runs on any machine, GPU or not.
"""

import argparse
import importlib
import json
import sys

MODULES = ("gptfast.kernels.attention", "gptfast.kernels.attention_sm90", "gptfast.kernels.decode_attention",
           "gptfast.kernels.layer_norm", "gptfast.kernels.linear_cross_entropy", "gptfast.kernels.linear")
_TILE_KEYS = ("ROWS", "BLOCK_G", "BLOCK_S", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_V")


def _tile(constexprs: dict) -> str:
    return "x".join(str(constexprs[k]) for k in _TILE_KEYS if k in constexprs)


def _worker(ccs: list[int], part: str) -> None:
    """Print the cases (shard 0) and compile this shard's share of the distinct configs."""
    from gptfast.kernels import testing

    todo = {}
    for module in MODULES:
        mod = importlib.import_module(module)
        for cc in ccs:
            for case in mod.report_cases(cc):
                cfg = case["config"]
                key = testing.config_key(cfg)
                todo.setdefault((key, cc), cfg)
                if part.startswith("0/"):
                    print(json.dumps({
                        "type": "case", "module": module, "label": case["label"], "cc": cc,
                        "key": key, "grid": case["grid"], "kernel": cfg["fn"].__name__,
                        "tile": _tile(cfg["constexprs"]),
                    }), flush=True)
    items = list(todo.items())
    for (key, cc), cfg in testing.shard(items, lambda item: testing.compile_cost(item[1]), part):
        print(json.dumps({"type": "config", "key": key, **testing.config_record(cfg, cc)}), flush=True)


def collect(ccs=(90,), jobs: int = 2, pythonpath: str | None = None) -> list[dict]:
    """One row per (case, cc): the case, its compiled figures, occupancy and waves.

    ``pythonpath`` goes first on the compilers' path (e.g. a side-installed triton 3.6).
    """
    from gptfast.kernels import testing

    args = ["gptfast.kernels.report", "--worker", *(f"--cc={cc}" for cc in ccs)]
    records = testing.run_shards(args, jobs, pythonpath, timeout=1800)
    compiled = {(r["key"], r["cc"]): r for r in records if r["type"] == "config"}
    rows = []
    for case in (r for r in records if r["type"] == "case"):
        rec = compiled[(case["key"], case["cc"])]
        row = {k: v for k, v in case.items() if k not in ("type", "key")}
        row.update({k: v for k, v in rec.items() if k not in ("type", "key", "name", "kernel", "cc")})
        row["sms"] = testing.SM_COUNT[case["cc"]]
        if rec["ok"]:
            occ = testing.occupancy(case["cc"], rec["num_warps"], rec["registers"], rec["shared"])
            row.update(blocks=occ["blocks"], warps_per_sm=occ["warps"], bound=occ["limit"])
            row["waves"] = case["grid"] / (occ["blocks"] * row["sms"]) if occ["blocks"] else None
        rows.append(row)
    return rows


_COLUMNS = (
    ("kernel", "---", lambda r: r["kernel"].strip("_")),
    ("case", "---", lambda r: r["label"]),
    ("warps", "--:", lambda r: str(r["num_warps"])),
    ("stages", "--:", lambda r: str(r["num_stages"])),
    ("tile", "--:", lambda r: r["tile"]),
    ("regs", "--:", lambda r: str(r["registers"])),
    ("spill st/ld B", "--:", lambda r: f"{r['spill_stores']}/{r['spill_loads']}"),
    ("shared KiB", "--:", lambda r: f"{r['shared'] / 1024:.1f}"),
    ("blocks/SM", "--:", lambda r: str(r["blocks"])),
    ("warps/SM", "--:", lambda r: str(r["warps_per_sm"])),
    ("bound by", "---", lambda r: r["bound"]),
    ("grid", "--:", lambda r: str(r["grid"])),
    ("waves", "--:", lambda r: "-" if r["waves"] is None else f"{r['waves']:.2f}"),
    ("mma", "---", lambda r: r["mma"]),
    ("loads", "---", lambda r: r["loads"]),
    ("loop SASS", "--:", lambda r: "-" if r["main_loop"] is None else str(r["main_loop"])),
)

LEGEND = (
    "Per launch at the shape of its case (B batch, T tokens, p dropout; LayerNorm: rows x width). "
    "regs: registers per thread; spill st/ld: bytes of spill stores/loads; shared: per block; "
    "blocks/SM, warps/SM: resident per SM, bound by the limit(s) named (registers, shared, "
    "warps, blocks); waves: grid / (blocks per SM x SMs), below 1 some SMs idle; mma: wgmma, "
    "mma.sync or none (fp32 products run on FMA units); loads: TMA, cp.async and the widest plain "
    "load (bits); loop SASS: instructions of the main loop (the shortest innermost loop; see "
    "gptfast/kernels/testing.py)."
)


def markdown(rows: list[dict], cc: int) -> str:
    """The report's table for one compute capability (Markdown)."""
    rows = [r for r in rows if r["cc"] == cc]
    if not rows:
        return f"No kernel was compiled for sm_{cc}."
    triton = rows[0]["triton"]
    lines = [f"Static kernel report: sm_{cc} ({rows[0]['sms']} SMs), triton {triton}", "",
             "| " + " | ".join(c[0] for c in _COLUMNS) + " |",
             "|" + "|".join(c[1] for c in _COLUMNS) + "|"]
    failed = []
    for r in rows:
        if r["ok"]:
            lines.append("| " + " | ".join(cell(r) for _, _, cell in _COLUMNS) + " |")
        else:
            failed.append(f"- {r['kernel']} {r['label']}: {r['error'][:300]}")
    lines += ["", LEGEND]
    if failed:
        lines += ["", "Failed to compile:", *failed]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.kernels.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", type=int, action="append", choices=(80, 90),
                        help="compute capability (repeatable; default 90)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ccs = args.cc or [90]
    if args.worker:
        _worker(ccs, args.shard)
        return 0
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    rows = collect(ccs, args.jobs)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("\n\n".join(markdown(rows, cc) for cc in ccs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
