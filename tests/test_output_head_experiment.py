"""bench/experiments/output_head.py on CPU: every layout it times computes the head's products
(a wrong one stops the run), and its files are written."""

import json

import pytest
import torch

from bench.experiments import output_head as exp


def test_every_layout_computes_the_same_products(tmp_path):
    assert exp.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "output_head.json").read_text())["rows"]
    layouts = {(r["product"], r["layout"]) for r in rows}
    assert layouts == {(p, lay) for p in ("logits", "dX", "dW")
                       for lay in ("contiguous", "strided", "main+tail", "padded")} | {
        (p, lay) for p in ("head fwd", "head fwd+bwd") for lay in ("F.linear", "padded")}
    assert all(r["max_diff"] < 1e-5 for r in rows)
    assert "| logits | main+tail |" in (tmp_path / "output_head.md").read_text()


def test_a_layout_that_computes_something_else_stops_the_run(tmp_path, monkeypatch):
    real = exp.products

    def wrong(o):
        calls = real(o)
        calls[("dW", "padded")] = lambda: (o.g_rows.t() @ o.x)[1:o.vocab + 1]  # shifted rows
        return calls

    monkeypatch.setattr(exp, "products", wrong)
    with pytest.raises(SystemExit, match="dW padded"):
        exp.main(["--dry-run", "--out", str(tmp_path)])


def test_the_padded_width_and_main_part():
    o = exp.Operands(4, 8, 50257, torch.float32, "cpu")
    assert (o.wide, o.main) == (50304, 50240)
