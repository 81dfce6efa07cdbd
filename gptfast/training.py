"""Pretraining, the book's loop: ``python -m gptfast train`` and ``gptfast.train(**options)``.

One process, or N under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on CUDA) or,
with ``fsdp=True``, FSDP2 (``fully_shard``). ``batch_size`` is the global number of sequences per
micro-step: each rank reads its own slice of every global batch, so N processes follow the
single-process run. The training windows are a per-epoch shuffle of the non-overlapping
``seq_len + 1`` windows of train.bin, a pure function of (seed, window counter): resuming needs
the counter alone. Validation uses the first ``eval_batches`` global batches of val.bin, always.

``OUT/ckpt.pt`` (one format for all modes: full, unsharded tensors) is written atomically every
``ckpt_every`` steps, at the end and on SIGINT/SIGTERM; ``OUT/model.safetensors`` and
``OUT/config.json`` beside it hold the weights in the Hugging Face GPT-2 layout.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from gptfast.compiled import TrainingLoss
from gptfast.config import check_config, get_config
from gptfast.dataset import TokenData
from gptfast.generation import generate
from gptfast.model import GPTModel
from gptfast.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, tokenizer
from gptfast.train_options import (
    DTYPES, TRAJECTORY, TrainOptions, make_options, resolve_device, typed_options,
)
from gptfast.weights import chapter_to_hf, load_error, load_weights, read_checkpoint

CKPT_FORMAT = "gptfast-train-1"
# Dense bf16 tensor-core peaks, for MFU; devices not listed get no MFU figure.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


def resolve_options(options: dict) -> tuple[TrainOptions, dict | None]:
    """The run's options and, when resuming, its checkpoint (loaded on the CPU)."""
    typed_options(options)  # type errors first, also of a resumed run's options
    resume = options.get("resume")
    if resume is None:
        opts = make_options(options)
        if (Path(opts.out) / "ckpt.pt").exists():
            raise ValueError(f"{opts.out} already holds a run (ckpt.pt): continue it with "
                             f"--resume {opts.out}, or choose another --out")
        return opts, None
    run_dir = Path(resume).resolve()
    if "out" in options and Path(options["out"]).resolve() != run_dir:
        raise ValueError(f"--out {options['out']} differs from --resume {resume}: a resumed run "
                         "writes to its own directory")
    ckpt = load_checkpoint(run_dir / "ckpt.pt")
    saved = ckpt["options"]
    opts = make_options({**saved, **options, "out": str(run_dir)})
    differ = [f"{k} ({saved[k]!r} -> {getattr(opts, k)!r})" for k in TRAJECTORY
              if getattr(opts, k) != saved[k]]
    if differ:
        raise ValueError(f"--resume {resume}: option(s) differ from the checkpoint's: "
                         f"{', '.join(differ)}; a resumed run keeps them")
    return opts, ckpt


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle error: all mean the same to the user
        raise ValueError(f"{path}: not a readable checkpoint ({load_error(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a gptfast training checkpoint")
    return ckpt


def model_config(opts: TrainOptions) -> dict:
    if opts.config_json is not None:
        path = Path(opts.config_json)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--config-json {path}: cannot read a JSON config ({exc})") from None
    else:
        cfg = get_config(opts.config)
    if opts.drop_rate is not None:
        cfg = {**cfg, "drop_rate": opts.drop_rate}
    return check_config(cfg)


# ---------------------------------------------------------------- distributed setup

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def on(self) -> bool:
        return self.world > 1 or dist.is_initialized()


def _rank_device(name: str | None, local: int, local_world: int) -> torch.device:
    """This rank's device: ``name`` (--device, checked by resolve_device), else cuda if there is
    one, else cpu; plain "cuda" is the node's GPU LOCAL_RANK. Checked before any CUDA call, so
    that a node with fewer visible GPUs than processes gets one error line on every rank, not a
    CUDA error."""
    device = resolve_device(name, "--device")
    if device.type == "cpu" or device.index is not None:
        return device
    visible = torch.cuda.device_count()
    if local_world > visible:
        raise ValueError(f"{local_world} process(es) on this node train on a GPU each, but "
                         f"{visible} CUDA device(s) are visible: start at most {visible} per node "
                         "(torchrun --nproc_per_node), or pass --device cpu to train with gloo")
    return torch.device("cuda", local)


