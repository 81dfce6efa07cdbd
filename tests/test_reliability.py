"""Issues 15 and 25: no silent wrong answers, no state shared between models or generations, clear errors.

Each test is a reproducer of a probe that once gave a wrong result or a raw traceback.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gptfast
from gptfast import kernels
from gptfast import (GPTModel, generate, generate_batch, generate_text_simple, generate_tokens, load_gpt2,
                     load_weights)
from gptfast.cli import main
from gptfast.tokenizer import text_to_token_ids, token_ids_to_text
from tests.chapter_model import ChapterGPTModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = {"vocab_size": 61, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(seed=0, **cfg):
    torch.manual_seed(seed)
    return GPTModel({**CFG, **cfg}, kernels="torch").to(DEVICE).eval()


def ids(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG["vocab_size"], shape, generator=g).to(DEVICE)


# --- one cache per generation ----------------------------------------------------------------


@pytest.mark.parametrize("cuda_graph", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need CUDA"))])
def test_interleaved_streams_on_one_model_are_each_what_they_are_alone(cuda_graph):
    model = tiny()
    a, b = ids(2, 3, seed=1), ids(2, 5, seed=2)  # same batch size: the case that used to break
    alone_a = torch.cat(list(generate_tokens(model, a, 9, cuda_graph=cuda_graph)), 1)
    alone_b = torch.cat(list(generate_tokens(model, b, 9, cuda_graph=cuda_graph)), 1)
    stream_a = generate_tokens(model, a, 9, cuda_graph=cuda_graph)
    stream_b = generate_tokens(model, b, 9, cuda_graph=cuda_graph)
    got_a, got_b = [], []
    for _ in range(9):  # alternately, each one step at a time
        got_a.append(next(stream_a))
        got_b.append(next(stream_b))
    assert torch.equal(torch.cat(got_a, 1), alone_a)
    assert torch.equal(torch.cat(got_b, 1), alone_b)
    assert torch.equal(alone_a, generate(model, a, 9, use_cache=False)[:, 3:])


def test_a_generation_puts_back_the_cache_it_found():
    model = tiny()
    x = ids(1, 6)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(1)
        prefix = model(x[:, :4], start_pos=0)
        mine = model.kv_cache
        generate(model, ids(1, 2, seed=5), 4)  # another generation in between
        assert model.kv_cache is mine
        rest = model(x[:, 4:], start_pos=4)
    torch.testing.assert_close(torch.cat([prefix, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_a_failed_setup_cache_leaves_the_installed_cache():
    model = tiny().setup_cache(2, max_len=8)
    before = model.kv_cache
    for bad in ({"max_len": 0}, {"max_len": 17}, {"batch_size": 0}, {"dtype": torch.int64}):
        with pytest.raises((ValueError, TypeError)):
            model.setup_cache(**{"batch_size": 2, **bad})
        assert model.kv_cache is before and model.trf_blocks[1].att.cache is before.layers[1]


def test_set_cache_takes_only_a_cache_made_for_the_model():
    model = tiny()
    with pytest.raises(TypeError, match="cache must be a ModelCache"):
        model.set_cache("cache")
    with pytest.raises(ValueError, match="made by a model of another shape"):
        model.set_cache(tiny(n_heads=4).new_cache(1))
    assert model.kv_cache is None


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                               (True, TypeError), ("2", TypeError)])
def test_setup_cache_rejects_bad_batch_sizes(batch_size, error):
    with pytest.raises(error, match="batch_size must be"):
        tiny().setup_cache(batch_size)


def test_setup_cache_max_len_0_is_an_error_not_the_full_context():
    with pytest.raises(ValueError, match=r"max_len must be in \[1, 16\]"):
        tiny().setup_cache(1, max_len=0)
    assert tiny().setup_cache(1, max_len=np.int64(5)).kv_cache.max_len == 5


# --- start_pos ---------------------------------------------------------------------------------


@pytest.mark.parametrize("start, error, match", [
    (torch.tensor([-1, 0]), ValueError, "start_pos -1"),
    (torch.tensor([0, 7]), ValueError, "start_pos 7"),  # 7 + 2 tokens > 8 positions
    (torch.tensor([0, 20]), ValueError, "start_pos 20"),  # past the context too
    (torch.tensor([0.0, 1.0]), TypeError, "int64 or int32"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\) or \(\)"),
    (1.0, TypeError, "start_pos must be an int"),
    (True, TypeError, "start_pos must be an int"),
    (-1, ValueError, "do not fit the KV cache"),
])
def test_bad_start_pos_gets_a_clear_error(start, error, match):
    model = tiny().setup_cache(2, max_len=8)
    with pytest.raises(error, match=match), torch.no_grad():
        model(ids(2, 2), start_pos=start.to(DEVICE) if torch.is_tensor(start) else start)


def test_start_pos_as_numpy_int_or_0d_tensor_is_the_int():
    model, x = tiny(), ids(2, 5)
    with torch.no_grad():
        model.setup_cache(2)(x[:, :3], start_pos=0)
        want = model(x[:, 3:], start_pos=3)
        for start in (np.int64(3), torch.tensor(3, device=DEVICE)):
            model.setup_cache(2)(x[:, :3], start_pos=0)
            torch.testing.assert_close(model(x[:, 3:], start_pos=start), want, rtol=1e-6, atol=1e-6)


def test_a_cache_of_another_dtype_than_the_compute_dtype_is_refused():
    model = tiny().setup_cache(1, dtype=torch.float16)
    with pytest.raises(ValueError, match="holds torch.float16 but the model computes in torch.float32"):
        model(ids(1, 2), start_pos=0)


# --- the chapter's mask in state_dict() --------------------------------------------------------


def test_state_dict_masks_are_fresh_tensors_per_layer_and_call():
    template = tiny().state_dict()
    for t in template.values():
        t.zero_()  # a common way to build a template
    model = tiny(seed=3)
    state = model.state_dict()
    causal = torch.ones(16, 16, device=DEVICE).triu(1)
    assert torch.equal(state["trf_blocks.0.att.mask"], causal)
    masks = [state["trf_blocks.0.att.mask"], state["trf_blocks.1.att.mask"],
             model.state_dict()["trf_blocks.0.att.mask"]]
    assert len({m.data_ptr() for m in masks}) == 3
    chapter = ChapterGPTModel(CFG).to(DEVICE).eval()
    chapter.load_state_dict(state)
    x = ids(1, 7)
    with torch.no_grad():  # causal: the first logits do not depend on later tokens
        torch.testing.assert_close(chapter(x)[:, :3], chapter(x[:, :3]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chapter(x), model(x), rtol=1e-5, atol=1e-5)


# --- generation arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"temperature": float("nan")}, ValueError, "temperature must be >= 0"),
    ({"temperature": float("inf")}, ValueError, "temperature must be >= 0"),
    ({"temperature": "hot"}, ValueError, "temperature must be >= 0"),
    ({"top_k": 2.5}, ValueError, "top_k must be between 1"),
    ({"context_size": "8"}, ValueError, "context_size must be a positive int"),
    ({"context_size": 0}, ValueError, "context_size must be a positive int"),
    ({"context_size": 17}, ValueError, "exceeds the model's context length 16"),
    ({"use_cache": "no"}, TypeError, "use_cache must be True or False"),
    ({"generator": 123}, TypeError, "generator must be a torch.Generator"),
    ({"eos_id": 61}, ValueError, "eos_id must be a token id"),
    ({"max_new_tokens": 2.0}, ValueError, "max_new_tokens must be a non-negative int"),
    ({"idx": torch.zeros(0, 3, dtype=torch.long)}, ValueError, "non-empty"),
    ({"idx": torch.zeros(1, 3)}, TypeError, "int64 or int32"),
    ({"cuda_graph": "yes"}, TypeError, "cuda_graph must be"),
])
def test_bad_generation_arguments_get_clear_errors(kwargs, error, match):
    args = {"idx": ids(1, 2), "max_new_tokens": 2, **kwargs}
    if torch.is_tensor(args["idx"]):
        args["idx"] = args["idx"].to(DEVICE)
    with pytest.raises(error, match=match):
        generate_tokens(tiny(), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_cuda_graph_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        generate(tiny(), ids(1, 2), 2, cuda_graph=True)


def test_numpy_scalars_are_accepted_as_numbers():
    model, x = tiny(), ids(2, 3)
    g = lambda: torch.Generator(DEVICE).manual_seed(0)
    want = generate(model, x, 5, temperature=0.8, top_k=7, generator=g())
    got = generate(model, x, np.int64(5), temperature=np.float32(0.8), top_k=np.int32(7),
                   context_size=np.int64(16), generator=g())
    assert torch.equal(got, want)


@pytest.mark.parametrize("prompts, error, match", [
    ([[1.7, 2.9], [3.2]], TypeError, r"prompts\[0\]"),
    ([torch.tensor([1.0, 2.0])], ValueError, r"prompts\[0\] is a torch.float32"),
    ([torch.tensor([[1, 2], [3, 4]])], ValueError, r"shape \(2, 2\)"),
    (["hello"], TypeError, r"prompts\[0\]"),
    ("hello", TypeError, "encode text first"),
    ([[1, True]], TypeError, r"prompts\[0\]"),
    ([[1, 99]], ValueError, "token id 99 is out of range"),
])
def test_generate_batch_never_casts_or_flattens_prompts(prompts, error, match):
    with pytest.raises(error, match=match):
        generate_batch(tiny(), prompts, 3)


def test_generate_batch_needs_a_gptmodel():
    with pytest.raises(TypeError, match="generate_batch needs a GPTModel"):
        generate_batch(nn.Linear(2, 2), [[1, 2]], 3)


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("qkv_bias", "no"), ("qkv_bias", 0), ("drop_rate", "0.1"),
                                        ("drop_rate", None), ("drop_rate", True)])
def test_config_values_of_the_wrong_type_are_errors(key, value):
    with pytest.raises(ValueError, match=f"config\\['{key}'\\]"):
        GPTModel({**CFG, key: value}, kernels="torch")


def test_config_accepts_numpy_numbers():
    model = GPTModel({**CFG, "emb_dim": np.int64(32), "drop_rate": np.float32(0.0)}, kernels="torch")
    assert type(model.cfg["emb_dim"]) is int and type(model.cfg["drop_rate"]) is float


# --- weight files ----------------------------------------------------------------------------


def _checkpoint_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _bad_files(tmp_path):
    from safetensors.torch import save_file

    good_st = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4)}, str(good_st))
    st_bytes, pth_bytes = good_st.read_bytes(), _checkpoint_bytes(tiny())
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.ones(2, 2)}, other)
    files = {
        "truncated.safetensors": st_bytes[: len(st_bytes) // 2],
        "garbage.safetensors": b"\x00\x01garbage" * 10,
        "empty.pth": b"",
        "text.pth": b"hello, these are not weights\n",
        "safetensors_inside.pth": st_bytes,
        "module.pth": None,
        "truncated.pth": pth_bytes[: len(pth_bytes) // 2],
        "numbers.pth": None,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        if data is not None:
            paths[name].write_bytes(data)
    torch.save(nn.Linear(2, 2), paths["module.pth"])  # a pickled module, not a state_dict
    torch.save({"tok_emb.weight": 3}, paths["numbers.pth"])  # a non-tensor value
    paths["other.pth"] = other  # another architecture
    return paths


def test_bad_weight_files_raise_an_error_naming_the_file(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=name.replace(".", r"\.")) as info:
            load_gpt2(path, kernels="torch")
        assert name in str(info.value), name
        with pytest.raises(ValueError):
            load_weights(tiny(), path)


def test_another_architecture_or_bad_types_are_named():
    with pytest.raises(ValueError, match="no 2-D 'tok_emb.weight'"):
        from gptfast.weights import infer_config

        infer_config({"encoder.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="has no 'tok_emb.weight'"):
        load_weights(tiny(), {"encoder.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="'tok_emb.weight' holds list"):
        load_weights(tiny(), {"tok_emb.weight": [1, 2]})
    with pytest.raises(TypeError, match="source must be a path or a state_dict"):
        load_weights(tiny(), 42)
    with pytest.raises(TypeError, match="model must be a GPTModel"):
        load_weights(nn.Linear(2, 2), {})
    with pytest.raises(TypeError, match="path must be a str"):
        load_gpt2(42)


def test_a_failed_load_leaves_the_weights(tmp_path):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = tiny(seed=4).state_dict()
    bad["trf_blocks.1.ff.layers.0.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="trf_blocks.1.ff.layers.0.weight"):
        load_weights(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- tokenizer helpers ------------------------------------------------------------------------


def test_tokenizer_helpers():
    empty = text_to_token_ids("")
    assert empty.dtype == torch.int64 and empty.shape == (1, 0)
    assert token_ids_to_text(empty) == ""
    with pytest.raises(TypeError, match="text must be a str"):
        text_to_token_ids(b"bytes")
    with pytest.raises(ValueError, match=r"shape \(1, n\) or \(n,\), got \(2, 3\)"):
        token_ids_to_text(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 50257 is out of range"):
        token_ids_to_text(torch.tensor([1, 50257]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        token_ids_to_text([-1])
    with pytest.raises(TypeError, match="integer tensor"):
        token_ids_to_text(torch.tensor([1.0]))
    assert token_ids_to_text([15496, 11]) == "Hello,"


# --- kernels ----------------------------------------------------------------------------------


def test_kernel_inputs_get_clear_errors():
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(TypeError, match="add_layer_norm: residual must be a torch.Tensor"):
        kernels.add_layer_norm(x, None)
    with pytest.raises(TypeError, match="layer_norm: x must be a torch.Tensor"):
        kernels.layer_norm(None)
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(TypeError, match="attention: generator must be a torch.Generator"):
        kernels.attention(q, q, q, dropout_p=0.1, generator=123)
    with pytest.raises(TypeError, match="attention: causal must be True or False"):
        kernels.attention(q, q, q, causal="no")
    with pytest.raises(TypeError, match="swap_layer_norms: module must be a torch.nn.Module"):
        kernels.swap_layer_norms("model")


def test_attention_double_backward_says_it_is_not_supported():
    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(kernels.attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention: double backward .* is not supported"):
        dq.sum().backward()
    kernels.attention(q, k, v).sum().backward()  # single backward unaffected
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on 0/0
def test_layer_norm_eps_0_and_numpy_eps_as_torch():
    x = torch.randn(4, 16, device=DEVICE)
    x[1] = 2.5  # a constant row: 0/0 with eps = 0, NaN in torch too
    for eps in (0, 0.0, np.float32(1e-5), np.float64(1e-6)):
        ours, ref = kernels.LayerNorm(16, eps=eps).to(DEVICE), nn.LayerNorm(16, eps=eps).to(DEVICE)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(kernels.add_layer_norm(x, x, eps=eps)[0], ref(2 * x),
                                   rtol=1e-5, atol=1e-5, equal_nan=True)
    y = kernels.LayerNorm(16, eps=0).to(DEVICE)(x)
    assert y[1].isnan().all() and y[[0, 2, 3]].isfinite().all()


def test_attention_accepts_numpy_scale_and_dropout():
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    want = kernels.attention(q, q, q, scale=0.25)
    torch.testing.assert_close(kernels.attention(q, q, q, scale=np.float32(0.25)), want)
    g = lambda: torch.Generator().manual_seed(1)
    torch.testing.assert_close(kernels.attention(q, q, q, dropout_p=np.float64(0.5), generator=g()),
                               kernels.attention(q, q, q, dropout_p=0.5, generator=g()))


# --- command line -----------------------------------------------------------------------------


def _cli_error(capsys, *argv):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    gen = ["generate", "x", "--max-new-tokens", "2", "--kernels", "torch"]
    cuda = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert "no CUDA device" in _cli_error(capsys, *gen, "--device", cuda) or torch.cuda.is_available()
    assert "cpu or cuda" in _cli_error(capsys, *gen, "--device", "meta")
    assert "not a device" in _cli_error(capsys, *gen, "--device", "gpu0")
    assert "--seed" in _cli_error(capsys, *gen, "--seed", str(2**64))
    assert "--seed" in _cli_error(capsys, *gen, "--seed", "-1")
    assert "temperature" in _cli_error(capsys, *gen, "--temperature", "nan")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not weights")
    assert "model.safetensors" in _cli_error(capsys, *gen, "--weights", str(garbage))
    a_file = tmp_path / "trace"
    a_file.write_text("")
    assert "is a file" in _cli_error(capsys, "profile", "--config", "tiny", "--device", "cpu",
                                     "--kernels", "torch", "--out", str(a_file))


def test_cli_triton_kernels_on_cpu_without_the_interpreter_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("gptfast.kernels._common.INTERPRETING", False)
    err = _cli_error(capsys, "generate", "x", "--kernels", "triton", "--device", "cpu")
    assert "needs Triton's interpreter" in err


def test_cli_output_piped_into_head_ends_quietly():
    cmd = [sys.executable, "-m", "gptfast", "generate", "Hello", "--max-new-tokens", "40",
           "--kernels", "torch", "--device", "cpu", "--temperature", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(3)  # like `| head -c 3`: read a little, then close the pipe
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# --- the benchmark suite's options ----------------------------------------------------------


def _pytest(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=300)


def test_bench_results_dir_naming_a_file_is_a_usage_error(tmp_path):
    a_file = tmp_path / "results.md"
    a_file.write_text("")
    proc = _pytest("bench/test_layer_norm.py", "--collect-only", "--results-dir", str(a_file))
    assert proc.returncode == 4 and "a file; give a directory" in proc.stderr + proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="about CPU machines")
def test_bench_interpreter_cases_skip_with_a_reason_under_triton_interpret_0(tmp_path):
    proc = _pytest("bench/test_layer_norm.py", "-k", "interpreter", "-rs", "--no-static-report",
                   "--results-dir", str(tmp_path), env={"TRITON_INTERPRET": "0"})
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "2 skipped" in out and "TRITON_INTERPRET=0" in out, out


# --- issue 25: training options, numpy numbers, bounded requests, one message per problem ----

TRAIN = {"data": "prepared", "max_steps": 1}  # enough for the checks, which read no file


@pytest.mark.parametrize("bad, error, match", [
    ({"grad_clip": float("nan")}, ValueError, "grad_clip must be a finite number, got nan"),
    ({"grad_clip": float("inf")}, ValueError, "grad_clip must be a finite number"),
    ({"grad_clip": -1.0}, ValueError, "grad_clip must be >= 0"),
    ({"batch_size": True}, TypeError, "batch_size must be an int, got True"),
    ({"max_steps": 2.0}, TypeError, "max_steps must be an int, got 2.0"),
    ({"compile": "yes"}, TypeError, "compile must be True or False, got 'yes'"),
    ({"fsdp": 1}, TypeError, "fsdp must be True or False, got 1"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
    ({"seed": 2**63}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
    ({"lr": "3e-4"}, TypeError, "lr must be a number, got '3e-4'"),
    ({"lr": True}, TypeError, "lr must be a number, got True"),
    ({"min_lr": float("nan")}, ValueError, "min_lr must be a finite number"),
    ({"beta1": 1.0}, ValueError, r"beta1 must be in \[0, 1\)"),
    ({"drop_rate": 1.5}, ValueError, r"drop_rate must be in \[0, 1\)"),
    ({"prompt": 5}, TypeError, "prompt must be a str, got 5"),
    ({"prompt": "", "sample_every": 10}, ValueError, "prompt is empty"),
    ({"data": 5}, TypeError, "data must be a str or a path, got 5"),
    ({"device": "gpu"}, ValueError, "device 'gpu' is not a device"),
    ({"device": "meta"}, ValueError, "device 'meta': gptfast runs on cpu or cuda"),
    ({"resume": 5}, TypeError, "resume must be a str or a path, got 5"),
])
def test_bad_training_options_are_refused_before_anything_runs(bad, error, match, tmp_path):
    with pytest.raises(error, match=match):
        gptfast.train(**{**TRAIN, "out": str(tmp_path / "run"), **bad})
    assert not (tmp_path / "run").exists()


def test_training_options_take_numpy_numbers_and_paths(tmp_path):
    from gptfast.train_options import make_options

    opts = make_options({"data": tmp_path, "max_steps": np.int64(3), "batch_size": np.int32(4),
                         "lr": np.float32(0.5), "compile": np.bool_(False), "out": tmp_path / "o"})
    assert (type(opts.max_steps), type(opts.batch_size), type(opts.lr), type(opts.compile)) == (
        int, int, float, bool)
    assert (opts.max_steps, opts.batch_size, opts.lr) == (3, 4, 0.5) and opts.data == str(tmp_path)


def test_training_errors_name_the_problem(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file; give a directory for the run"):
        gptfast.train(**TRAIN, out=str(a_file))
    with pytest.raises(TypeError, match="callback must be callable"):
        gptfast.train(**TRAIN, callback="print")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        from gptfast.dataset import prepare

        text = tmp_path / "a.txt"
        text.write_text("some text\n")
        prepare([text], a_file)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from gptfast.dataset import prepare

    root = tmp_path_factory.mktemp("prepared")
    (root / "a.txt").write_text("every effort moves you to the big red ball.\n" * 40)
    prepare([root / "a.txt"], root / "d", val_fraction=0.2, seq_len=16)
    return root / "d"


def test_a_config_whose_vocabulary_cannot_hold_the_data_is_refused(prepared, tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**CFG, "context_length": 32}))
    with pytest.raises(ValueError, match="up to 50256 .* do not fit a model vocabulary of 61"):
        gptfast.train(data=str(prepared), config_json=str(small), max_steps=1, seq_len=16,
                      kernels="torch", out=str(tmp_path / "run"))


def test_a_corrupt_checkpoint_under_resume_is_one_plain_line(capsys, tmp_path):
    """torch.load's weights-only refusal is six lines with escape codes; the user gets one."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "gptfast-train-1", "model": nn.Linear(2, 2)}, run / "ckpt.pt")
    err = _cli_error(capsys, "train", "--resume", str(run))
    assert "ckpt.pt: not a readable checkpoint (it pickles a Python object" in err
    assert "\x1b" not in err
    (run / "ckpt.pt").write_bytes(b"\x80\x02garbage")
    assert "not a readable checkpoint" in _cli_error(capsys, "train", "--resume", str(run))
    (run / "ckpt.pt").write_bytes(b"")
    assert "empty or truncated" in _cli_error(capsys, "train", "--resume", str(run))


