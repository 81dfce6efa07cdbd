"""Every kernel under the launch plans of an A100 (sm_80) and an H100/H200 (sm_90), in the
interpreter: the tile sizes, kernel forms, grids and SM counts a GPU of that capability takes, at
small shapes that still cross every tile edge once.

``plans_of(cc)`` (or GPTFAST_PLAN_CC=80|90 for a whole run) switches the plans off CUDA; on a
GPU these tests run that GPU's own plans at the same shapes. The interpreter's default small
tiles are what the rest of the suite runs.
"""

import pytest
import torch

from gptfast.kernels import _common, attention as attention_mod  # noqa: F401
from gptfast.kernels._common import PLAN_CCS, plan_capability, plans_of

CUDA = torch.cuda.is_available()
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(params=PLAN_CCS, ids=lambda cc: f"sm{cc}")
def plan_cc(request):
    """Plans of sm_80 / sm_90 under the interpreter; on CUDA the device's own (run once)."""
    if CUDA:
        if request.param != PLAN_CCS[-1]:
            pytest.skip("on a GPU the device's own plans run (under the sm_90 id)")
        yield plan_capability(torch.device("cuda"))
        return
    with plans_of(request.param):
        yield request.param


def test_the_switch_names_a_gpu():
    cpu = torch.device("cpu")
    with plans_of(80):
        assert plan_capability(cpu) == 80 and _common.plan_sm_count(cpu) == 108
        with plans_of(None):
            assert plan_capability(cpu) is (None if _common.INTERPRETING else 90)
    with pytest.raises(ValueError, match="cc must be one of"):
        with plans_of(75):
            pass
    with pytest.raises(RuntimeError, match="GPTFAST_PLAN_CC must be one of 80, 90"):
        _common._named_cc("9.0")


# ---- attention: forward, dK/dV (both forms), dQ, dropout, GPT-2's (B, T, H, D) layout --------

# (Tq, Tk, D, dtype, dropout_p): 200 keys and queries cross a 128-row tile and a 128-key tile
# once; D=80 takes the BLOCK_D=128 plans; Tq < Tk shifts the causal diagonal.
ATTENTION_CASES = [
    (200, 200, 64, F16, 0.0),
    (200, 200, 64, BF16, 0.0),
    (200, 200, 64, F32, 0.0),
    (200, 200, 64, F16, 0.1),
    (200, 200, 64, BF16, 0.1),
    (200, 200, 64, F32, 0.1),
    (200, 200, 80, BF16, 0.1),
    (200, 200, 80, F32, 0.0),
    (40, 200, 64, BF16, 0.1),
]


@pytest.mark.parametrize("tq,tk,d,dtype,p", ATTENTION_CASES)
def test_attention_under_gpu_plans(plan_cc, tq, tk, d, dtype, p):
    from tests.test_attention import assert_flash_rule

    assert_flash_rule((1, 2, tq, d), (1, 2, tk, d), dtype, True, dropout_p=p, generator_seed=3)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_attention_gpt_block_layout_with_dropout_under_gpu_plans(plan_cc, dtype):
    """The chapter's training path: (B, T, H, D) views, causal, dropout 0.1, head dim 64 (the
    combination that failed on the H200 before the dK/dV fix)."""
    from tests.test_attention import assert_flash_rule

    to_bhtd = lambda t: t.transpose(1, 2)  # noqa: E731
    assert_flash_rule((2, 200, 3, 64), (2, 200, 3, 64), dtype, True, view=to_bhtd,
                      dropout_p=0.1, generator_seed=3)


def test_padded_attention_under_gpu_plans(plan_cc):
    from tests.test_attention import assert_padded_rule

    assert_padded_rule(150, 150, 64, BF16, True, "right", [150, 70], [150, 70], dropout_p=0.1)
    assert_padded_rule(150, 150, 64, F16, True, "left", [150, 9], None)


# ---- decode attention: GPU tiles and the SM-filling split plan ------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("tq,d", [(1, 64), (1, 128), (3, 64), (20, 80)])
def test_decode_attention_under_gpu_plans(plan_cc, dtype, tq, d):
    """One (batch, head) row of 300 cached keys splits over many programs as on a GPU."""
    from tests.test_decode_attention import check, make_inputs

    q, k, v = make_inputs(2, 2, tq, d, 320, dtype, [300, 131])
    check(q, k, v, torch.tensor([300, 131]), f"sm{plan_cc} Tq{tq} D{d} {dtype}")


# ---- LayerNorm and add + LayerNorm: the GPU's SM count sizes the backward's grid ------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("rows,n", [(300, 768), (40, 1600), (3, 8193)])
def test_layer_norm_under_gpu_plans(plan_cc, dtype, rows, n):
    from tests.test_layer_norm import _compare_add, _compare_layer_norm

    _compare_layer_norm((rows, n), dtype)
    _compare_add((rows, n), dtype)


# ---- fused linear + cross-entropy ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_linear_cross_entropy_under_gpu_plans(plan_cc, dtype):
    from tests.test_linear_cross_entropy import check, make

    h, w, t, b = make(40, 32, 3001, dtype, ignored=0.2)
    check(h, w, t, b, reduction="mean")


# ---- every tuning-table entry a table may name ----------------------------------------------


def _entries():
    from gptfast.kernels import tuning

    for kernel in tuning.registered():
        if kernel.startswith("attention_sm90."):  # sm_90 only, all run in test_attention_sm90.py
            continue
        for cls, configs in tuning.space(kernel).items():
            for config in configs:
                yield pytest.param(kernel, cls, config,
                                   id=f"{kernel}-{cls}-" + "-".join(map(str, config.values())))


def _run_class(kernel, cls):
    """One small case of a shape class, through the public op: it crosses a tile edge of the
    widest tile a table may pick (128 rows or keys; a 2048-wide row)."""
    if kernel.startswith("attention."):
        from tests.test_attention import assert_flash_rule

        dropout = 0.1 if cls.endswith("-dropout") else 0.0
        assert_flash_rule((1, 1, 130, 64), (1, 1, 130, 64), BF16, True, dropout_p=dropout,
                          generator_seed=3)
    elif kernel.startswith("decode_attention."):
        from tests.test_decode_attention import check, make_inputs

        q, k, v = make_inputs(2, 1, 1, 64, 80, BF16, [70, 33])
        check(q, k, v, torch.tensor([70, 33]), cls)
    elif kernel.startswith("linear."):
        from tests.test_linear import check_linear

        dtype, rows = {"bf16": BF16, "fp16": torch.float16, "fp32": F32}[cls.split("-")[0]], cls.split("-m")[1]
        check_linear(int(rows), 70, 600, dtype, True, "gelu_tanh")  # ragged N and K
    else:
        from tests.test_layer_norm import _compare_add, _compare_layer_norm

        dtype, block = {"bf16": BF16, "fp32": F32}[cls.split("-")[0]], int(cls.split("-")[1])
        _compare_layer_norm((3, block // 2 + 88), dtype)
        _compare_add((3, block // 2 + 88), dtype)


@pytest.mark.parametrize("kernel,cls,config", list(_entries()))
def test_every_tuning_entry_under_gpu_plans(plan_cc, kernel, cls, config):
    """Each config a tuning table may pick (every TUNING_SPACE entry), in its shape class, with
    the other launches of the call on the plans of sm_80 / sm_90."""
    from gptfast.kernels import tuning

    with tuning.use({kernel: {cls: config}}):
        _run_class(kernel, cls)
