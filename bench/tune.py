"""Measure the tunable launch configs on this GPU and write its tuning table (gptfast/kernels/tuning.py).

    python -m bench.tune [--out-dir DIR] [--budget S]  # on a CUDA machine, ~2-4 minutes
    python -m bench.tune --dry-run  # the same plumbing at tiny shapes, on the GPU if there is one
    TRITON_INTERPRET=1 python -m bench.tune --dry-run  # ... else on CPU, in the interpreter

For every kernel that registers a tuning space and has a case below, and every shape class of
that space, each candidate config runs at GPT-2 shapes through the public op (the config put in
place with ``tuning.use``, exactly where a table would put it). A candidate whose outputs do not
agree with a float64 reference (``gptfast.kernels.testing.agreement``: within 2x eager PyTorch's error
in the same dtype, plus a small slack) is rejected; the others are timed with
``triton.testing.do_bench_cudagraph`` (summed over the class's shapes) and the fastest wins. The table
``DIR/<device name>.json`` (default gptfast/kernels/configs/) holds the winners; a class without a
passing candidate is left out (the static heuristics stay). The table is rewritten after each
class, so a run cut short keeps what it measured. Commit it as gptfast/kernels/configs/<name>.
"""

import argparse
import importlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptfast.kernels import add_layer_norm, attention, decode_attention, tuning
from gptfast.kernels._common import INTERPRETING
from gptfast.kernels.testing import agreement

attn = importlib.import_module("gptfast.kernels.attention")
dec = importlib.import_module("gptfast.kernels.decode_attention")
ln = importlib.import_module("gptfast.kernels.layer_norm")
lin = importlib.import_module("gptfast.kernels.linear")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_EPS = 1e-5
_SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # as the tests


@dataclass
class Shape:
    """One measured shape of a class: ``run()`` launches the kernel under test and returns its
    outputs; ``eager`` and ``ref`` are eager PyTorch's outputs in the same dtype and float64's."""

    run: Callable[[], list[torch.Tensor]]
    eager: list[torch.Tensor]
    ref: list[torch.Tensor]
    slack: float


def _decode_shapes(cls: str, device, dry: bool) -> list[Shape]:
    t, d, _ = cls.split("-")
    dtype, head_dim = _DTYPES[t], int(d[1:])
    shapes = []
    for batch, heads, n in ([(1, 2, 70)] if dry else [(1, 12, 1024), (8, 12, 1024)]):
        g = torch.Generator().manual_seed(batch)
        q, k, v = (torch.randn(batch, heads, m, head_dim, generator=g).to(device, dtype) for m in (1, n, n))

        def attend(dt, q=q, k=k, v=v):
            s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) / math.sqrt(head_dim)
            return [torch.softmax(s, dim=-1) @ v.to(dt)]

        run = lambda q=q, k=k, v=v, n=n: [decode_attention(q, k, v, n)]
        shapes.append(Shape(run, attend(dtype), attend(torch.float64), _SLACK[dtype]))
    return shapes


def _layer_norm_shapes(cls: str, device, dry: bool, backward: bool) -> list[Shape]:
    t, block = cls.split("-")
    dtype, block = _DTYPES[t], int(block)
    widths = [block // 2 + 88] if dry else ([768, 1024] if block == 1024 else [1280, 1600])
    shapes = []
    for n in widths:
        g = torch.Generator().manual_seed(n)
        rows = 3 if dry else 8 * 1024  # GPT-2 training: batch 8 x 1024 tokens
        x, r, dy = (torch.randn(rows, n, generator=g).to(device, dtype) for _ in range(3))
        w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype)

        if backward:  # the backward kernels alone, on the sum s the forward stored
            _, s, mean, rstd = ln._forward(x, r, w, b, _EPS)
            run = lambda s=s, w=w, b=b, dy=dy, mean=mean, rstd=rstd: list(
                ln._backward(dy, None, s, w, b, mean, rstd))
        else:
            run = lambda x=x, r=r, w=w, b=b: list(add_layer_norm(x, r, w, b, eps=_EPS))

        def eager(dt, x=x, r=r, w=w, b=b, dy=dy, s=s if backward else None):
            if backward:
                leaves = [t.to(dt).requires_grad_(True) for t in (s, w, b)]
                y = torch.nn.functional.layer_norm(leaves[0], (n,), leaves[1], leaves[2], _EPS)
                return list(torch.autograd.grad(y, leaves, dy.to(dt)))
            x_r = x.to(dt) + r.to(dt)
            return [torch.nn.functional.layer_norm(x_r, (n,), w.to(dt), b.to(dt), _EPS), x_r]

        shapes.append(Shape(run, eager(dtype), eager(torch.float64), _SLACK[dtype]))
    return shapes


