"""The output head's alignment question, settled by one run: how fast cuBLAS runs GPT-2's three
head products when the vocabulary (50,257, odd) is an operand's contiguous extent, and what an
aligned layout buys.

    PYTHONPATH=. timeout 120 python -m bench.experiments.output_head --out $OUT     # on a GPU
    python -m bench.experiments.output_head --dry-run --out /tmp/x                  # CPU

``model(ids)`` computes logits = x W^T with x (M, d) and the head's weight W (V, d), M = B·T. A
training step through those logits runs three products, in each of which V is a dimension:

  logits  (M, d) @ (d, V) -> (M, V)   V is the output's N and, contiguous, its row length
  dX      (M, V) @ (V, d) -> (M, d)   V is the reduction K and the gradient's row length
  dW      (V, M) @ (M, d) -> (V, d)   V is the output's M (the gradient read transposed)

Layouts timed for each product, bf16, same run (CUDA-event medians of ``triton.testing.do_bench``,
L2 cleared between calls), with the cuBLAS kernel each runs (``torch.profiler``):

  contiguous  V-long rows: what ``F.linear`` and its autograd do today
  strided     the (M, V) tensor as a view of rows 50,304 elements apart (16-byte aligned rows)
  main+tail   the products over V rounded down to a multiple of 64 (50,240) and the 17-row tail,
              on the strided rows (what the fused loss does, ``vocab_parts``)
  padded      the weight padded with zero rows to 50,304 (nanoGPT's vocab_size 50304): every
              extent aligned, 0.09% more FLOPs, logits a view of the first V columns

Then the head as a model sees it, forward and forward + backward through autograd: ``F.linear``
against the padded weight (its copy and the slice's backward included). Shapes: GPT-2 124M and
355M (d = 768, 1024) at 8 x 1024 tokens. Writes ``output_head.md`` and ``output_head.json``
under ``--out``; expected ~30 s on an H100/H200. The dry run checks on CPU, at tiny sizes, that
every layout computes the same product (no timings, no kernel names).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
ALIGN = 64  # the main part's multiple (gptfast.kernels.linear_cross_entropy._VOCAB_ALIGN)


def padded_width(vocab: int) -> int:
    return -(-vocab // ALIGN) * ALIGN


class Operands:
    """x, W, the upstream gradient g, and each layout's views of them."""

    def __init__(self, m: int, d: int, vocab: int, dtype, device):
        gen = torch.Generator(device=device).manual_seed(0)
        rand = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
        self.vocab, self.wide = vocab, padded_width(vocab)
        self.main = vocab // ALIGN * ALIGN
        self.x, self.w = rand(m, d), rand(vocab, d) * d ** -0.5
        self.g = rand(m, vocab)
        self.g_rows = torch.zeros(m, self.wide, dtype=dtype, device=device)  # strided rows
        self.g_rows[:, :vocab] = self.g
        self.w_pad = torch.zeros(self.wide, d, dtype=dtype, device=device)
        self.w_pad[:vocab] = self.w
        self.out_rows = torch.empty(m, self.wide, dtype=dtype, device=device)


def products(o: Operands) -> dict:
    """{(product, layout): a call returning its result as a (rows, cols) tensor over V}."""
    v, mn = o.vocab, o.main
    s = o.g_rows[:, :v]

    def logits_strided():
        return torch.mm(o.x, o.w.t(), out=o.out_rows[:, :v])

    def logits_main_tail():
        torch.mm(o.x, o.w[:mn].t(), out=o.out_rows[:, :mn])
        torch.mm(o.x, o.w[mn:].t(), out=o.out_rows[:, mn:v])
        return o.out_rows[:, :v]

    def dx_main_tail():
        return torch.addmm(s[:, :mn] @ o.w[:mn], s[:, mn:], o.w[mn:])

    def dw_main_tail():
        return torch.cat([s[:, :mn].t() @ o.x, s[:, mn:].t() @ o.x])

    return {
        ("logits", "contiguous"): lambda: o.x @ o.w.t(),
        ("logits", "strided"): logits_strided,
        ("logits", "main+tail"): logits_main_tail,
        ("logits", "padded"): lambda: (o.x @ o.w_pad.t())[:, :v],
        ("dX", "contiguous"): lambda: o.g @ o.w,
        ("dX", "strided"): lambda: s @ o.w,
        ("dX", "main+tail"): dx_main_tail,
        ("dX", "padded"): lambda: o.g_rows @ o.w_pad,
        ("dW", "contiguous"): lambda: o.g.t() @ o.x,
        ("dW", "strided"): lambda: s.t() @ o.x,
        ("dW", "main+tail"): dw_main_tail,
        ("dW", "padded"): lambda: (o.g_rows.t() @ o.x)[:v],
    }


