"""The one-pass Hopper backward (gptfast/kernels/attention_sm90_bwd1.py) under the plans that
pick it: every config of its space against float64 with the flash rule (causal and not, Tq < Tk,
ragged tiles, dropout, D = 64 and a padded 128), its exact zeros and NaNs, bitwise-equal repeats,
and the interpreter's check of its dQ order. A spy checks which kernels ran."""

import sys

import pytest
import torch

from gptfast.kernels import attention, tuning
from gptfast.kernels._common import plans_of
from tests import test_attention
from tests.test_attention import assert_flash_rule
from tests.test_attention_sm90 import assert_repeats_bitwise

sm90 = sys.modules["gptfast.kernels.attention_sm90"]
BF16 = torch.bfloat16
ONE_PASS = ["_bwd1_preprocess_kernel", "_bwd1_sm90_kernel"]


@pytest.fixture
def launched(monkeypatch):
    """The names of the Hopper variant kernels launched (as kernel[grid](...))."""
    names = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            names.append(self.kernel.__name__)
            return self.kernel[grid]

    for kernel in ("_fwd_sm90_kernel", "_bwd_dq_sm90_kernel", "_bwd_dkdv_sm90_kernel", *ONE_PASS):
        monkeypatch.setattr(sm90, kernel, Spy(getattr(sm90, kernel)))
    return names


def one_pass(cls: str, cfg: dict | None = None) -> dict:
    """Plans naming the one-pass backward (and the two-launch pair it goes before) at ``cls``."""
    first = {k: {cls: sm90.SPACE[k][cls][0]} for k in (sm90.DQ, sm90.DKDV)}
    return first | {sm90.BWD1: {cls: cfg or sm90.SPACE[sm90.BWD1][cls][0]}}


@pytest.mark.parametrize("cfg", sm90.SPACE[sm90.BWD1]["bf16-d64"], ids=sm90._variant)
def test_every_d64_config(cfg, launched):
    """136 queries and keys: 3 query tiles of 64 (the last ragged), 2 key tiles of 128; 2 x 3
    heads, so key tiles of several heads interleave in program order."""
    with plans_of(90), tuning.use(one_pass("bf16-d64", cfg)):
        assert_flash_rule((2, 3, 136, 64), (2, 3, 136, 64), BF16, True)
    assert launched == ONE_PASS


@pytest.mark.parametrize("cls", [c for c in sm90.SPACE[sm90.BWD1] if c != "bf16-d64"])
def test_every_other_class(cls, launched):
    d = 64 if "-d64" in cls else 80  # the d128 class: a padded head dim
    p = 0.1 if cls.endswith("dropout") else 0.0
    with plans_of(90):
        for cfg in sm90.SPACE[sm90.BWD1][cls]:
            with tuning.use(one_pass(cls, cfg)):
                assert_flash_rule((1, 2, 97, d), (1, 2, 97, d), BF16, True, dropout_p=p,
                                  generator_seed=3)
    assert launched == ONE_PASS * len(sm90.SPACE[sm90.BWD1][cls])


@pytest.mark.parametrize("tq,tk,d,causal,p", [
    (70, 200, 64, True, 0.1),    # Tq < Tk: the diagonal shifted by 130, 7 key tiles of 32
    (61, 200, 64, False, 0.0),   # full attention: both key tiles add to every query tile
    (130, 130, 128, False, 0.1),  # D = 128, dropout, ragged last query tile, 5 key tiles
    (40, 40, 64, True, 0.0),     # one key tile: it is first and last, no accumulator
])
def test_masks_and_shapes(tq, tk, d, causal, p, launched):
    cls = sm90.shape_class(BF16, d, p > 0)
    narrowest = min(sm90.SPACE[sm90.BWD1][cls], key=lambda c: c["block_n"])  # the most key tiles
    with tuning.use(one_pass(cls, narrowest)):
        assert_flash_rule((2, 2, tq, d), (2, 2, tk, d), BF16, causal, dropout_p=p,
                          generator_seed=5)
    assert launched == ONE_PASS


def test_exact_zeros_nan_and_bitwise_repeats():
    """The generic path's exactness rules (a query that sees one key: dq = 0, that key's dk = 0),
    its NaN rules, and bit-identical repeats (the dQ additions in key-tile order)."""
    from tests.test_nan_propagation import check_flash

    with tuning.use(one_pass("bf16-d64") | one_pass("bf16-d64-dropout")):
        test_attention.test_single_key_score_gradients_are_exactly_zero(BF16, 0.5)
        for kind in ("k_nan", "q_nan", "do_nan"):
            check_flash(150, 150, 64, BF16, True, kind, 140, 130, 0.1 if kind == "q_nan" else 0.0)
        assert_repeats_bitwise(300)


def test_an_out_of_order_launch_raises_instead_of_hanging(monkeypatch):
    """A key tile that finds its query tile's counter at another turn than its own (what a
    program id order other than the key tiles' would give) would spin forever on a GPU; the
    interpreter flags it and the launch raises. Simulated by counters the preprocess leaves
    at 5 instead of 0."""
    real = sm90._bwd1_preprocess_kernel

    class Stale:
        def __getitem__(self, grid):
            def launch(o, do, delta, count, *args, **kwargs):
                real[grid](o, do, delta, count, *args, **kwargs)
                count.fill_(5)
            return launch

    monkeypatch.setattr(sm90, "_bwd1_preprocess_kernel", Stale())
    q = torch.randn(1, 1, 200, 64).to(BF16).requires_grad_()
    with tuning.use(one_pass("bf16-d64")), pytest.raises(RuntimeError, match="ran before the key"):
        attention(q, q, q, causal=True).sum().backward()


def test_a_persistent_config_is_refused_before_any_launch(launched):
    """(The space has none: a table cannot name one; a direct call is refused.)"""
    cfg = {**sm90.SPACE[sm90.BWD1]["bf16-d64"][0], "programs_per_sm": 1}
    assert not any(c["programs_per_sm"] for s in sm90.SPACE[sm90.BWD1].values() for c in s)
    t = torch.zeros(1, 1, 64, 64, dtype=BF16)
    lse2 = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="cfg: the one-pass backward takes one program per tile"):
        sm90.backward1(cfg, t, t, t, t, t, lse2, t, t, t, True, 0.125, None, 0.0, 64)
    assert launched == []


def test_the_pair_serves_a_backward_without_dk(launched):
    """Only dq wanted (k, v frozen): the one-pass kernel would compute dK/dV for nothing; the
    two-launch pair's dQ kernel runs alone."""
    q = torch.randn(1, 1, 64, 64).to(BF16).requires_grad_()
    kv = torch.randn(1, 1, 64, 64).to(BF16)
    with tuning.use(one_pass("bf16-d64")):
        attention(q, kv, kv, causal=True).sum().backward()
    assert launched == ["_bwd_dq_sm90_kernel"] and q.grad is not None
