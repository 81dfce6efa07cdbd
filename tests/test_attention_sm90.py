"""The Hopper attention variants (gptfast/kernels/attention_sm90*.py) under the plans that pick
them: every config of their spaces against float64 with the flash rule, on sm_90's tiles and
SM count (``plans_of(90)``) and, for the persistent grids, on the interpreter's own 2 "SMs",
where each program loops over several tiles. A spy checks that the variant kernels ran and the
generic ones did not (and the reverse where no variant applies).
"""

import itertools
import sys

import pytest
import torch

from gptfast.kernels import attention, tuning
from gptfast.kernels._common import plans_of
from tests import test_attention
from tests.test_attention import DEVICE, assert_flash_rule, out_and_grads

sm90 = sys.modules["gptfast.kernels.attention_sm90"]
generic = sys.modules["gptfast.kernels.attention"]
BF16 = torch.bfloat16
KERNELS = (sm90.FWD, sm90.DQ, sm90.DKDV)


def plans(cls: str, fwd: dict, dq: dict, dkdv: dict) -> dict:
    return {sm90.FWD: {cls: fwd}, sm90.DQ: {cls: dq}, sm90.DKDV: {cls: dkdv}}


def every_config(cls: str) -> list[dict]:
    """Plans that together take every config of each kernel's space at ``cls`` once (the
    shorter spaces repeat their first config)."""
    spaces = [sm90.SPACE[kernel][cls] for kernel in KERNELS]
    return [plans(cls, *(c or space[0] for c, space in zip(configs, spaces)))
            for configs in itertools.zip_longest(*spaces)]


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels launched (generic and variant), recorded by wrapping them."""
    names = []

    class Spy:  # a variant's jitted kernel, launched as kernel[grid](...)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            names.append(self.kernel.__name__)
            return self.kernel[grid]

    class LauncherSpy:  # a generic kernel's direct launcher (_common.Kernel)
        def __init__(self, launcher):
            self.launcher = launcher

        def __call__(self, *args):
            names.append(self.launcher.name)
            return self.launcher(*args)

        def __getattr__(self, name):  # config(), name
            return getattr(self.launcher, name)

    for launcher in ("_FWD", "_PREPROCESS", "_DKDV", "_DQ"):
        monkeypatch.setattr(generic, launcher, LauncherSpy(getattr(generic, launcher)))
    for kernel in ("_fwd_sm90_kernel", "_bwd_dq_sm90_kernel", "_bwd_dkdv_sm90_kernel"):
        monkeypatch.setattr(sm90, kernel, Spy(getattr(sm90, kernel)))
    return names


VARIANTS = ["_fwd_sm90_kernel", "_bwd_dq_sm90_kernel", "_bwd_dkdv_sm90_kernel"]


@pytest.mark.parametrize("cls", list(sm90.SPACE[sm90.FWD]))
def test_every_config_under_sm90_plans(cls, launched):
    """136 queries and keys cross a 128-row tile once; D=80 takes the d128 class (padded)."""
    d = 64 if "-d64" in cls else 80
    p = 0.1 if cls.endswith("dropout") else 0.0
    with plans_of(90):
        for entries in every_config(cls):
            launched.clear()
            with tuning.use(entries):
                assert_flash_rule((1, 1, 136, d), (1, 1, 136, d), BF16, True, dropout_p=p,
                                  generator_seed=3)
            assert launched == VARIANTS, (entries, launched)


def persistent(*classes: str) -> dict:
    """Plans of each class's persistent configs (the first config where a kernel has none)."""
    return {k: {cls: next((c for c in sm90.SPACE[k][cls] if c["programs_per_sm"]),
                          sm90.SPACE[k][cls][0]) for cls in classes} for k in KERNELS}


@pytest.mark.parametrize("tq,tk,d,causal,p", [
    (97, 97, 64, True, 0.0),     # 8 query tiles of 64 (4 of 128), 2 programs per "SM"
    (70, 130, 64, True, 0.1),    # Tq < Tk: the diagonal shifted by 60
    (61, 61, 80, False, 0.0),    # padded head dim, full attention, ragged last tile
])
def test_persistent_grids_loop_over_tiles(tq, tk, d, causal, p, launched):
    cls = sm90.shape_class(BF16, 64 if d == 64 else 128, p > 0)
    with tuning.use(persistent(cls)):
        assert_flash_rule((2, 3, tq, d), (2, 3, tk, d), BF16, causal, dropout_p=p, generator_seed=5)
    assert launched == VARIANTS


