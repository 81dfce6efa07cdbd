"""bench/gpu_check.sh's record of failing tests and its serial rerun (bench/_test_outcomes.py),
on a made-up suite: a test that fails alone, one that only fails behind a test that "breaks the
CUDA context" (simulated: a stand-in torch whose cuda.synchronize raises once a flag is set),
and that test itself."""

import json
import subprocess
import sys

from bench import _test_outcomes
from gptfast.kernels.testing import ROOT

SUITE = '''
import sys
import types

import pytest

BROKEN = []


def _synchronize():
    if BROKEN:
        raise RuntimeError("CUDA error: device-side assert triggered")


# a stand-in for torch, whose CUDA context the plugin checks after each test in a rerun
sys.modules["torch"] = types.SimpleNamespace(
    cuda=types.SimpleNamespace(is_initialized=lambda: True, synchronize=_synchronize))


def test_own_failure():
    assert 1 == 2, "wrong"


def test_breaks_the_context():
    BROKEN.append(1)


def test_behind_it():
    if BROKEN:
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_fine():
    pass


@pytest.mark.parametrize("name", ["a b", "x[1]"])
def test_odd_ids(name):
    assert not BROKEN
'''


def test_rerun_tells_a_cascade_from_its_origin(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    first = tmp_path / "first.jsonl"
    env = {"GPU_CHECK_OUTCOMES": str(first), "PYTHONPATH": str(ROOT)}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    proc = run("-m", "pytest", "-q", "-p", "bench._test_outcomes", "-p", "no:cacheprovider",
               "test_suite.py")
    assert proc.returncode == 1, proc.stdout[-2000:]
    session, *records = [json.loads(line) for line in first.read_text().splitlines()]
    assert session == {"outcome": "session", "rootdir": str(tmp_path)}
    failed = [r["nodeid"] for r in records]  # the first run records failures only
    assert failed == ["test_suite.py::test_own_failure", "test_suite.py::test_behind_it",
                      "test_suite.py::test_odd_ids[a b]", "test_suite.py::test_odd_ids[x[1]]"]
    assert records[0]["message"] == "AssertionError: wrong assert 1 == 2"
    # the rerun runs the failures alone: test_behind_it and the odd ids pass, being cascades of
    # test_breaks_the_context (which did not fail, so it is not rerun here)
    proc = run("-m", "bench._test_outcomes", str(first), str(tmp_path / "report.txt"),
               "--budget", "120", "-p", "no:cacheprovider")
    report = (tmp_path / "report.txt").read_text()
    assert proc.returncode == 1, report  # an own failure
    assert report.splitlines()[0] == ("4 failing tests in the first run; serial rerun: "
                                      "1 own failure, 3 cascade: passes alone")
    assert "[own failure] test_suite.py::test_own_failure\n    AssertionError: wrong" in report
    assert "[cascade: passes alone] test_suite.py::test_odd_ids[a b]" in report


def test_rerun_restarts_behind_a_test_that_breaks_the_context(tmp_path, monkeypatch):
    """A failing test that breaks the process: the tests behind it run in a new process."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    (tmp_path / "test_suite.py").write_text(SUITE.replace(
        "    BROKEN.append(1)\n", "    BROKEN.append(1)\n    assert False, 'assert on the device'\n"))
    first = [{"nodeid": f"test_suite.py::{name}", "outcome": "failed", "when": "call",
              "message": "m"} for name in ("test_breaks_the_context", "test_behind_it")]
    verdicts = _test_outcomes.rerun([r["nodeid"] for r in first], 120, ["-p", "no:cacheprovider"],
                                    tmp_path, cwd=tmp_path)
    assert verdicts == {"test_suite.py::test_breaks_the_context": "poisons",
                        "test_suite.py::test_behind_it": "passed"}
    assert "[own failure: breaks the CUDA context] test_suite.py::test_breaks_the_context" in (
        _test_outcomes.report(first, verdicts))
