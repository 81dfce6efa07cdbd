"""Per-device tuning tables (gptfast/kernels/tuning.py) and bench/tune.py's sweep: its dry run at
tiny shapes runs on the GPU where there is one, else in the interpreter on CPU.

A table can only change speed: anything wrong in it (schema, types, names, a config outside the
compile-checked space, another Triton version) is an error from ``load`` and, for the table of
a device, one warning and the static heuristics.
"""

import importlib
import json
import warnings

import pytest
import torch

from bench import tune
from gptfast.kernels import tuning

attn = importlib.import_module("gptfast.kernels.attention")
dec = importlib.import_module("gptfast.kernels.decode_attention")
ln = importlib.import_module("gptfast.kernels.layer_norm")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter
CLS = "bf16-d64-q1"
GOOD = {dec.SPLIT_KERNEL: {CLS: dict(block_n=16, num_warps=4, num_stages=3)},
        ln.BWD_KERNEL: {"bf16-1024": dict(rows=2, num_warps=8, num_stages=3)}}


def _table(**changes):
    table = {"schema": tuning.SCHEMA_VERSION, "device": "NVIDIA H200", "triton": tuning.triton_version(),
             "kernels": json.loads(json.dumps(GOOD))}
    table.update(changes)
    return table


def test_file_names():
    assert tuning.file_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3.json"
    assert tuning.file_name("NVIDIA H200") == "nvidia-h200.json"
    assert tuning.table_path("A100-SXM4-40GB").parent == tuning.CONFIG_DIR
    with pytest.raises(ValueError, match="no letters or digits"):
        tuning.file_name(" / ")


def test_round_trip(tmp_path):
    path = tuning.write(tmp_path / "t.json", GOOD, "NVIDIA H200")
    assert tuning.load(path) == GOOD
    assert json.loads(path.read_text())["triton"] == tuning.triton_version()


def _bad_config(value):
    kernels = json.loads(json.dumps(GOOD))
    kernels[dec.SPLIT_KERNEL][CLS] = value
    return _table(kernels=kernels)


@pytest.mark.parametrize("table,match", [
    ([1, 2], "expected a JSON object"),
    (_table(schema=2), "schema 2, this code reads schema 1"),
    (_table(schema="1"), "schema '1'"),
    (_table(device=3), "'device' must be a string"),
    (_table(triton="2.0"), r"written under triton '2.0'.*stale"),
    (_table(kernels=[]), "'kernels' must be an object"),
    (_table(kernels={"no_such.kernel": {}}), "unknown kernel 'no_such.kernel'"),
    (_table(kernels={dec.SPLIT_KERNEL: {"fp64-d64-q1": {}}}), "unknown shape class 'fp64-d64-q1'"),
    (_table(kernels={dec.SPLIT_KERNEL: [1]}), "expected an object"),
    (_bad_config(dict(block_n=16.0, num_warps=4, num_stages=3)), "a config is an object of ints"),
    (_bad_config(dict(block_n=16, num_warps=True, num_stages=3)), "a config is an object of ints"),
    (_bad_config("fast"), "a config is an object of ints"),
    (_bad_config(dict(block_n=256, num_warps=4, num_stages=3)), "not in the compile-checked space"),
    (_bad_config(dict(block_n=16, num_warps=4)), "not in the compile-checked space"),
    (_bad_config(dict(block_n=16, num_warps=4, num_stages=3, extra=1)), "not in the compile-checked space"),
])
def test_bad_tables_are_errors(tmp_path, table, match):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    with pytest.raises(tuning.TuningTableError, match=match):
        tuning.load(path)


