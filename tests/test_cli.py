"""The command line: info and generate."""

import subprocess
import sys

import pytest
import torch

from gptfast.cli import main
from tests.test_weights import hf_gpt2


def test_info_prints_the_chapter_counts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "163,009,536" in out and "124,412,160" in out and "621.83" in out
    assert "1,637,792,000" in out and "gpt2-medium (355M)" in out


def test_generate_with_random_weights_says_so(capsys):
    assert main(["generate", "Every effort moves you", "--max-new-tokens", "3", "--config", "124M",
                 "--kernels", "torch"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Every effort moves you")
    assert "random 124M weights" in captured.err and "3 tokens in" in captured.err


def test_generate_from_a_safetensors_file_matches_the_library(tmp_path, capsys):
    pytest.importorskip("transformers")
    hf = hf_gpt2(64, 4, vocab=50257, n_positions=32)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert main(["generate", "Hello", "--weights", str(tmp_path / "model.safetensors"),
                 "--max-new-tokens", "5", "--kernels", "torch"]) == 0
    out = capsys.readouterr().out
    from gptfast import generate, load_gpt2, tokenizer

    model = load_gpt2(tmp_path / "model.safetensors", kernels="torch").eval()
    ids = generate(model, torch.tensor([tokenizer().encode("Hello")]), 5, eos_id=50256)
    assert out.rstrip("\n") == tokenizer().decode(ids[0].tolist())


def test_errors_exit_2_with_a_message(capsys):
    assert main(["generate", "x", "--weights", "/nonexistent/model.safetensors"]) == 2
    assert "no weights file" in capsys.readouterr().err
    assert main(["generate", "x", "--max-new-tokens", "-3", "--kernels", "torch",
                 "--config", "124M"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "gptfast", "info"], capture_output=True, text=True)
    assert proc.returncode == 0 and "gpt2-xl (1558M)" in proc.stdout
