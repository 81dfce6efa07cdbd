"""Options, session fixtures and the end-of-run summary of the benchmark suite.

    pytest bench --benchmark-only                  # every case (long on a GPU)
    pytest bench --benchmark-only --quick          # every op and provider at the telling shapes
    pytest bench --benchmark-only --results-dir D  # summary files under D

The cases of a module come from its ``gpu_cases(quick)`` (parametrised as ``case``). The summary
(Markdown + JSON + PNG plots) goes to ``bench/results/<device-slug>/`` by default; without CUDA,
to ``bench/results/cpu/`` (git-ignored), so that a CPU run never overwrites GPU results; such a
run's summary ends with the static kernel report for sm_90 (``python -m gptfast.kernels.report``).
"""

import datetime
import functools
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from bench import _runner
from bench._metrics import device_name, device_slug
from bench._report import markdown, write_summary
from gptfast.kernels._common import INTERPRETING

BENCH_DIR = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("gptfast bench")
    group.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="run only the quick cases: every op and provider at a few telling shapes",
    )
    group.addoption(
        "--no-static-report",
        action="store_true",
        default=False,
        help="without a GPU, leave the static kernel report out of the summary (it compiles "
             "every kernel of the report: ~1 minute on 2 cores)",
    )
    group.addoption(
        "--results-dir",
        default=None,
        help="where to write the summary (default bench/results/<device-slug>/)",
    )


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and hasattr(metafunc.module, "gpu_cases"):
        quick = metafunc.config.getoption("quick", default=False)
        cases = metafunc.module.gpu_cases(quick)
        metafunc.parametrize("case", [_runner.param(c, _runner.GPU_ONLY) for c in cases])


@pytest.fixture(scope="session")
def device() -> str:
    """Where the timing cases run."""
    return "cuda"


@pytest.fixture(scope="session")
def device_limits():
    """The device's copy bandwidth and matmul throughput, measured once per run (GPU only)."""
    if torch.cuda.is_available() and not _runner.LIMITS:
        _runner.LIMITS.update(_runner.measure_limits())
    return _runner.LIMITS


@functools.cache
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _meta(config) -> dict:
    import triton

    quick = config.getoption("quick", default=False)
    args = " ".join(config.invocation_params.args)
    return {
        "device": device_name(),
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "run": f"{'quick' if quick else 'full'} (pytest {args})",
        "commit": _git_commit(),
        "limits": dict(_runner.LIMITS),
    }


def _static_report() -> str:
    """What can be said about speed without a GPU: the static kernel report's sm_90 table
    (``python -m gptfast.kernels.report``: registers, spills, occupancy, waves, main-loop SASS)."""
    from gptfast.kernels import report

    try:
        return report.markdown(report.collect((90,)), 90)
    except Exception as exc:  # the summary is written all the same
        return f"The static kernel report failed: {type(exc).__name__}: {exc}"[:2000]


def results_dir(config) -> Path:
    given = config.getoption("results_dir", default=None)
    return Path(given) if given else BENCH_DIR / "results" / device_slug(device_name())


def pytest_configure(config):
    given = config.getoption("results_dir", default=None)
    if given and Path(given).exists() and not Path(given).is_dir():
        raise pytest.UsageError(f"--results-dir {given}: a file; give a directory for the summary")


NO_INTERPRETER = pytest.mark.skip(
    reason="no CUDA device and TRITON_INTERPRET=0: the interpreter cases need the Triton "
    "interpreter (unset TRITON_INTERPRET or set it to 1)"
)


def pytest_collection_modifyitems(config, items):
    config._gptfast_bench_items = sum(BENCH_DIR in Path(item.path).parents for item in items)
    if torch.cuda.is_available() or INTERPRETING:
        return
    for item in items:
        if any(mark == _runner.INTERPRETER_ONLY.mark for mark in item.iter_markers("skipif")):
            item.add_marker(NO_INTERPRETER)


def _stem(config) -> str:
    return "quick" if config.getoption("quick", default=False) else "summary"


def pytest_runtest_teardown(item, nextitem):
    """Rewrite the summary (without plots) after each new record, so that a run cut short
    (a timeout) still leaves the cases it finished."""
    if len(_runner.RECORDS) != getattr(item.config, "_gptfast_written", 0):
        config = item.config
        config._gptfast_written = len(_runner.RECORDS)
        meta, where = _meta(config), results_dir(config)
        write_summary(_runner.RECORDS, meta, where, _stem(config), plots=False)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the summary table and write it (md, json, png) when bench cases were collected."""
    if config.option.collectonly or not getattr(config, "_gptfast_bench_items", 0):
        return
    meta = _meta(config)
    if not meta["gpu"] and not config.getoption("no_static_report"):
        meta["static_report"] = _static_report()
    paths = write_summary(_runner.RECORDS, meta, results_dir(config), _stem(config))
    tr = terminalreporter
    tr.section("gptfast benchmark summary")
    tr.write_line(markdown(_runner.RECORDS, meta))
    tr.write_line("written: " + ", ".join(str(p) for p in paths))