def test_bad_weight_files_are_described_in_one_line(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            load_gpt2(path, kernels="torch")
        message = str(info.value)
        assert "\n" not in message and "\x1b" not in message, (name, message)


def test_train_options_of_the_cli_are_one_line_errors(capsys, tmp_path):
    base = ["train", "--data", str(tmp_path), "--max-steps", "1", "--out", str(tmp_path / "o")]
    assert "grad_clip must be a finite number" in _cli_error(capsys, *base, "--grad-clip", "nan")
    assert "seed must be in" in _cli_error(capsys, *base, "--seed", "-1")
    assert "device 'cuda:7'" in _cli_error(capsys, *base, "--device", "cuda:7")


def test_cli_usage_errors_are_one_line_and_exit_2(capsys):
    assert "argument --lr: invalid float value: 'abc'" in _cli_error(capsys, "train", "--lr", "abc")
    assert "the following arguments are required: prompt" in _cli_error(capsys, "generate")
    assert "invalid choice: 'bogus'" in _cli_error(capsys, "bogus")
    assert "unrecognized arguments: --steps" in _cli_error(capsys, "info", "--steps", "1")


def _hf_weights(tmp_path, vocab):
    """A small model saved as Hugging Face GPT-2 safetensors (n_head in config.json)."""
    from safetensors.torch import save_file

    from gptfast.weights import chapter_to_hf

    model = tiny(vocab_size=vocab)
    state = model.state_dict()
    if vocab > 50257:  # the ids past GPT-2's win every greedy step: hidden = 1, logits = row sums
        state["final_norm.scale"].zero_()
        state["final_norm.shift"].fill_(1.0)
        state["out_head.weight"].zero_()[50257:] = 1.0
    path = tmp_path / f"v{vocab}" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.cpu() for k, v in chapter_to_hf(state).items()}, str(path))
    (path.parent / "config.json").write_text(json.dumps({"n_head": CFG["n_heads"]}))
    return str(path)


