"""Training: prepare, the loop, bit-exact resume, atomic checkpoints, DDP/FSDP2 (torchrun), export."""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptfast import generate, load_gpt2, tokenizer, train
from gptfast.cli import main
from gptfast.dataset import TokenData, prepare
from gptfast.training import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": False}
WORDS = "the cat sat on a mat and the dog ran to the big red ball every effort moves you".split()


def make_text(n_lines, seed=0):
    r = random.Random(seed)
    return "".join(" ".join(r.choice(WORDS) for _ in range(10)) + ".\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text(make_text(150))
    (root / "tiny.json").write_text(json.dumps(TINY))
    prepare([root / "a.txt"], root / "d", val_fraction=0.2, seq_len=16)
    return root


def options(data_dir, out, **extra):
    return {"data": str(data_dir / "d"), "out": str(out), "config_json": str(data_dir / "tiny.json"),
            "batch_size": 4, "seq_len": 16, "max_steps": 6, "lr": 1e-2, "min_lr": 1e-3,
            "warmup_steps": 1, "eval_every": 2, "eval_batches": 2, "sample_every": 3,
            "sample_tokens": 4, "ckpt_every": 100, "kernels": "torch", **extra}


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(**options(data_dir, out, max_steps=12, eval_every=4, sample_every=6))
    return out, result


# ---------------------------------------------------------------- prepare

def test_prepare_round_trips_and_streams_in_chunks(tmp_path, monkeypatch):
    import gptfast.dataset

    monkeypatch.setattr(gptfast.dataset, "CHUNK_BYTES", 37)  # many chunks, split UTF-8 characters
    texts = [make_text(40, 1) + "café ✓ naïve\n" * 3, "second document<|endoftext|>third\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    files = [tmp_path / "0.txt", tmp_path / "1.txt"]
    meta = prepare(files, tmp_path / "d", val_fraction=0.1, seq_len=8)
    data = TokenData(tmp_path / "d")
    ids = np.concatenate([data.splits["train"], data.splits["val"]]).tolist()
    enc = tokenizer()
    assert enc.decode(ids) == texts[0] + "<|endoftext|>" + texts[1] + "<|endoftext|>"
    whole = [enc.encode(t, allowed_special="all") + [50256] for t in texts]
    assert ids == whole[0] + whole[1]  # chunking at line starts keeps the whole-file tokens
    assert meta["documents"] == 3 and meta["train_tokens"] + meta["val_tokens"] == len(ids)
    assert meta["val_tokens"] == round(0.1 * len(ids)) and data.splits["train"].dtype == np.uint16
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_prepare_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.txt").write_bytes(b"good text\n" * 5 + b"\xff\xfe bad")
    (tmp_path / "small.txt").write_text("just a few words\n")
    cases = [("empty.txt", "empty.txt: the file is empty"),
             ("bad.txt", "bad.txt: not UTF-8 text (undecodable byte at offset 50)"),
             ("small.txt", "small.txt would hold"), ("missing.txt", "no text file at")]
    for name, message in cases:
        args = [str(tmp_path / name), "--out", str(tmp_path / "d"), "--seq-len", "8"]
        assert main(["prepare", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


# ---------------------------------------------------------------- the loop

def test_loss_decreases_and_the_run_leaves_its_files(trained):
    out, result = trained
    rows = losses(out)
    assert [s for s, _, _ in rows] == list(range(1, 13)) and result["step"] == 12
    assert rows[-1][1] < rows[0][1] - 1.0  # from ~ln(50257) = 10.8 down
    vals = [v for _, _, v in rows if v is not None]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "sample" in log[5] and log[0]["tokens"] == 4 * 16 and log[0]["tokens_per_s"] > 0
    for name in ("ckpt.pt", "loss.png", "model.safetensors", "config.json"):
        assert (out / name).is_file(), name


def test_resume_after_a_signal_is_bit_exact(data_dir, tmp_path):
    # dropout: the RNG states must come back too; samples and evaluations on both sides of the stop
    opts = {"drop_rate": 0.1, "grad_accum": 2, "max_steps": 4, "eval_every": 1, "sample_every": 3}
    straight = tmp_path / "straight"
    train(**options(data_dir, straight, **opts))

    def interrupt(step, row):  # the signal lands during step 1's bookkeeping: it stops after 2
        if step == 1:
            signal.raise_signal(signal.SIGTERM)

    cut = tmp_path / "cut"
    first = train(callback=interrupt, **options(data_dir, cut, **opts))
    assert first["stopped_by"] == "SIGTERM" and first["step"] == 2
    assert load_checkpoint(cut / "ckpt.pt")["step"] == 2
    assert train(resume=str(cut))["step"] == 4
    assert losses(cut) == losses(straight)
    a, b = load_file(cut / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_between_write_and_rename_keeps_the_previous_checkpoint(data_dir, tmp_path,
                                                                        monkeypatch):
    out, real_replace, calls = tmp_path / "run", os.replace, []

    def replace(src, dst):
        if Path(dst).name == "ckpt.pt":
            calls.append(dst)
            if len(calls) == 2:
                raise RuntimeError("injected crash between write and rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(**options(data_dir, out, max_steps=4, ckpt_every=2, sample_every=0))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "ckpt.pt.tmp").is_file()  # the new one was written, never renamed
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    assert train(resume=str(out))["step"] == 4
    assert [s for s, _, _ in losses(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_dtypes_train(data_dir, tmp_path, dtype):
    result = train(**options(data_dir, tmp_path, dtype=dtype, max_steps=2, sample_every=0))
    assert result["step"] == 2 and result["val_loss"] < 11.5  # finite, near ln(50257)
    scaler = load_checkpoint(tmp_path / "ckpt.pt")["scaler"]
    assert bool(scaler) == (dtype == "fp16")  # the GradScaler runs for fp16 only


def test_triton_kernels_train_a_step(data_dir, tmp_path):
    result = train(**options(data_dir, tmp_path, kernels="triton", max_steps=1, batch_size=2,
                             seq_len=8, sample_every=0, eval_batches=1))
    assert result["step"] == 1 and 9.0 < result["loss"] < 12.0


def test_compiled_loss_follows_the_eager_run(data_dir, tmp_path):
    """--compile trains through GPTModel.compile_loss (one Inductor graph, with accumulation):
    the same losses as the eager run, to rounding."""
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        counters.clear()
        train(**options(data_dir, out, compile=compiled, max_steps=3, grad_accum=2, sample_every=0))
        runs[compiled] = losses(out)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert [s for s, _, _ in runs[True]] == [1, 2, 3]
    for (_, loss, val), (_, ref_loss, ref_val) in zip(runs[True], runs[False], strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert (val is None) == (ref_val is None) and (val is None or val == pytest.approx(ref_val))


# ---------------------------------------------------------------- export

def test_exported_safetensors_loads_and_generates_through_the_cli(trained, capsys):
    out, _ = trained
    model = load_gpt2(out / "model.safetensors", kernels="torch").eval()
    state = load_checkpoint(out / "ckpt.pt")["model"]
    assert model.cfg == TINY and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert main(["generate", "Every effort moves", "--weights", str(out / "model.safetensors"),
                 "--max-new-tokens", "6", "--kernels", "torch", "--device", "cpu"]) == 0
    ids = generate(model, torch.tensor([tokenizer().encode("Every effort moves")]), 6, eos_id=50256)
    assert capsys.readouterr().out.rstrip("\n") == tokenizer().decode(ids[0].tolist())


def test_init_from_the_export_continues_from_the_trained_weights(data_dir, trained, tmp_path):
    out, result = trained
    again = train(**options(data_dir, tmp_path, init=str(out / "model.safetensors"), max_steps=None,
                            max_tokens=4 * 16, sample_every=0, lr=1e-4, min_lr=1e-5))  # one step
    assert again["step"] == 1 and again["loss"] < losses(out)[0][1] - 1.0


def test_export_is_the_hugging_face_gpt2_layout(trained):
    transformers = pytest.importorskip("transformers")
    out, _ = trained
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = load_gpt2(out / "model.safetensors", kernels="torch").eval()
    ids = torch.tensor([tokenizer().encode("the cat sat on the mat")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad input

def test_bad_input_is_one_line_and_overwrites_nothing(data_dir, trained, tmp_path, capsys,
                                                      monkeypatch):
    out, _ = trained
    before = (out / "ckpt.pt").read_bytes()

    def fails(args, message):
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    base = ["--data", str(data_dir / "d"), "--config-json", str(data_dir / "tiny.json"),
            "--batch-size", "4", "--max-steps", "2", "--kernels", "torch"]
    fails([*base, "--out", str(out)], "already holds a run (ckpt.pt): continue it with --resume")
    fails(["--resume", str(out), "--lr", "0.02", "--seed", "7"],
          "option(s) differ from the checkpoint's: lr (0.01 -> 0.02), seed (123 -> 7)")
    fails([*base, "--out", str(tmp_path / "a"), "--seq-len", "64"],
          "seq_len 64 exceeds the model's context length 32")
    (tmp_path / "small.txt").write_text(make_text(8))
    meta = prepare([tmp_path / "small.txt"], tmp_path / "small", val_fraction=0.2, seq_len=8)
    small = [*base, "--data", str(tmp_path / "small"), "--out", str(tmp_path / "b")]
    fails(small, f"val.bin: {meta['val_tokens']} tokens, fewer than one training window of "
          "seq_len + 1 = 33")
    fails(["--data", str(tmp_path / "nowhere"), "--max-steps", "1", "--out", str(tmp_path / "c")],
          "meta.json: run `python -m gptfast prepare")
    fails(["--data", str(data_dir / "d"), "--out", str(tmp_path / "c")], "give max_steps or max_tokens")
    wide = write_json(tmp_path / "wide.json", {**TINY, "emb_dim": 64})
    fails([*base, "--seq-len", "16", "--out", str(tmp_path / "d"), "--config-json", str(wide),
           "--init", str(out / "model.safetensors")],
          "model.safetensors: 'tok_emb.weight': checkpoint has shape (50257, 32), the model expects "
          "(50257, 64)")
    fails(["--resume", str(tmp_path / "nothing")], "no checkpoint at")
    monkeypatch.setenv("WORLD_SIZE", "3")
    fails([*base, "--seq-len", "16", "--out", str(tmp_path / "e")],
          "batch_size 4 is not divisible by the world size 3")
    monkeypatch.delenv("WORLD_SIZE")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (corrupt / name).write_bytes((data_dir / "d" / name).read_bytes())
    with open(corrupt / "val.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    fails(["--data", str(corrupt), "--max-steps", "1", "--out", str(tmp_path / "f")],
          "val.bin: ")
    assert (out / "ckpt.pt").read_bytes() == before
    assert not any((tmp_path / n).exists() for n in "abcdef")


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_resume_refuses_a_checkpoint_of_another_config(data_dir, tmp_path, capsys):
    cfg = write_json(tmp_path / "cfg.json", TINY)
    train(**{**options(data_dir, tmp_path / "run", max_steps=1, sample_every=0),
             "config_json": str(cfg)})
    write_json(cfg, {**TINY, "n_heads": 4})
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "written for config" in capsys.readouterr().err


# ---------------------------------------------------------------- torchrun

def torchrun(*args, nproc=2):
    """``torchrun --nproc_per_node=2 ARGS`` (gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def cli_args(opts):
    return [arg for key, value in opts.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """One process on the CPU: what the torchrun runs (gloo on the CPU, also on a GPU machine)
    must follow."""
    opts = options(data_dir, tmp_path_factory.mktemp("one"), max_steps=4, grad_accum=2,
                   eval_every=2, sample_every=4, device="cpu")
    train(**opts)
    return opts


def assert_same_run(one, two):
    one_rows, two_rows = losses(one), losses(two)
    assert [r[0] for r in two_rows] == [r[0] for r in one_rows]
    np.testing.assert_allclose([r[1] for r in two_rows], [r[1] for r in one_rows], rtol=1e-5)
    np.testing.assert_allclose([r[2] for r in two_rows if r[2] is not None],
                               [r[2] for r in one_rows if r[2] is not None], rtol=1e-5)
    a, b = load_file(Path(one) / "model.safetensors"), load_file(Path(two) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("env,device,match", [
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, None,
     r"2 process\(es\) on this node train on a GPU each, but 1 CUDA device\(s\) are visible"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "cuda",
     r"2 process\(es\) on this node .* pass --device cpu"),
    ({}, "cuda:1", r"device 'cuda:1': only 1 CUDA device\(s\)"),
    ({}, "tpu", "device 'tpu' is not a device"),
], ids=["two-ranks-one-gpu", "cuda-two-ranks", "cuda-index", "not-a-device"])
def test_more_processes_than_gpus_is_one_line(data_dir, tmp_path, monkeypatch, capsys, env, device,
                                              match):
    """torchrun with more processes per node than visible GPUs (simulated: one GPU) stops every
    rank with one error line before any CUDA call, and writes nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    extra = {} if device is None else {"device": device}
    assert main(["train", *cli_args(options(data_dir, tmp_path / "run", **extra))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(match, err), err
    assert not (tmp_path / "run").exists()


def test_torchrun_ddp_follows_one_process(one_process, tmp_path):
    two = {**one_process, "out": str(tmp_path / "two")}
    torchrun("-m", "gptfast", "train", *cli_args(two))
    assert_same_run(one_process["out"], two["out"])
    ckpt = load_checkpoint(tmp_path / "two" / "ckpt.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_torchrun_fsdp_stopped_by_a_signal_and_resumed_follows_one_process(one_process, tmp_path):
    two = {**one_process, "out": str(tmp_path / "two"), "fsdp": True}
    torchrun(str(ROOT / "tests" / "torchrun_worker.py"), json.dumps(two), "1")
    assert load_checkpoint(tmp_path / "two" / "ckpt.pt")["step"] == 2  # both ranks stopped after 2
    torchrun("-m", "gptfast", "train", "--resume", two["out"])
    assert_same_run(one_process["out"], two["out"])
