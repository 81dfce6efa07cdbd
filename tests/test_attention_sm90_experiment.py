"""The decision logic of bench/experiments/attention_sm90.py on made-up timings (its GPU run and
its CPU dry run are documented in the README; they take minutes)."""

from bench.experiments import attention_sm90 as exp

sm90 = exp.sm90


def rows(cls, times):
    """Kernel rows of ``cls`` at two shapes from {(kind, item): (ms at shape 1, ms at shape 2)}."""
    out = []
    for (kind, item), per_shape in times.items():
        config = None if item.startswith("generic") else {"tag": item}
        out += [{"shape": f"s{i}", "cls": cls, "kind": kind, "item": item, "config": config, "ms": ms}
                for i, ms in enumerate(per_shape)]
    return out


def test_winners_beat_the_generic_kernels_over_every_shape_of_a_class():
    times = {("fwd", "generic fwd"): (1.0, 2.0), ("fwd", "a"): (0.5, 2.0), ("fwd", "b"): (0.4, 3.0),
             ("bwd", "generic bwd"): (3.0, 6.0), ("dq", "c"): (1.0, 2.0), ("dkdv", "d"): (1.0, 2.0),
             ("dkdv", "e"): (0.1, "error: x")}  # e failed at one shape: not a candidate
    best = exp.winners(rows("bf16-d64", times))
    assert best == {sm90.FWD: {"bf16-d64": {"tag": "a"}}, sm90.DQ: {"bf16-d64": {"tag": "c"}},
                    sm90.DKDV: {"bf16-d64": {"tag": "d"}}}
    slower = times | {("dq", "c"): (2.0, 4.0), ("fwd", "a"): (1.0, 2.5)}
    assert exp.winners(rows("bf16-d64", slower)) == {}  # no variant wins: the generic kernels stay
    assert exp.best_per_shape(rows("bf16-d64", times))[("s1", "dkdv")] == (2.0, "d")
    # the one-pass backward wins only where it beats the pair (dq c + dkdv d: 6 ms summed)
    slow_one_pass = times | {("bwd1", "f"): (2.5, 5.0)}
    assert sm90.BWD1 not in exp.winners(rows("bf16-d64", slow_one_pass))
    assert exp.fastest_configs(rows("bf16-d64", slow_one_pass))[sm90.BWD1] == {"bf16-d64": {"tag": "f"}}
    fast_one_pass = exp.winners(rows("bf16-d64", times | {("bwd1", "f"): (1.0, 2.0)}))
    assert fast_one_pass[sm90.BWD1] == {"bf16-d64": {"tag": "f"}} and sm90.DQ in fast_one_pass


def test_plans_put_one_config_in_place_and_labels_name_it():
    cls = "bf16-d64-dropout"
    cfg = sm90.SPACE[sm90.DKDV][cls][0]
    plans = exp.item_plans(cls, ("dkdv", cfg))
    assert plans == {sm90.DQ: {cls: sm90.SPACE[sm90.DQ][cls][0]}, sm90.DKDV: {cls: cfg}}
    assert exp.item_plans(cls, ("fwd", cfg)) == {sm90.FWD: {cls: cfg}}
    one = sm90.SPACE[sm90.BWD1][cls][0]
    assert exp.item_plans(cls, ("bwd1", one)) == {sm90.DQ: {cls: sm90.SPACE[sm90.DQ][cls][0]},
                                                  sm90.DKDV: {cls: sm90.SPACE[sm90.DKDV][cls][0]},
                                                  sm90.BWD1: {cls: one}}
    assert exp.label(("dkdv", cfg)) == "dkdv tma 32x128 w8s3 tiles"
    assert exp.label(("generic", "bwd")) == "generic bwd"
    assert {s.cls for s in exp.shapes(dry=False)} == set(sm90.SPACE[sm90.FWD])
    assert exp._cell(0.12345) == "0.1235" and exp._cell("error: a\nb") == "error: a b"