def test_cli_generate_with_a_smaller_vocabulary_has_no_eos(capsys, tmp_path):
    path = _hf_weights(tmp_path, 61)
    gen = ["generate", "--weights", path, "--max-new-tokens", "3", "--device", DEVICE,
           "--kernels", "torch"]
    assert main([*gen, "!"]) == 0  # "!" is token 0: inside the model's 61
    assert capsys.readouterr().err.endswith(f"on {DEVICE}\n")
    err = _cli_error(capsys, *gen, "Hello")
    assert "token id 15496, outside the model's vocabulary of 61 tokens" in err


def test_cli_generate_prints_ids_past_the_tokenizer_as_replacement_characters(capsys, tmp_path):
    gen = ["generate", "Hi", "--weights", _hf_weights(tmp_path, 50260), "--max-new-tokens", "3",
           "--device", DEVICE, "--kernels", "torch"]
    assert main(gen) == 0
    assert capsys.readouterr().out == "Hi" + "\N{REPLACEMENT CHARACTER}" * 3 + "\n"


def test_generate_text_simple_checks_its_arguments_as_generate_does():
    model, x = tiny(), ids(1, 4)
    with pytest.raises(ValueError, match="context_size must be a positive int, got -1"):
        generate_text_simple(model, x, 2, -1)  # it used to drop the first token
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int, got -1"):
        generate_text_simple(model, x, -1, 16)
    with pytest.raises(TypeError, match="model must be a torch module"):
        generate_text_simple(None, x, 2, 16)
    assert torch.equal(generate_text_simple(model, x, np.int64(3), np.int64(16)),
                       generate(model, x, 3, use_cache=False))