def _attention_shapes(cls: str, device, dry: bool, backward: bool) -> list[Shape]:
    """GPT-2 124M's causal attention in training (8 x 1024 tokens, 12 heads, q/k/v seen as
    (B, H, T, D) views of (B, T, H, D) memory, as the model passes them); the backward cases
    return dQ, dK, dV. Dropout (p = 0.1) is compared against eager with the kernels' mask."""
    t, d, *dropout = cls.split("-")
    dtype, head_dim, p = _DTYPES[t], int(d[1:]), 0.1 if dropout else 0.0
    B, H, T = (1, 2, 70) if dry else (8, 12, 1024)
    g = torch.Generator().manual_seed(T)
    q, k, v, do = (torch.randn(B, T, H, head_dim, generator=g).to(device, dtype).transpose(1, 2)
                   for _ in range(4))
    seed = 1234
    kernel_seed = attn.dropout_seed(torch.Generator().manual_seed(seed))
    keep = attn.attention_dropout_mask(kernel_seed, B, H, T, T, p, device) if p else None
    p = attn.effective_dropout_p(p)

    def run():
        inputs = [x.detach().requires_grad_(backward) for x in (q, k, v)]
        out = attention(*inputs, causal=True, dropout_p=p,
                        generator=torch.Generator().manual_seed(seed))
        return list(torch.autograd.grad(out, inputs, do)) if backward else [out]

    def eager(dt):
        inputs = [x.to(dt).requires_grad_(backward) for x in (q, k, v)]
        s = (inputs[0] @ inputs[1].transpose(-1, -2)) / math.sqrt(head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        w = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        if keep is not None:
            w = w * keep / (1 - p)
        out = w @ inputs[2]
        return list(torch.autograd.grad(out, inputs, do.to(dt))) if backward else [out]

    return [Shape(run, eager(dtype), eager(torch.float64), _SLACK[dtype])]


def _linear_shapes(cls: str, device, dry: bool) -> list[Shape]:
    """A decode step's products (GPT-2 124M's four) at the class's rows (1, or 8 of up to 16):
    the kernel's tiles against F.linear itself ("kernel": 0), as the model calls them."""
    t, m = cls.split("-m")
    dtype, rows = _DTYPES[t], 1 if m == "1" else 8
    shapes = []
    for n, k, act in ([(70, 600, "gelu_tanh")] if dry else
                      [(2304, 768, None), (768, 768, None), (3072, 768, "gelu_tanh"), (768, 3072, None)]):
        g = torch.Generator().manual_seed(n + k)
        x, w, b = (torch.randn(*s, generator=g).to(device, dtype) for s in ((rows, k), (n, k), (n,)))
        w /= k**0.5

        def reference(dt, x=x, w=w, b=b, act=act):
            out = torch.nn.functional.linear(x.to(dt), w.to(dt), b.to(dt))
            return [torch.nn.functional.gelu(out, approximate="tanh") if act else out]

        def run(x=x, w=w, b=b, act=act):
            with torch.no_grad():
                return [lin.linear(x, w, b, act)]

        shapes.append(Shape(run, reference(dtype), reference(torch.float64), _SLACK[dtype]))
    return shapes


# kernel -> shapes of one of its shape classes (in the order a budget cuts: the decode step's
# kernel-or-cuBLAS choice first, the quickest to settle).
CASES = {
    lin.KERNEL: _linear_shapes,
    attn.FWD_KERNEL: lambda cls, device, dry: _attention_shapes(cls, device, dry, backward=False),
    attn.DKDV_KERNEL: lambda cls, device, dry: _attention_shapes(cls, device, dry, backward=True),
    attn.DQ_KERNEL: lambda cls, device, dry: _attention_shapes(cls, device, dry, backward=True),
    dec.SPLIT_KERNEL: _decode_shapes,
    ln.FWD_KERNEL: lambda cls, device, dry: _layer_norm_shapes(cls, device, dry, backward=False),
    ln.BWD_KERNEL: lambda cls, device, dry: _layer_norm_shapes(cls, device, dry, backward=True),
}


def _do_bench(fn) -> float:
    """GPU time of ``fn`` in ms, replayed as a CUDA graph: at these sizes the host-side launch
    cost (tens of us) would otherwise be what gets timed."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=20)


def _wall_clock(fn) -> float:
    """A dry run's stand-in (ms of one call on the host): it checks the plumbing, not speed."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _classes(kernel: str, dry: bool) -> dict:
    """The shape classes to sweep: all of them; one per kernel in a dry run (the plumbing)."""
    classes = tuning.space(kernel)
    return dict(list(classes.items())[:1]) if dry else classes


def tune(device, dry: bool = False, timer: Callable = _do_bench, log=print,
         save: Callable[[dict], object] | None = None, budget_s: float | None = None) -> dict:
    """{kernel: {shape class: fastest agreeing config}} over every registered space with a case.

    ``save(entries)`` runs after each shape class (so a run cut short keeps what it measured);
    past ``budget_s`` seconds no new class is started (those keep the static heuristics)."""
    entries = {}
    start = time.perf_counter()
    for kernel, make_shapes in CASES.items():
        for cls, space in _classes(kernel, dry).items():
            if budget_s is not None and time.perf_counter() - start > budget_s:
                log(f"{kernel} {cls}: skipped, past the {budget_s:.0f} s budget")
                continue
            shapes = make_shapes(cls, device, dry)
            best = None
            for config in space:
                with tuning.use({kernel: {cls: config}}):
                    bad = [a for s in shapes for out, e, r in zip(s.run(), s.eager, s.ref)
                           if not (a := agreement(out, e, r, 2.0, s.slack))["ok"]]
                    if bad:
                        worst = bad[0]
                        log(f"{kernel} {cls} {config}: REJECTED, error {worst['err']:.3g} > {worst['bound']:.3g}")
                        continue
                    ms = sum(timer(s.run) for s in shapes)
                log(f"{kernel} {cls} {config}: {ms * 1e3:.1f} us")
                if best is None or ms < best[0]:
                    best = ms, config
            if best is not None:
                entries.setdefault(kernel, {})[cls] = best[1]
                log(f"{kernel} {cls}: best {best[1]}")
                if save is not None:
                    save(entries)
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=tuning.CONFIG_DIR,
                        help="where <device name>.json goes (default: gptfast/kernels/configs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, on the GPU if any, else on CPU (needs TRITON_INTERPRET=1); "
                             "writes dry-run.json")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no new shape class after this long (the table keeps the rest)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = "dry run" if args.dry_run else torch.cuda.get_device_name()
    elif args.dry_run and INTERPRETING:
        device, name = torch.device("cpu"), "dry run"
    else:
        print("tune.py: error: no CUDA device (on CPU: TRITON_INTERPRET=1 python -m bench.tune "
              "--dry-run)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    path = args.out_dir / tuning.file_name(name)
    entries = tune(device, dry=args.dry_run, timer=_wall_clock if args.dry_run else _do_bench,
                   save=lambda entries: tuning.write(path, entries, name), budget_s=args.budget)
    tuning.write(path, entries, name)
    print(f"wrote {path} ({sum(map(len, entries.values()))} entries, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