def test_unreadable_table(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(tuning.TuningTableError, match="cannot read the table"):
        tuning.load(tmp_path / "t.json")
    with pytest.raises(tuning.TuningTableError, match="cannot read the table"):
        tuning.load(tmp_path / "missing.json")


def test_device_table_bad_is_ignored_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning.reload()
    try:
        (tmp_path / "gpu-x.json").write_text(json.dumps(_table(triton="1.0")))
        with pytest.warns(UserWarning, match=r"ignoring the tuning table: .*gpu-x.json: written under"):
            assert tuning._device_entries("GPU X") == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            assert tuning._device_entries("GPU X") == {}
        tuning.write(tmp_path / "gpu-y.json", GOOD, "GPU Y")
        assert tuning._device_entries("GPU Y") == GOOD
        assert tuning._device_entries("GPU Z") == {}  # no table: no warning
    finally:
        tuning.reload()


def test_lookup_off_cuda_and_override():
    assert tuning.lookup(dec.SPLIT_KERNEL, CLS, torch.device("cpu")) is None
    assert tuning.lookup(dec.SPLIT_KERNEL, CLS, None) is None
    with tuning.use(GOOD):
        assert tuning.lookup(dec.SPLIT_KERNEL, CLS, None) == GOOD[dec.SPLIT_KERNEL][CLS]
        assert tuning.lookup(dec.SPLIT_KERNEL, "fp16-d64-q1", None) is None
        assert tuning.lookup(ln.FWD_KERNEL, "bf16-1024", None) is None
    assert tuning.lookup(dec.SPLIT_KERNEL, CLS, None) is None
    with pytest.raises(tuning.TuningTableError, match="not in the compile-checked space"):
        with tuning.use({dec.SPLIT_KERNEL: {CLS: dict(block_n=7, num_warps=4, num_stages=3)}}):
            pass


def test_register_rejects_non_int_configs():
    with pytest.raises(ValueError, match="dicts of ints"):
        tuning.register("x.test", {"c": [dict(block_n=1.5)]})
    assert "x.test" not in tuning.registered()


def test_layer_norm_plans_follow_the_table():
    fwd = dict(rows=2, num_warps=4)
    bwd = dict(rows=4, num_warps=16, num_stages=2)
    static_fwd, static_bwd = ln._fwd_plan(768, torch.bfloat16), ln._bwd_plan(768, torch.bfloat16)
    with tuning.use({ln.FWD_KERNEL: {"bf16-1024": fwd}, ln.BWD_KERNEL: {"bf16-1024": bwd}}):
        assert ln._fwd_plan(768, torch.bfloat16) == (ln._fwd_rows_kernel, dict(BLOCK_N=1024, ROWS=2), 4)
        assert ln._bwd_plan(1000, torch.bfloat16) == (
            dict(WHOLE_ROW=True, BLOCK_N=1024, ROWS=4, NUM_STAGES=2), 16)
        assert ln._fwd_plan(768, torch.float32) == ln._fwd_plan(768, torch.float32)  # static
        assert ln._bwd_plan(1600, torch.bfloat16) == ln._bwd_plan(1600, torch.bfloat16)
    assert (ln._fwd_plan(768, torch.bfloat16), ln._bwd_plan(768, torch.bfloat16)) == (static_fwd, static_bwd)


def test_attention_plans_follow_the_table():
    """Forward, dQ and dropout-free dK/dV launches come from the table at their shape class
    (bf16, D=64, with or without dropout); other classes and dropout dK/dV stay static."""
    from gptfast.kernels._common import Launch

    fwd = dict(block_m=64, block_n=64, num_warps=4, num_stages=3)
    dq = dict(block_m=64, block_n=32, num_warps=4, num_stages=3)
    dkdv = dict(block_m=32, block_n=64, num_warps=4, num_stages=3)
    static = [attn._fwd_launch(64, torch.bfloat16, False), attn._dkdv_launch(64, torch.bfloat16, True),
              attn._fwd_launch(64, torch.float16, False), attn._dq_launch(128, torch.bfloat16, True)]
    table = {attn.FWD_KERNEL: {"bf16-d64-dropout": fwd}, attn.DQ_KERNEL: {"bf16-d64-dropout": dq},
             attn.DKDV_KERNEL: {"bf16-d64": dkdv}}
    with tuning.use(table):
        assert attn._fwd_launch(64, torch.bfloat16, True) == Launch(**fwd)
        assert attn._dq_launch(64, torch.bfloat16, True) == Launch(**dq)
        assert attn._dkdv_launch(64, torch.bfloat16, False) == Launch(**dkdv)
        assert [attn._fwd_launch(64, torch.bfloat16, False), attn._dkdv_launch(64, torch.bfloat16, True),
                attn._fwd_launch(64, torch.float16, False), attn._dq_launch(128, torch.bfloat16, True)
                ] == static
    with pytest.raises(tuning.TuningTableError, match="not in the compile-checked space"):
        with tuning.use({attn.FWD_KERNEL: {"bf16-d64": dict(fwd, num_warps=2)}}):
            pass


def test_tune_attention_dropout_candidates_agree():
    """bench/tune.py's dropout classes compare the kernels against eager with the kernels' mask:
    the static launches agree (forward, and the backward's dQ, dK, dV)."""
    for kernel in (attn.FWD_KERNEL, attn.DQ_KERNEL):
        for shape in tune.CASES[kernel]("bf16-d64-dropout", DEVICE, True):
            results = [tune.agreement(o, e, r, 2.0, shape.slack)
                       for o, e, r in zip(shape.run(), shape.eager, shape.ref)]
            assert len(results) == (1 if kernel == attn.FWD_KERNEL else 3)
            assert all(a["ok"] for a in results), results


def test_tune_dry_run_writes_a_table_the_loader_reads(tmp_path):
    """bench/tune.py's sweep at tiny shapes (one shape class per kernel; on CPU in the
    interpreter), with a mocked timer that makes one config of each class the fastest; every
    candidate runs and agrees (none rejected), and the table round-trips through the loader."""
    favourite = {k: {cls: space[len(space) // 2] for cls, space in tune._classes(k, True).items()}
                 for k in tune.CASES}
    current = {}

    def timer(fn):
        fn()
        return 1.0 if current.get("config") in current.get("favourites", ()) else 2.0

    lines = []
    real_use = tuning.use

    def spy(entries):  # note the config under test for the mocked timer
        (kernel, classes), = entries.items()
        (cls, config), = classes.items()
        current.update(config=config, favourites=[favourite[kernel][cls]])
        return real_use(entries)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "use", spy)
        saved = []
        entries = tune.tune(DEVICE, dry=True, timer=timer, log=lines.append,
                            save=lambda e: saved.append(json.loads(json.dumps(e))))
    assert entries == favourite
    assert len(saved) == sum(map(len, favourite.values())) and saved[-1] == favourite  # per class
    assert not [line for line in lines if "REJECTED" in line]
    path = tuning.write(tmp_path / tuning.file_name("dry run"), entries, "dry run")
    assert tuning.load(path) == favourite


def test_tune_budget_starts_no_class_past_it():
    lines = []
    assert tune.tune(DEVICE, dry=True, log=lines.append, budget_s=-1.0) == {}
    assert len(lines) == len(tune.CASES) and all("budget" in line for line in lines)
