"""Per-device tuning tables: the best launch config per kernel and shape class, measured on a GPU.

A kernel module registers what may be tuned: ``register(kernel, space)`` with ``space`` a dict
{shape class: [config, ...]}, each config a dict of ints (e.g. ``{"block_n": 32, "num_warps":
4, "num_stages": 3}``) that the module's ``aot_configs()`` compiles. Its launch plan asks
``lookup(kernel, shape_class, device)`` and gets one of those configs, or None: then it uses its
static heuristics. ``bench/tune.py`` measures the candidates on a GPU and writes the table.

The table of a device is ``gptfast/kernels/configs/<device name>.json`` (``table_path``: the name
torch.cuda.get_device_name gives, lower case, runs of other characters than letters and digits
turned into one '-', e.g. ``nvidia-h200.json``)::

    {"schema": 1, "device": "NVIDIA H200", "triton": "3.6",
     "kernels": {"decode_attention.split": {"bf16-d64-q1": {"block_n": 32, ...}}, ...}}

A table that does not validate (schema version, JSON types, an unknown kernel or shape class,
a config outside the registered space, or written under another Triton major.minor: its
timings and compiled code would differ) is ignored as a whole, with one warning naming the
file and the problem; ``load`` raises ``TuningTableError`` instead. A table can change speed
only: every config it can name is one the compile check covers and the tests run.
"""

import contextlib
import functools
import importlib
import json
import re
import warnings
from pathlib import Path

import torch
import triton

SCHEMA_VERSION = 1
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_SPACES: dict[str, dict[str, tuple[dict, ...]]] = {}  # kernel -> shape class -> configs
_override: dict | None = None  # set by ``use`` (bench/tune.py)
_generation = 0  # changes whenever lookup's answers may change (``use``, ``reload``)


class TuningTableError(ValueError):
    """A tuning table that cannot be used (the message names the file and the problem)."""


def register(kernel: str, space: dict[str, list[dict]]) -> None:
    """Declare the configs a table may pick for ``kernel``, per shape class."""
    for cls, configs in space.items():
        for config in configs:
            if not config or not all(_is_int(v) for v in config.values()):
                raise ValueError(f"tuning space of {kernel}/{cls}: configs are dicts of ints, got {config!r}")
    _SPACES[kernel] = {cls: tuple(configs) for cls, configs in space.items()}


def space(kernel: str) -> dict[str, tuple[dict, ...]]:
    """The registered space of ``kernel``: {shape class: configs}."""
    return _SPACES[kernel]


def registered() -> list[str]:
    """The kernels that registered a space."""
    return sorted(_SPACES)


def triton_version() -> str:
    """major.minor of the running Triton, as tables record it."""
    return ".".join(triton.__version__.split(".")[:2])


def file_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3.json``."""
    stem = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    if not stem:
        raise ValueError(f"device name {device_name!r} has no letters or digits")
    return stem + ".json"


def table_path(device_name: str) -> Path:
    return CONFIG_DIR / file_name(device_name)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(table, source: str = "tuning table") -> dict[str, dict[str, dict]]:
    """The entries {kernel: {shape class: config}} of a parsed table; TuningTableError if any
    part of it is wrong."""
    importlib.import_module("gptfast.kernels")  # every kernel module registers its space on import

    def fail(problem):
        raise TuningTableError(f"{source}: {problem}")

    if not isinstance(table, dict):
        fail(f"expected a JSON object, got {type(table).__name__}")
    if table.get("schema") != SCHEMA_VERSION:
        fail(f"schema {table.get('schema')!r}, this code reads schema {SCHEMA_VERSION}")
    if not isinstance(table.get("device"), str):
        fail("'device' must be a string (the device name)")
    if table.get("triton") != triton_version():
        fail(f"written under triton {table.get('triton')!r}, this is triton {triton_version()} "
             "(stale: re-run bench/tune.py)")
    entries = table.get("kernels")
    if not isinstance(entries, dict):
        fail("'kernels' must be an object {kernel: {shape class: config}}")
    for kernel, classes in entries.items():
        if kernel not in _SPACES:
            fail(f"unknown kernel {kernel!r} (known: {', '.join(registered())})")
        if not isinstance(classes, dict):
            fail(f"{kernel}: expected an object {{shape class: config}}")
        for cls, config in classes.items():
            allowed = _SPACES[kernel].get(cls)
            if allowed is None:
                fail(f"{kernel}: unknown shape class {cls!r} (known: {', '.join(_SPACES[kernel])})")
            if not isinstance(config, dict) or not all(_is_int(v) for v in config.values()):
                fail(f"{kernel}/{cls}: a config is an object of ints, got {config!r}")
            if config not in allowed:
                fail(f"{kernel}/{cls}: config {config} is not in the compile-checked space")
    return {kernel: dict(classes) for kernel, classes in entries.items()}


def load(path) -> dict[str, dict[str, dict]]:
    """Read and validate a table file; TuningTableError if it is unreadable or invalid."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TuningTableError(f"{path}: cannot read the table ({exc})") from None
    return validate(table, str(path))


def make_table(entries: dict[str, dict[str, dict]], device_name: str) -> dict:
    """A table for ``device_name`` from {kernel: {shape class: config}}, validated."""
    table = {"schema": SCHEMA_VERSION, "device": device_name, "triton": triton_version(),
             "kernels": entries}
    validate(table, f"table for {device_name}")
    return table


def write(path, entries: dict[str, dict[str, dict]], device_name: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(make_table(entries, device_name), indent=1, sort_keys=True) + "\n")
    return path


@functools.cache
def _device_entries(device_name: str) -> dict:
    """The table of a device, loaded once; {} without a file, or (one warning) if invalid."""
    path = table_path(device_name)
    if not path.exists():
        return {}
    try:
        return load(path)
    except TuningTableError as exc:
        warnings.warn(f"ignoring the tuning table: {exc}; the static launch heuristics are used",
                      stacklevel=3)
        return {}


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def lookup(kernel: str, shape_class: str, device: torch.device | None) -> dict | None:
    """The tuned config of ``kernel`` at ``shape_class`` on ``device``, or None (use the static
    heuristics). Only CUDA devices have tables; host-side and cached: no device sync."""
    if _override is not None:
        return _override.get(kernel, {}).get(shape_class)
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None  # (planning for a GPU on a machine without one: the static heuristics)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_entries(_device_name(index)).get(kernel, {}).get(shape_class)


@contextlib.contextmanager
def use(entries: dict[str, dict[str, dict]]):
    """Within the block, ``lookup`` answers from ``entries`` on every device (and nothing else:
    classes it lacks get the static heuristics). For bench/tune.py and tests."""
    global _override, _generation
    validate({"schema": SCHEMA_VERSION, "device": "override", "triton": triton_version(),
              "kernels": entries}, "override")
    saved, _override = _override, entries
    _generation += 1
    try:
        yield
    finally:
        _override = saved
        _generation += 1


def overridden() -> bool:
    """Whether ``use`` is in effect (then launch plans are not cached)."""
    return _override is not None


def reload() -> None:
    """Forget the loaded tables (after writing one)."""
    global _generation
    _device_entries.cache_clear()
    _generation += 1


def generation() -> int:
    """A number that changes whenever ``lookup``'s answers may change (``use``, ``reload``): the
    key under which a kernel module may cache launch plans per shape."""
    return _generation
