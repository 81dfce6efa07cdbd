"""GPTModel.compile_loss: the compiled training loss (gptfast/compiled.py).

On CPU the Triton kernels run in the interpreter inside the compiled graphs. Two tests compile
with Inductor (its CPU compile of the tiny model is most of this file's time); the shape and
argument tests trace with AOTAutograd only (backend="aot_eager"), which shares dynamo's graphs
and guards. Graphs are counted through a counting backend; every compile is fullgraph=True (the
default), so a graph break fails the call.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import gptfast.model
from gptfast import GPTModel
from gptfast.compiled import TrainingLoss
from gptfast.kernels.testing import assert_agrees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Head dim 24 (not a power of two) and odd lengths: the kernels' boundary paths run.
TINY = {"vocab_size": 101, "context_length": 32, "emb_dim": 48, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def tiny_model(drop_rate=0.0, kernels="triton"):
    torch.manual_seed(0)
    model = GPTModel({**TINY, "drop_rate": drop_rate}, kernels=kernels).to(DEVICE)
    with torch.no_grad():  # non-trivial norm parameters
        for name, p in model.named_parameters():
            if name.endswith(("scale", "shift")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(t=19, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids, targets = (torch.randint(0, TINY["vocab_size"], (b, t), generator=g) for _ in range(2))
    return ids.to(DEVICE), targets.to(DEVICE)


def loss_and_grads(model, loss_fn, ids, targets):
    params = [p for _, p in sorted(model.named_parameters())]
    loss = loss_fn(ids, targets)
    return [loss.detach(), *torch.autograd.grad(loss, params)]


def assert_no_graph_breaks():
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


def test_compiled_loss_matches_the_eager_step_in_one_graph(monkeypatch):
    """Inductor, fullgraph: loss and every gradient by the 2x rule against float64 (eager Triton
    kernels the baseline); the same shapes again compile nothing, also when the kernels were
    not imported before the first trace (the state of a fresh process)."""
    monkeypatch.setattr(gptfast.model, "_KERNELS", [])
    model = tiny_model()
    counter = CompileCounterWithBackend("inductor")
    step = model.compile_loss(backend=counter)
    ids, targets = batch()
    ours = loss_and_grads(model, step, ids, targets)
    eager = loss_and_grads(model, model.loss, ids, targets)
    ref_model = copy.deepcopy(model).double().use_kernels("torch")
    ref = loss_and_grads(ref_model, ref_model.loss, ids, targets)
    names = ["loss", *(name for name, _ in sorted(model.named_parameters()))]
    for name, a, e, r in zip(names, ours, eager, ref, strict=True):
        assert_agrees(a, e, r, atol=1e-5, what=name)
    loss_and_grads(model, step, *batch(seed=2))  # a second step: the same graph
    assert_no_graph_breaks()
    assert counter.frame_count == 1


@torch._inductor.config.patch(fallback_random=True)
def test_dropout_step_equals_the_eager_step_with_eager_rng():
    """Dropout 0.1 (the chapter's rate) in attention and on every branch: with Inductor drawing
    its random numbers as eager mode does, the compiled step from one seed is the eager step
    from that seed, to rounding; the next step draws other masks."""
    model = tiny_model(drop_rate=0.1)
    step = model.compile_loss()
    ids, targets = batch()
    torch.manual_seed(5)
    ours = loss_and_grads(model, step, ids, targets)
    torch.manual_seed(5)
    eager = loss_and_grads(model, model.loss, ids, targets)
    for a, e in zip(ours, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    model.eval()
    without = model.loss(ids, targets).detach()
    model.train()
    assert not torch.equal(ours[0], without)  # the masks dropped something
    assert not torch.equal(loss_and_grads(model, step, ids, targets)[0], ours[0])
    assert_no_graph_breaks()


def test_recompiles_are_bounded():
    """One graph for repeated shapes; a second sequence length compiles once more with a dynamic
    length, which then serves every length, and a second batch size likewise (dynamo's automatic
    dynamic shapes; a size of 1 would be specialised apart); an eager evaluation in between
    (eval mode, no_grad) costs the compiled loss no recompile."""
    model = tiny_model(kernels="torch")
    counter = CompileCounterWithBackend("aot_eager")
    step = model.compile_loss(backend=counter)
    for t, b in ((19, 2), (19, 2), (23, 2), (11, 2), (32, 2), (7, 3), (7, 5)):
        ids, targets = batch(t, b)
        ours = step(ids, targets)
        torch.testing.assert_close(ours, model.loss(ids, targets), rtol=1e-5, atol=1e-6)
        ours.backward()
        model.eval()
        with torch.no_grad():
            model.loss(ids, targets)
        model.train()
    assert_no_graph_breaks()
    assert counter.frame_count == 3


def test_targets_are_checked_only_when_asked():
    model = tiny_model(kernels="torch")
    ids, targets = batch()
    bad = targets.clone()
    bad[1, 3] = TINY["vocab_size"]
    counter = CompileCounterWithBackend("aot_eager")
    checked = model.compile_loss(backend=counter, check_targets=True)
    with pytest.raises(ValueError, match=r"target 101 is out of range for 101 classes"):
        checked(ids, bad)
    with pytest.raises(ValueError, match=r"targets must be a tensor shaped like the token ids"):
        checked(ids, targets[:, :5])
    assert counter.frame_count == 0  # refused before any trace
    torch.testing.assert_close(checked(ids, targets), model.loss(ids, targets))
    assert TrainingLoss(model).check_targets is False  # the trainer's: TokenData checked the data


@pytest.mark.parametrize("kwargs,error,message", [
    ({"mode": "fast"}, ValueError, r"mode must be one of \('default', .*'reduce-overhead'.*got 'fast'"),
    ({"mode": "reduce-overhead", "backend": "aot_eager"}, ValueError,
     r"mode='reduce-overhead' is an Inductor mode; backend 'aot_eager' takes mode='default'"),
    ({"fullgraph": 1}, TypeError, r"fullgraph must be True or False, got 1"),
    ({"dynamic": 1}, TypeError, r"dynamic must be None, True or False, got 1"),
    ({"check_targets": "yes"}, TypeError, r"check_targets must be True or False, got 'yes'"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_model(kernels="torch").compile_loss(**kwargs)


@cuda_only
def test_reduce_overhead_step_with_dropout_replays_cuda_graphs():
    """mode="reduce-overhead": the loss and its backward run as CUDA graphs (no skip), each
    step with fresh dropout masks; gradients left from an earlier step are refused."""
    model = tiny_model(drop_rate=0.1)
    step = model.compile_loss(mode="reduce-overhead")
    ids, targets = batch(t=32)
    grads = []
    for _ in range(4):
        step(ids, targets).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert not counters["inductor"]["cudagraph_skips"]
    assert any(not torch.equal(a, b) for a, b in zip(grads[-1], grads[-2]))
    step(ids, targets).backward()
    with pytest.raises(RuntimeError, match=r"zero_grad\(set_to_none=True\) after each step"):
        step(ids, targets)
