"""The GPU check's record of failing tests, and its serial rerun that tells a cascade from its origin.

A pytest plugin (``-p bench._test_outcomes``) and a command. With GPU_CHECK_OUTCOMES=FILE set,
the plugin appends one JSON line per test outcome to FILE: every failure or error (node id,
phase, the first line of its message), and under GPU_CHECK_RERUN=1 every passing test too.
Under xdist only the controller writes (it sees every worker's reports). In a rerun the plugin
also synchronises CUDA after each test: if that raises, the test left the CUDA context broken
(a device-side assert makes every later CUDA call in the process fail), it is recorded as
``poisons`` and the session stops.

    python -m bench._test_outcomes FIRST_RUN.jsonl REPORT.txt [--budget S] [PYTEST ARGS...]

reruns the tests that failed in FIRST_RUN.jsonl, serially, in order, from the first run's
rootdir (node ids are relative to it): after a test that poisons the context, the ones behind
it run again in a new process. REPORT.txt names each failure "own failure" (it fails alone
too), "own failure: breaks the CUDA context", "cascade" (it passes alone: another test broke its
process), "not rerun" (past the budget) or "not found by the rerun", with the first run's
message. The exit status is 0 unless a test failed alone.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


# --- the plugin -------------------------------------------------------------------------------


def _message(report) -> str:
    """The failure's message (the exception line), on one line; else the report's last line."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return " ".join(crash.message.split())[:300]
    lines = [line.strip() for line in str(report.longrepr or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _write(config, record: dict) -> None:
    path = os.environ.get("GPU_CHECK_OUTCOMES")
    if path and not hasattr(config, "workerinput"):  # the xdist controller, or a plain run
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


_CONFIG = None  # the session's config: the report hooks receive no config


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config
    _write(config, {"outcome": "session", "rootdir": str(config.rootpath)})  # node ids' base


def pytest_runtest_logreport(report):
    if report.failed:
        _write(_CONFIG, {"nodeid": report.nodeid, "outcome": "failed", "when": report.when,
                         "message": _message(report)})
    elif report.when == "call" and report.passed and os.environ.get("GPU_CHECK_RERUN") == "1":
        _write(_CONFIG, {"nodeid": report.nodeid, "outcome": "passed"})


def pytest_collectreport(report):
    if report.failed:
        _write(_CONFIG, {"nodeid": report.nodeid, "outcome": "failed", "when": "collect",
                         "message": _message(report)})


def pytest_runtest_teardown(item, nextitem):
    torch = sys.modules.get("torch")
    if os.environ.get("GPU_CHECK_RERUN") != "1" or torch is None or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except Exception:
        _write(item.config, {"nodeid": item.nodeid, "outcome": "poisons"})
        item.session.shouldstop = f"{item.nodeid} left the CUDA context broken"


# --- the rerun --------------------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rerun(failed: list[str], budget_s: float, pytest_args: list[str], work: Path,
          cwd: Path | None = None) -> dict:
    """{node id: "failed" | "passed" | "poisons"} of a serial rerun of ``failed``, in order (in
    ``cwd``; its files in ``work``); a test missing from it was not rerun (past the budget)."""
    verdicts, todo, deadline = {}, list(failed), time.monotonic() + budget_s
    for attempt in range(len(failed)):
        left = deadline - time.monotonic()
        if not todo or left < 5:
            return verdicts
        log = work / f"rerun-{attempt}.jsonl"
        env = {**os.environ, "GPU_CHECK_OUTCOMES": str(log), "GPU_CHECK_RERUN": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "bench._test_outcomes", *pytest_args,
               *todo]
        try:
            subprocess.run(cmd, cwd=cwd, env=env, timeout=left, stdout=sys.stdout,
                           stderr=sys.stderr)
        except subprocess.TimeoutExpired:
            return verdicts
        for record in (r for r in _read(log) if r["outcome"] != "session"):
            verdict = record["outcome"]
            if verdict == "poisons" or record["nodeid"] not in verdicts:
                verdicts[record["nodeid"]] = verdict
        poisoned = [r["nodeid"] for r in _read(log) if r["outcome"] == "poisons"]
        if not poisoned:
            break  # the process ran to its end
        todo = todo[todo.index(poisoned[0]) + 1:] if poisoned[0] in todo else []
    return {nodeid: verdicts.get(nodeid, "missing") for nodeid in failed}


_NAMES = {"failed": "own failure", "poisons": "own failure: breaks the CUDA context",
          "passed": "cascade: passes alone", "missing": "not found by the rerun",
          None: "not rerun (past the budget)"}


def report(first: list[dict], verdicts: dict) -> str:
    failed = list(dict.fromkeys(r["nodeid"] for r in first if r["outcome"] == "failed"))
    message = {r["nodeid"]: r["message"] for r in reversed(first) if r["outcome"] == "failed"}
    counts = {name: sum(_NAMES[verdicts.get(n)] == name for n in failed) for name in _NAMES.values()}
    lines = [f"{len(failed)} failing tests in the first run; serial rerun: "
             + ", ".join(f"{n} {name}" for name, n in counts.items() if n)]
    for nodeid in failed:
        lines += [f"[{_NAMES[verdicts.get(nodeid)]}] {nodeid}", f"    {message[nodeid]}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    first_path, report_path, *rest = argv
    budget = 60.0
    if rest[:1] == ["--budget"]:
        budget, rest = float(rest[1]), rest[2:]
    first = _read(Path(first_path))
    failed = list(dict.fromkeys(r["nodeid"] for r in first if r["outcome"] == "failed"))
    rootdir = next((r["rootdir"] for r in first if r["outcome"] == "session"), None)
    work = Path(report_path).resolve().parent
    verdicts = rerun(failed, budget, rest, work, cwd=rootdir) if failed else {}
    Path(report_path).write_text(report(first, verdicts))
    print(Path(report_path).read_text(), end="")
    return 1 if any(v in ("failed", "poisons") for v in verdicts.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