def test_max_new_tokens_is_bounded_before_anything_runs():
    from gptfast.generation import MAX_NEW_TOKENS

    model, x = tiny(), ids(1, 2)
    for call in (lambda n: generate(model, x, n), lambda n: generate_tokens(model, x, n),
                 lambda n: generate_batch(model, [[1, 2]], n),
                 lambda n: generate_text_simple(model, x, n, 16)):
        with pytest.raises(ValueError, match=r"max_new_tokens must be at most 2\*\*20"):
            call(10**30)
        with pytest.raises(ValueError, match=r"at most 2\*\*20 = 1048576 per call, got 1048577"):
            call(MAX_NEW_TOKENS + 1)
    generate_tokens(model, x, MAX_NEW_TOKENS).close()  # the bound itself is a valid request


def test_forward_checks_that_the_ids_are_on_the_models_device():
    with pytest.raises(ValueError, match="the token ids are on meta but the model is on"):
        tiny()(ids(1, 3).to("meta"))  # it used to return a tensor on the model's device
    with pytest.raises(ValueError, match="targets are on meta, the token ids on"):
        tiny().loss(ids(1, 3), ids(1, 3).to("meta"))


@pytest.mark.parametrize("targets, ignore_index, error, match", [
    (torch.full((1, 4), 99), -100, ValueError,
     r"^target 99 is out of range for 61 classes \(and is not ignore_index=-100\)$"),
    (torch.full((1, 4), -5), -100, ValueError, r"^target -5 is out of range for 61 classes"),
    (torch.zeros(1, 4), -100, TypeError, r"^targets must be int64 or int32 class indices, got torch.float32$"),
    (torch.zeros(1, 4, dtype=torch.uint8), -100, TypeError, "got torch.uint8"),
    (torch.zeros(1, 4, dtype=torch.int16), -100, TypeError, "got torch.int16"),
    (torch.zeros(1, 4, dtype=torch.long), 1.5, TypeError, r"^ignore_index must be an int, got 1.5$"),
    (torch.zeros(1, 4, dtype=torch.long), None, TypeError, "ignore_index must be an int, got None"),
])
def test_the_loss_gives_one_message_on_both_paths(targets, ignore_index, error, match):
    model, x = tiny(), ids(1, 4)
    for path in ("torch", "triton"):
        with pytest.raises(error, match=match):
            model.use_kernels(path).loss(x, targets.to(DEVICE), ignore_index=ignore_index)