def test_gpt_block_layout_and_untiled_strides(launched):
    """The model's (B, T, H, D) views take the descriptors; rows 65 elements apart (130 bytes,
    not a 16-byte multiple) cannot, and take the same kernels' pointer loads."""
    cls = "bf16-d64-dropout"
    to_bhtd = lambda t: t.transpose(1, 2)  # noqa: E731
    with plans_of(90), tuning.use(plans(cls, *(sm90.SPACE[k][cls][0] for k in KERNELS))):
        assert_flash_rule((2, 70, 2, 64), (2, 70, 2, 64), BF16, True, view=to_bhtd,
                          dropout_p=0.1, generator_seed=3)
        cut = lambda t: torch.nn.functional.pad(t, (0, 1))[..., :64]  # noqa: E731
        assert_flash_rule((1, 2, 70, 64), (1, 2, 70, 64), BF16, True, view=cut,
                          do_view=cut, dropout_p=0.1, generator_seed=3)
    assert launched == VARIANTS * 2
    x = torch.zeros(4, 65, dtype=BF16)[:, :64]
    assert not sm90._tma_ok(x) and sm90._tma_ok(torch.zeros(4, 64, dtype=BF16))


def test_exact_zeros_and_determinism_under_the_variants():
    """The generic path's exactness rules (a query that sees one key: dq = 0, that key's dk = 0)
    and bit-identical repeats."""
    with tuning.use(persistent("bf16-d64", "bf16-d64-dropout")):
        test_attention.test_single_key_score_gradients_are_exactly_zero(BF16, 0.5)
        assert_repeats_bitwise(70)


def assert_repeats_bitwise(T: int) -> None:
    """Forward and backward with dropout, twice from one generator state: bit-identical."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, T, 64, generator=gen, device=DEVICE).to(BF16) for _ in range(4))
    run = lambda: out_and_grads(  # noqa: E731
        lambda *a: attention(*a, dropout_p=0.2, generator=torch.Generator().manual_seed(5)),
        (q, k, v), do)
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_generic_kernels_where_no_variant_applies(launched):
    """fp16, lengths, no plan, or a plan for only one backward kernel: the generic kernels."""
    cls = "bf16-d64"
    both = plans(cls, *(sm90.SPACE[k][cls][0] for k in KERNELS))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 64, generator=gen).to(BF16).requires_grad_() for _ in range(3))
    generic_path = ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"]  # dQ writes delta first
    cases = [(both, dict(key_lens=torch.tensor([30])), generic_path),
             ({}, {}, generic_path),
             ({sm90.FWD: both[sm90.FWD], sm90.DQ: both[sm90.DQ]}, {},
              ["_fwd_sm90_kernel"] + generic_path[1:])]
    for entries, kwargs, expected in cases:
        launched.clear()
        with tuning.use(entries):
            attention(q, k, v, **kwargs).sum().backward()
        assert launched == expected, (entries, kwargs)
    launched.clear()
    with tuning.use(both):
        attention(*(t.detach().half() for t in (q, k, v)))
    assert launched == ["_fwd_kernel"]
    assert sm90.shape_class(torch.float16, 64, False) is None
    assert sm90.shape_class(BF16, 32, False) is None


def test_the_gate_compiles_every_plannable_config():
    """tuning's contract: a table can name only configs the static gate compiles. aot_configs()
    needs the interpreter off: a subprocess lists them (no compiling)."""
    import json
    import subprocess

    from gptfast.kernels.testing import compiler_env

    code = ("import json; from gptfast.kernels import attention_sm90 as m; "
            "print(json.dumps(sorted(c['name'] for c in m.aot_configs())))")
    out = subprocess.run([sys.executable, "-c", code], env=compiler_env(), capture_output=True,
                         text=True, check=True).stdout
    names = set(json.loads(out))
    for kernel, classes in sm90.SPACE.items():
        for cls, space in classes.items():
            d, dropout = cls.split("-")[1], int(cls.endswith("dropout"))
            for cfg in space:
                variant = sm90._variant(cfg).replace(" ", "-")
                assert f"{kernel}-{variant}-{d}-causal1-dropout{dropout}-sm90" in names, (kernel, cls, cfg)
    assert all(name.endswith("-sm90") for name in names)  # sm_90 only, as the plans


@pytest.mark.parametrize("kind", ["k_nan", "q_nan", "do_nan"])
def test_the_variants_propagate_nan(kind, launched):
    """The generic kernels' NaN rules (tests/test_nan_propagation.py) hold in the variants: a
    NaN or inf input gives NaN where the exact math does, never a zero row."""
    from tests.test_nan_propagation import check_flash

    cls = "bf16-d64-dropout" if kind == "q_nan" else "bf16-d64"
    with plans_of(90), tuning.use(plans(cls, *(sm90.SPACE[k][cls][0] for k in KERNELS))):
        check_flash(150, 150, 64, BF16, True, kind, 140, 130, 0.1 if kind == "q_nan" else 0.0)
    assert launched == VARIANTS