def setup_distributed(opts: TrainOptions) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if opts.fsdp and "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp runs under torchrun: torchrun --nproc_per_node=N -m gptfast train ...")
    if opts.batch_size % world:
        raise ValueError(f"batch_size {opts.batch_size} is not divisible by the world size "
                         f"{world}: every rank needs the same number of rows")
    device = _rank_device(opts.device, local, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or opts.fsdp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def full_tensor(t):
    from torch.distributed.tensor import (
        DTensor,  # imported on use: it is slow to import
    )

    return t.full_tensor() if isinstance(t, DTensor) else t


def tree_map(fn, obj):
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v) for v in obj)
    return fn(obj) if isinstance(obj, torch.Tensor) else obj


def full_model_state(model) -> dict:
    """Chapter-layout state_dict, gathered from FSDP shards (a collective), on the CPU."""
    return {k: full_tensor(v).detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.endswith(".att.mask")}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a full optimizer state, sharding each tensor like its parameter under FSDP2."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for i, values in state["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            values = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                      if v.shape == p.shape else v for k, v in values.items()}
        per_param[i] = values
    optimizer.load_state_dict({**state, "state": per_param})


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- checkpoints and export

def atomic_write(path: Path, write) -> None:
    """``write(file)`` to ``path.tmp``, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hf_config(cfg: dict) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg["vocab_size"], "n_positions": cfg["context_length"],
            "n_embd": cfg["emb_dim"], "n_layer": cfg["n_layers"], "n_head": cfg["n_heads"],
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": False, "bos_token_id": END_OF_TEXT_ID,
            "eos_token_id": END_OF_TEXT_ID, "gptfast_config": cfg}


def export_weights(out: Path, state: dict, cfg: dict) -> None:
    from safetensors.torch import save

    data = save(chapter_to_hf(state), metadata={"format": "pt"})
    atomic_write(out / "model.safetensors", lambda f: f.write(data))
    text = json.dumps(hf_config(cfg), indent=2) + "\n"
    atomic_write(out / "config.json", lambda f: f.write(text.encode()))


# ---------------------------------------------------------------- data and schedule

class Batches:
    """Global batches of training windows (shuffled per epoch) and fixed validation batches."""

    def __init__(self, data: TokenData, opts: TrainOptions, d: Dist):
        self.data, self.seq_len, self.seed = data, opts.seq_len, opts.seed
        self.batch, self.d = opts.batch_size, d
        self.rows = slice(d.rank * self.batch // d.world, (d.rank + 1) * self.batch // d.world)
        self.n_train = data.windows("train", self.seq_len)
        self.n_val = data.windows("val", self.seq_len)
        self._epoch, self._order = -1, None

    def _window(self, counter: int) -> int:
        epoch, i = divmod(counter, self.n_train)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n_train)
        return int(self._order[i]) * self.seq_len

    def _tensors(self, split, starts):
        x, y = self.data.batch(split, starts, self.seq_len)
        as_tensor = lambda a: torch.from_numpy(a).to(self.d.device, non_blocking=True)
        return as_tensor(x), as_tensor(y)

    def train(self, micro_batch: int):
        """This rank's rows of global micro-batch number ``micro_batch``."""
        first = micro_batch * self.batch
        counters = range(first, first + self.batch)[self.rows]
        return self._tensors("train", [self._window(c) for c in counters])

    def val(self, i: int):
        first = i * self.batch
        counters = range(first, first + self.batch)[self.rows]
        return self._tensors("val", [(c % self.n_val) * self.seq_len for c in counters])


