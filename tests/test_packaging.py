"""The package's shape: one import name (``gptfast``), the kernels a leaf subpackage that loads
alone, and Hugging Face's own ``kernels`` package importable beside it."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "gptfast" / "kernels"


def run_python(code, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_wheel_installs_one_top_level_package(tmp_path):
    """A wheel must not put a ``kernels/`` into site-packages: that is Hugging Face's package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gptfast", src / "gptfast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        assert tops == {"gptfast"}, tops
        assert "gptfast/kernels/__init__.py" in names
        assert "gptfast/data/gpt2.tiktoken" in names
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["gptfast"]


def test_nothing_in_the_repository_is_importable_as_kernels():
    assert not (ROOT / "kernels").exists()
    assert not (ROOT / "kernels.py").exists()
    out = run_python("import importlib.util as u; s = u.find_spec('kernels');"
                     "print('none' if s is None else s.origin)")
    origin = out.strip()  # none, or Hugging Face's package in site-packages
    assert not origin.startswith(str(ROOT / "kernels")), origin


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module
            if node.module == "gptfast":
                yield from (f"gptfast.{alias.name}" for alias in node.names)


def test_the_kernels_import_nothing_else_of_gptfast():
    for path in sorted(KERNELS.glob("*.py")):
        for name in _imports(path):
            if name == "gptfast" or name.startswith("gptfast."):
                assert name.startswith("gptfast.kernels"), f"{path.name} imports {name}"
            assert name.split(".")[0] != "kernels", f"{path.name} imports top-level {name}"


def test_no_file_imports_a_top_level_kernels():
    for top in ("gptfast", "bench", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for name in _imports(path):
                assert name.split(".")[0] != "kernels", f"{path} imports {name}"


FRESH = """
import sys
import torch, triton
before = set(sys.modules)
import gptfast.kernels
new = sorted(set(sys.modules) - before)
print("\\n".join(new))
"""


def test_import_gptfast_kernels_loads_the_kernels_alone():
    new = run_python(FRESH).split()
    assert "gptfast.kernels" in new and "gptfast.kernels.attention" in new
    ours = [m for m in new if m.startswith("gptfast") and not m.startswith("gptfast.kernels")]
    assert ours == ["gptfast", "gptfast.tokenizer"], ours  # the package's lazy __init__
    heavy = [m for m in new if m.split(".")[0] in {"transformers", "matplotlib", "kernels"}
             or m.startswith("torch.distributed")]
    assert heavy == [], heavy


def test_gptfast_names_load_on_first_use():
    out = run_python("import sys, gptfast; a = 'gptfast.model' in sys.modules;"
                     "m = gptfast.GPTModel; print(a, 'gptfast.model' in sys.modules, m.__module__,"
                     "sorted(gptfast.__all__) == sorted(n for n in gptfast.__all__ if hasattr(gptfast, n)))")
    assert out.split() == ["False", "True", "gptfast.model", "True"]
    import gptfast
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gptfast.nope  # noqa: B018


COEXIST = """
import gptfast.kernels
import transformers.modeling_utils
import kernels
from kernels import CUDAProperties  # Hugging Face's kernel-hub loader, which transformers imports
assert "site-packages" in kernels.__file__, kernels.__file__
import torch
import gptfast.hf
calls = []
real = gptfast.kernels.attention
gptfast.kernels.attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, attn_pdrop=0.0,
                 resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                 attn_implementation="gptfast")
model = GPT2LMHeadModel(cfg).eval()
assert model.config._attn_implementation == "gptfast"
ids = torch.randint(0, 50, (2, 8))
with torch.no_grad():
    got = model(ids).logits
    assert len(calls) == cfg.n_layer, calls
    model.set_attn_implementation("eager")
    want = model(ids).logits
assert model.config._attn_implementation == "eager"
torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
print(transformers.__version__)
"""


def test_hugging_faces_kernels_package_and_ours_in_one_process():
    pytest.importorskip("transformers")
    pytest.importorskip("kernels", reason="Hugging Face's kernels (transformers >= 5.25 needs it)")
    print("transformers", run_python(COEXIST, cwd=ROOT / "tests").strip())



def test_the_tokenizer_function_survives_its_module_being_imported():
    out = run_python("import types, gptfast.cli, gptfast;"
                     "print(not isinstance(gptfast.tokenizer, types.ModuleType) and callable(gptfast.tokenizer))")
    assert out.split() == ["True"]