def test_the_loss_can_skip_reading_targets_known_to_be_valid():
    """check_targets=False (the trainer's: TokenData checked the batch on the host) reads no
    target back: a bad one gives a NaN loss and NaN gradients on both paths instead of the
    ValueError (on CUDA the torch path's cross-entropy would device-assert on it: it no longer
    sees it); valid targets give the same loss either way (the torch path's exactly). On CUDA
    the checked call raises the ValueError and the process's CUDA use goes on."""
    model, x = tiny(), ids(1, 4)
    y = ids(1, 4)
    y[0, 1] = -100
    bad = y.clone()
    bad[0, 2] = 99
    for path in ("torch", "triton"):
        model.use_kernels(path)
        checked = model.loss(x, y)
        unread = model.loss(x, y, check_targets=False)
        if path == "torch":
            assert torch.equal(unread, checked)
        torch.testing.assert_close(unread, checked)
        model.zero_grad(set_to_none=True)
        loss = model.loss(x, bad, check_targets=False)
        loss.backward()
        assert loss.isnan() and model.out_head.weight.grad.isnan().any(), path
    model.zero_grad(set_to_none=True)
    with pytest.raises(TypeError, match="check_targets must be True or False, got 'no'"):
        model.loss(x, y, check_targets="no")
    for path in ("torch", "triton"):
        with pytest.raises(ValueError, match="target 99 is out of range"):
            model.use_kernels(path).loss(x, torch.full((1, 4), 99, device=DEVICE))
        assert torch.isfinite(model.loss(x, y))  # the device still works


