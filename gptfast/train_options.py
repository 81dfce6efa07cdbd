"""The options of a training run: ``TrainOptions``, their checks, and the ``train`` flags.

Each option has its field's declared type: a value of another type is a TypeError naming the
option (numpy numbers are numbers, bools are not; flags are True or False), a NaN or inf number
a ValueError; then every value is checked, before anything is read, written or launched.
"""

import argparse
import dataclasses
import math
import numbers
import os
import types
import typing
from pathlib import Path

import numpy as np
import torch

from gptfast.model import KERNEL_CHOICES, check_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _opt(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainOptions:
    """Every option of a run; ``python -m gptfast train`` has one flag per field."""

    data: str | None = _opt(None, "a directory made by `python -m gptfast prepare` (required)")
    out: str = _opt("out", "run directory: ckpt.pt, log.jsonl, loss.png, model.safetensors")
    config: str = _opt("124M", "GPT-2 config name (124M, 355M, ...)")
    config_json: str | None = _opt(None, "a JSON file holding a chapter config dict instead")
    drop_rate: float | None = _opt(None, "dropout, overriding the config's")
    init: str = _opt("random", "'random' or a weights file (safetensors or chapter .pth)")
    batch_size: int = _opt(8, "sequences per micro-step, all ranks together")
    seq_len: int | None = _opt(None, "tokens per sequence (default: the context length)")
    grad_accum: int = _opt(1, "micro-steps per optimizer step")
    lr: float = _opt(6e-4, "peak learning rate, reached after the warmup")
    min_lr: float = _opt(6e-5, "the cosine schedule's floor, reached at the last step")
    warmup_steps: int = _opt(100, "steps of linear warmup")
    weight_decay: float = _opt(0.1, "AdamW weight decay, on matrices only")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "maximum global gradient norm; 0: no clipping")
    dtype: str = _opt("fp32", "fp32, or autocast to bf16 / fp16 (fp16 with a GradScaler)")
    kernels: str = _opt("auto", "LayerNorm/attention kernels (auto: triton on CUDA)")
    compile: bool = _opt(False, "torch.compile the training loss as one graph (GPTModel.compile_loss)")
    fsdp: bool = _opt(False, "shard with FSDP2 instead of DDP (under torchrun)")
    seed: int = _opt(123, "seed of the initial weights, dropout and data order")
    max_steps: int | None = _opt(None, "optimizer steps (this or --max-tokens is required)")
    max_tokens: int | None = _opt(None, "training tokens (with both, the fewer steps win)")
    eval_every: int = _opt(100, "steps between validation losses (and at the end)")
    eval_batches: int = _opt(10, "validation batches (fixed: the first of val.bin)")
    sample_every: int = _opt(100, "steps between greedy samples of --prompt; 0: never")
    prompt: str = _opt("Every effort moves you", "the prompt of the samples")
    sample_tokens: int = _opt(30, "new tokens per sample")
    ckpt_every: int = _opt(100, "steps between checkpoints (also at the end and on a signal)")
    device: str | None = _opt(None, "cpu or cuda (default: cuda if present; cuda: GPU LOCAL_RANK)")
    resume: str | None = _opt(None, "continue the run in this directory, with its options")


PATH_OPTIONS = ("data", "out", "init", "config_json", "resume")  # str or os.PathLike
MAX_SEED = 2**63  # seeds in [0, MAX_SEED): numpy's data order and torch's generators take them

# Options that shape the trajectory: a resumed run must keep them (the others may change).
TRAJECTORY = ("data", "config", "config_json", "drop_rate", "init", "batch_size", "seq_len",
              "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2",
              "grad_clip", "dtype", "seed", "max_steps", "max_tokens")


def _typed(name: str, kind: type, value):
    """``value`` as the option's declared type, or a TypeError naming the option: numpy numbers
    are numbers, bools are not; flags are True or False; floats are finite."""
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError(f"{name} must be True or False, got {value!r}")
    if isinstance(value, (bool, np.bool_)) and kind in (int, float):
        raise TypeError(f"{name} must be {'an int' if kind is int else 'a number'}, got {value!r}")
    if kind is int:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        return int(value)
    if kind is float:
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(value, os.PathLike) and name in PATH_OPTIONS:
        return os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str{' or a path' * (name in PATH_OPTIONS)}, got {value!r}")
    return value


def typed_options(options: dict) -> TrainOptions:
    """The options as ``TrainOptions``, each of its field's type (None where the field allows)."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; see gptfast.TrainOptions")
    opts = TrainOptions(**options)
    for f in dataclasses.fields(TrainOptions):
        value = getattr(opts, f.name)
        if value is not None or not isinstance(f.type, types.UnionType):  # None: for X | None
            setattr(opts, f.name, _typed(f.name, _kind(f), value))
    return opts


def _kind(field) -> type:
    """A field's type, X for X | None."""
    if isinstance(field.type, types.UnionType):
        return next(t for t in typing.get_args(field.type) if t is not type(None))
    return field.type


def resolve_device(name: str | None, what: str = "device") -> torch.device:
    """The device a run uses: cpu or cuda[:N] (default: cuda if present), checked (``what``
    names the option in messages)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {name!r}: gptfast runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {name!r}: this torch has no CUDA device (use cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{what} {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def make_options(options: dict) -> TrainOptions:
    """Checked options: every problem named before anything is read, written or launched."""
    opts = typed_options(options)
    for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "ckpt_every"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(opts, name)!r}")
    for name in ("seq_len", "max_steps", "max_tokens"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("warmup_steps", "sample_every", "sample_tokens"):
        if getattr(opts, name) < 0:
            raise ValueError(f"{name} must be a non-negative int, got {getattr(opts, name)!r}")
    if not opts.lr > 0 or not 0 <= opts.min_lr <= opts.lr:
        raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={opts.lr}, min_lr={opts.min_lr}")
    for name in ("weight_decay", "grad_clip"):
        if getattr(opts, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(opts, name)!r}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(opts, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(opts, name)!r}")
    if opts.drop_rate is not None and not 0 <= opts.drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {opts.drop_rate!r}")
    if not 0 <= opts.seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {opts.seed}")
    if opts.sample_every and not opts.prompt:
        raise ValueError("prompt is empty: give the samples some text (or sample_every=0: no samples)")
    if opts.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {opts.dtype!r}")
    check_kernels(opts.kernels)
    resolve_device(opts.device)
    if opts.max_steps is None and opts.max_tokens is None:
        raise ValueError("give max_steps or max_tokens (--max-steps / --max-tokens)")
    if opts.data is None:
        raise ValueError("data is required (--data DIR, made by `python -m gptfast prepare`)")
    opts.data = str(Path(opts.data).resolve())
    opts.out = str(Path(opts.out).resolve())
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise ValueError(f"out {opts.out} is a file; give a directory for the run")
    if opts.init != "random":
        opts.init = str(Path(opts.init).resolve())
    if opts.config_json is not None:
        opts.config_json = str(Path(opts.config_json).resolve())
    return opts


def add_train_arguments(parser) -> None:
    """One flag per ``TrainOptions`` field; flags not given are left out of the parsed namespace."""
    choices = {"dtype": list(DTYPES), "kernels": list(KERNEL_CHOICES)}
    for f in dataclasses.fields(TrainOptions):
        flag, kind = "--" + f.name.replace("_", "-"), _kind(f)
        shown = "" if f.default is None else f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, choices=choices.get(f.name), default=argparse.SUPPRESS,
                                help=f.metadata["help"] + shown)