def lr_factor(step: int, opts: TrainOptions, total_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step (as a factor of lr)."""
    if step < opts.warmup_steps:
        return (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, total_steps - opts.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return (opts.min_lr + (opts.lr - opts.min_lr) * cosine) / opts.lr


def param_groups(model, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def flops_per_token(model: GPTModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12·L·d·T."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    return 6 * n + 12 * cfg["n_layers"] * cfg["emb_dim"] * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------- the run

class Run:
    """One training run: the model (wrapped for DDP/FSDP), optimizer, schedule, data and logs."""

    def __init__(self, opts: TrainOptions, ckpt: dict | None, d: Dist):
        self.opts, self.d, self.out = opts, d, Path(opts.out)
        self.data = TokenData(opts.data)
        self.cfg = model_config(opts)
        self.data.check_vocab(self.cfg["vocab_size"])
        if ckpt is not None and ckpt["cfg"] != self.cfg:
            raise ValueError(f"{self.out / 'ckpt.pt'}: written for config {ckpt['cfg']}, the options "
                             f"now give {self.cfg}")
        opts.seq_len = opts.seq_len or self.cfg["context_length"]
        if opts.seq_len > self.cfg["context_length"]:
            raise ValueError(f"seq_len {opts.seq_len} exceeds the model's context length "
                             f"{self.cfg['context_length']}")
        if ckpt is not None and ckpt["world_size"] != d.world:
            raise ValueError(f"{self.out / 'ckpt.pt'} was written by {ckpt['world_size']} "
                             f"process(es); resume it with as many (this run has {d.world})")
        self.data.check_window(opts.seq_len)
        self.tokens_per_step = opts.batch_size * opts.grad_accum * opts.seq_len
        steps = [s for s in (opts.max_steps,
                             opts.max_tokens and math.ceil(opts.max_tokens / self.tokens_per_step))
                 if s is not None]
        self.total_steps = min(steps)

        torch.manual_seed(opts.seed)
        model = GPTModel(self.cfg, kernels=opts.kernels)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        elif opts.init != "random":
            try:
                load_weights(model, read_checkpoint(opts.init))
            except FileNotFoundError:
                raise
            except Exception as exc:  # a corrupt file, another config: the loader's reason, one line
                named = str(exc).startswith(opts.init)  # the loader's messages name the file
                raise ValueError(f"--init {exc}" if named else f"--init {opts.init}: {exc}") from None
        torch.manual_seed(opts.seed + d.rank)  # the dropout stream, one per rank
        self.model = model.to(d.device)
        self.ddp = None
        if opts.fsdp:
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            for block in model.trf_blocks:
                fully_shard(block)
            fully_shard(model)
            register_fsdp_forward_method(model, "loss")  # loss() runs the root's own layers
        self.optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=opts.lr,
                                           betas=(opts.beta1, opts.beta2),
                                           fused=True if d.device.type == "cuda" else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, opts, self.total_steps))
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=opts.dtype == "fp16")
        # The loss reads no target back (a host sync per step on CUDA): TokenData checks each
        # batch's ids on the host, and check_vocab above the vocabulary. --compile: the recipe
        # (one graph; FSDP's hooks break graphs, so not fullgraph there).
        step_module = (model.compile_loss(fullgraph=not opts.fsdp) if opts.compile
                       else TrainingLoss(model))
        if d.on and not opts.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            step_module = self.ddp = DistributedDataParallel(step_module)
        self.step_module = step_module
        self.step = 0
        if ckpt is not None:
            load_optimizer_state(self.optimizer, ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"][d.rank])
            self.step = ckpt["step"]
        self.batches = Batches(self.data, opts, d)
        self.autocast = torch.autocast(d.device.type, dtype=DTYPES[opts.dtype],
                                       enabled=opts.dtype != "fp32")
        self.flops = flops_per_token(model, opts.seq_len)
        self.peak = peak_flops(d.device)

    # ---- one optimizer step
    def train_step(self) -> torch.Tensor:
        opts, loss_sum = self.opts, torch.zeros((), device=self.d.device)
        for micro in range(opts.grad_accum):
            x, y = self.batches.train(self.step * opts.grad_accum + micro)
            last = micro == opts.grad_accum - 1
            if opts.fsdp:
                self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                with self.autocast:
                    loss = self.step_module(x, y) / opts.grad_accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if opts.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return loss_sum

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches; every rank computes its rows."""
        self.model.eval()
        total = torch.zeros((), device=self.d.device)
        for i in range(self.opts.eval_batches):
            x, y = self.batches.val(i)
            with self.autocast:
                total += self.model.loss(x, y, check_targets=False).float()
        self.model.train()
        if self.d.on:
            dist.all_reduce(total)
        return total.item() / (self.opts.eval_batches * self.d.world)

    @torch.no_grad()
    def sample(self) -> str:
        """A greedy continuation of the prompt with the KV cache (every rank under FSDP)."""
        enc = tokenizer()
        ids = torch.tensor([enc.encode(self.opts.prompt, allowed_special={END_OF_TEXT})],
                           device=self.d.device)
        self.model.eval()
        with self.autocast:
            out = generate(self.model, ids, self.opts.sample_tokens, eos_id=END_OF_TEXT_ID,
                           cuda_graph=False)
        self.model.train()
        return enc.decode(out[0, ids.shape[1]:].tolist())

    # ---- checkpoints
    def checkpoint(self) -> None:
        """Write ckpt.pt (all ranks take part in gathering; rank 0 writes) and the export."""
        main, gather = self.d.rank == 0, self.d.rank == 0 or self.opts.fsdp  # FSDP: all gather
        model_state = full_model_state(self.model) if gather else None
        optim_state = self.optimizer.state_dict()
        optim_state = tree_map(lambda t: full_tensor(t).cpu().clone(), optim_state) if gather else None
        rngs = [None] * self.d.world
        if self.d.on:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if main:
            ckpt = {"format": CKPT_FORMAT, "options": dataclasses.asdict(self.opts), "cfg": self.cfg,
                    "step": self.step, "world_size": self.d.world,
                    "data_position": self.step * self.opts.grad_accum * self.opts.batch_size,
                    "model": model_state, "optimizer": optim_state,
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                    "rng": rngs}
            atomic_write(self.out / "ckpt.pt", lambda f: torch.save(ckpt, f))
            export_weights(self.out, model_state, self.cfg)
        if self.d.on:
            dist.barrier()


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the step in progress."""

    def __init__(self):
        self.caught = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.caught = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])  # a second Ctrl-C stops at once

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)",
              file=sys.stderr)
        return
    rows = read_log(out / "log.jsonl")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def train(callback=None, **options) -> dict:
    """Train a GPT model; the keyword arguments are ``TrainOptions``' fields.

    Returns ``{"step", "loss", "val_loss", "out", "stopped_by"}``. ``callback(step, row)``, if
    given, is called on every rank after each step with that step's log row.
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (step, row) or None, got {callback!r}")
    opts, ckpt = resolve_options(options)
    d = setup_distributed(opts)
    try:
        run = Run(opts, ckpt, d)
        del ckpt
        return _loop(run, callback)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _loop(run: Run, callback) -> dict:
    opts, d, out = run.opts, run.d, run.out
    log_path, main = out / "log.jsonl", d.rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_log(log_path) if r["step"] <= run.step]  # rows past the checkpoint go
        atomic_write(log_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    last = {"loss": None, "val_loss": None}
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", disable=not main,
               dynamic_ncols=True)
    stop = StopSignal()
    try:
        with stop, open(log_path, "a") if main else contextlib.nullcontext() as log:
            while run.step < run.total_steps:
                start = time.perf_counter()
                lr = run.scheduler.get_last_lr()[0]
                loss = run.train_step()
                flags = torch.stack([loss, torch.tensor(float(stop.caught is not None),
                                                        device=d.device)])
                if d.on:
                    dist.all_reduce(flags)
                loss_sum, stop_votes = flags.tolist()  # waits for the device: the step is done
                seconds = time.perf_counter() - start
                row = {"step": run.step, "loss": loss_sum / d.world, "lr": lr,
                       "tokens": run.step * run.tokens_per_step,
                       "tokens_per_s": run.tokens_per_step / seconds}
                if run.peak is not None:
                    row["mfu"] = run.flops * row["tokens_per_s"] / (run.peak * d.world)
                done = run.step == run.total_steps
                if run.step % opts.eval_every == 0 or done:
                    row["val_loss"] = last["val_loss"] = run.evaluate()
                if opts.sample_every and (run.step % opts.sample_every == 0 or done) and (
                        main or opts.fsdp):
                    row["sample"] = run.sample()
                last["loss"] = row["loss"]
                if main:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{row['tokens_per_s']:,.0f}")
                    if "sample" in row:
                        bar.write(f"step {run.step} sample: {opts.prompt + row['sample']!r}")
                if callback is not None:
                    callback(run.step, row)
                interrupted = stop_votes > 0
                if done or interrupted or run.step % opts.ckpt_every == 0:
                    run.checkpoint()
                if interrupted:
                    break
    finally:
        bar.close()
        if main and log_path.is_file():
            plot_losses(out)
    if stop.caught and main:
        print(f"stopped by {stop.caught} at step {run.step}; checkpoint in {out / 'ckpt.pt'}, "
              f"continue with --resume {out}", file=sys.stderr)
    return {"step": run.step, **last, "out": str(out), "stopped_by": stop.caught}