def test_numpy_integers_for_ignore_index_and_the_kernels_numbers():
    model, x = tiny(), ids(2, 5)
    y = x.masked_fill(x < 20, 7)
    for path in ("torch", "triton"):
        model.use_kernels(path)
        torch.testing.assert_close(model.loss(x, y, ignore_index=np.int64(7)),
                                   model.loss(x, y, ignore_index=7))
    h, w = torch.randn(4, 16, device=DEVICE), torch.randn(9, 16, device=DEVICE)
    t = torch.tensor([1, 2, 3, -1], device=DEVICE)
    torch.testing.assert_close(
        kernels.linear_cross_entropy(h, w, t, ignore_index=np.int32(-1), label_smoothing=np.float32(0.25)),
        kernels.linear_cross_entropy(h, w, t, ignore_index=-1, label_smoothing=0.25))
    q = torch.randn(1, 2, 1, 16, device=DEVICE)
    c = torch.randn(1, 2, 9, 16, device=DEVICE)
    torch.testing.assert_close(kernels.decode_attention(q, c, c, 9, scale=np.float32(0.5), num_splits=np.int64(2)),
                               kernels.decode_attention(q, c, c, 9, scale=0.5, num_splits=2))


def test_the_tokenizer_helpers_name_a_bad_encoding_and_take_numpy_ids():
    with pytest.raises(TypeError, match="enc must be a tiktoken.Encoding .* got str"):
        text_to_token_ids("hi", enc="gpt2")
    with pytest.raises(TypeError, match="enc must be a tiktoken.Encoding .* got int"):
        token_ids_to_text([1], enc=5)
    assert token_ids_to_text([np.int64(15496), np.int32(11)]) == "Hello,"