def head_calls(o: Operands) -> dict:
    """The head through autograd, as ``model(ids)`` and its backward run it."""
    x = o.x.detach().requires_grad_()
    w = o.w.detach().requires_grad_()
    zeros = torch.zeros(o.wide - o.vocab, w.shape[1], dtype=w.dtype, device=w.device)

    def linear():
        return F.linear(x, w)

    def padded():
        return F.linear(x, torch.cat([w, zeros]))[:, :o.vocab]

    def backward(fn):
        return lambda: torch.autograd.grad(fn(), (x, w), o.g)

    return {("head fwd", "F.linear"): linear, ("head fwd", "padded"): padded,
            ("head fwd+bwd", "F.linear"): backward(linear),
            ("head fwd+bwd", "padded"): backward(padded)}


def _tensors(result) -> list[torch.Tensor]:
    return [t.detach().float() for t in (result if isinstance(result, tuple) else (result,))]


def max_diff(values: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest difference of any output, relative to that output's largest magnitude."""
    return max(((v - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
               for v, r in zip(values, reference, strict=True))


def kernel_names(fn) -> str:
    """The CUDA kernels one call runs, by name (the GEMMs' say align1/align8 and sm75/sm90)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return "; ".join(dict.fromkeys(n for n in names if "memcpy" not in n.lower()))


def flops(product: str, m: int, d: int, vocab: int) -> int:
    per = 2 * m * d * vocab
    return {"head fwd": per, "head fwd+bwd": 3 * per}.get(product, per)


def run(args) -> dict:
    dtype = torch.bfloat16 if CUDA else torch.float32
    device = "cuda" if CUDA else "cpu"
    shapes = [(64, 32, 257)] if args.dry_run else [(8192, 768, 50257), (8192, 1024, 50257)]
    out = {"device": torch.cuda.get_device_name() if CUDA else "cpu (dry run)",
           "torch": torch.__version__, "dtype": str(dtype), "rows": []}
    if CUDA:
        from triton.testing import do_bench

        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        out["matmul_tflops"] = 2 * 8192 ** 3 / do_bench(lambda: a @ a, warmup=10, rep=50) / 1e9
        del a
    for m, d, vocab in shapes:
        o = Operands(m, d, vocab, dtype, device)
        calls = products(o) | head_calls(o)
        reference = {}  # each product's first layout: every other one must compute its values
        for (product, layout), fn in calls.items():
            row = {"shape": f"{m}x{d}->{vocab}", "product": product, "layout": layout}
            values = _tensors(fn())
            first = reference.setdefault(product, values)
            row["max_diff"] = max_diff(values, first)
            if row["max_diff"] > 1e-2:
                raise SystemExit(f"{product} {layout}: differs from the first layout by "
                                 f"{row['max_diff']:.3g} (relative)")
            if CUDA:
                ms = do_bench(fn, warmup=args.warmup, rep=args.rep)
                row |= {"ms": ms, "tflops": flops(product, m, d, vocab) / ms / 1e9,
                        "kernels": kernel_names(fn)}
            out["rows"].append(row)
        del o, calls, reference
    return out


def markdown(result: dict) -> str:
    lines = [f"# Output head products, {result['device']}, torch {result['torch']}, "
             f"{result['dtype']}", ""]
    if "matmul_tflops" in result:
        lines += [f"Matmul peak measured in this run (8192^3): {result['matmul_tflops']:.0f} "
                  "TFLOP/s.", ""]
    lines += ["| shape | product | layout | ms | TFLOP/s | kernels |", "|---|---|---|--:|--:|---|"]
    for r in result["rows"]:
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        lines.append(f"| {r['shape']} | {r['product']} | {r['layout']} | {ms} | {tf} | "
                     f"{r.get('kernels', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.experiments.output_head",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for output_head.md/.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: agreement only")
    ap.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up ms (default 10)")
    ap.add_argument("--rep", type=float, default=40.0, help="do_bench measuring ms (default 40)")
    args = ap.parse_args(argv)
    if not CUDA and not args.dry_run:
        print("error: no CUDA device: use --dry-run on CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "output_head.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "output_head.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
