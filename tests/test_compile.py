"""torch.compile over the kernels: the gptfast:: ops trace as single graph nodes.

Every test compiles with ``fullgraph=True`` (any graph break is an error) through a counting
backend (Inductor; AOTAutograd alone for two whole-model shape tests), so it also sees how many
graphs were compiled: one per shape signature, none again on repeated calls. Compiled results
follow the 2x rule against the float64 reference, with eager runs of the same kernels as the
baseline. ``torch.library.opcheck`` checks each op's schema, fake (meta) implementation,
autograd registration and AOT dispatch.
On CPU the kernels run in Triton's interpreter inside the compiled graph; shapes stay tiny
(Inductor's CPU compile, not the kernels, is most of this file's time).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from gptfast import GPTModel
from gptfast.kernels import add_layer_norm, attention, decode_attention, layer_norm
from gptfast.kernels.testing import assert_agrees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def compile_counted(fn, backend="inductor", **options):
    """fn compiled with fullgraph=True, and the counter of the graphs it compiled."""
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, **options), counter


def assert_no_graph_breaks():
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def outputs_and_grads(fn, inputs, grads, cast=None, dynamic_dim=None):
    """fn's outputs on fresh leaves (cast to ``cast``), backward with ``grads``; (outs, grads).
    ``dynamic_dim``: mark this dim of every non-parameter (2-D or more) input dynamic."""
    xs = leaves(*(None if t is None else t.to(cast or t.dtype) for t in inputs))
    for t in xs:
        if dynamic_dim is not None and t is not None and t.dim() > 1:
            torch._dynamo.mark_dynamic(t, dynamic_dim)
    outs = fn(*xs)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs], [None if t is None else t.grad for t in xs]


def check(ours, eager, ref, names):
    for name, a, e, r in zip(names, ours, eager, ref):
        if r is None:
            assert a is None and e is None, f"{name}: expected no gradient"
            continue
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"{name}: {a.dtype} {a.shape}, eager {e.dtype} {e.shape}"
        assert_agrees(a, e, r, atol=ATOL[e.dtype], what=name)


# ---- the LayerNorm family ------------------------------------------------------------------


def norm_chain(x, residual, weight, bias):
    """A bf16 LayerNorm with fp32 parameters, its output added to an fp32 residual and
    normalized (weight only), and the fp32 sum normalized again (no affine)."""
    h = layer_norm(x, weight, bias)
    y, s = add_layer_norm(h, residual, weight, None)
    return y, s, layer_norm(s, None, None)


def reference_chain(x, residual, weight, bias):
    """norm_chain in eager PyTorch (run in float64: the reference)."""
    n = x.shape[-1]
    h = F.layer_norm(x, (n,), weight, bias, 1e-5)
    s = h + residual
    return F.layer_norm(s, (n,), weight, None, 1e-5), s, F.layer_norm(s, (n,), None, None, 1e-5)


def norm_inputs(rows, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*rows, n, generator=g) * 2 + 0.5).to(DEVICE, torch.bfloat16)
    residual = torch.randn(*rows, n, generator=g).to(DEVICE)
    weight = (torch.randn(n, generator=g) * 0.5 + 1).to(DEVICE)
    bias = (torch.randn(n, generator=g) * 0.2).to(DEVICE)
    grads = [torch.randn(*rows, n, generator=g).to(DEVICE) for _ in range(3)]
    return (x, residual, weight, bias), grads


def test_norm_ops_compile_without_graph_breaks_and_match_eager():
    inputs, grads = norm_inputs((3, 5))
    compiled, counter = compile_counted(norm_chain)
    ours = outputs_and_grads(compiled, inputs, grads)
    eager = outputs_and_grads(norm_chain, inputs, grads)
    ref = outputs_and_grads(reference_chain, inputs, grads, cast=torch.float64)
    names = ["y", "s", "z", "dx", "dresidual", "dweight", "dbias"]
    check(ours[0] + ours[1], eager[0] + eager[1], ref[0] + ref[1], names)
    assert_no_graph_breaks()
    assert counter.frame_count == 1
    outputs_and_grads(compiled, inputs, grads)  # same shapes again: no recompile
    assert counter.frame_count == 1


def test_norm_graph_holds_the_ops_as_single_nodes():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    inputs, _ = norm_inputs((2, 3))
    torch.compile(norm_chain, backend=backend, fullgraph=True)(*inputs)
    assert seen.count("gptfast.layer_norm.default") == 2
    assert seen.count("gptfast.add_layer_norm.default") == 1


@pytest.mark.parametrize("marked", [True, False], ids=["mark_dynamic", "automatic"])
def test_changing_row_counts(marked):
    """Marked dynamic: one graph for every length. Unmarked: the first call specializes, the
    second shape recompiles once with a dynamic dimension, later shapes reuse it."""
    compiled, counter = compile_counted(norm_chain)
    for rows in ((3, 5), (3, 7), (3, 2)):
        inputs, grads = norm_inputs(rows, seed=rows[1])
        ours = outputs_and_grads(compiled, inputs, grads, dynamic_dim=1 if marked else None)
        eager = outputs_and_grads(norm_chain, inputs, grads)
        for a, e in zip(ours[0] + ours[1], eager[0] + eager[1]):
            torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same kernels on the same data
    assert_no_graph_breaks()
    assert counter.frame_count == (1 if marked else 2)


@pytest.mark.parametrize("affine", ["wb", "w", ""])
def test_opcheck_layer_norm(affine):
    x, residual, weight, bias = norm_inputs((2, 3), n=24)[0]
    w = weight.requires_grad_() if "w" in affine else None
    b = bias.requires_grad_() if "b" in affine else None
    torch.library.opcheck(torch.ops.gptfast.layer_norm.default, (x.requires_grad_(), w, b, 1e-5))
    torch.library.opcheck(torch.ops.gptfast.add_layer_norm.default,
                          (x, residual.requires_grad_(), w, b, 1e-5))


def test_opcheck_layer_norm_backward():
    x, residual, weight, bias = norm_inputs((2, 3), n=24)[0]
    _, mean, rstd = torch.ops.gptfast.layer_norm(x, weight, bias, 1e-5)
    dy = torch.randn_like(x)
    for dsum, w, b in ((None, weight, bias), (torch.randn_like(x), weight, None), (None, None, None)):
        torch.library.opcheck(torch.ops.gptfast.layer_norm_backward.default,
                              (dy, dsum, x, w, b, mean, rstd))


# ---- decode attention ------------------------------------------------------------------------


def decode_inputs(B, Tq, t_max=20, H=2, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, t, D, generator=g).to(DEVICE) for t in (Tq, t_max, t_max))
    return q, k, v


def decode_reference(q, k, v, lens):
    """Causal (bottom-right) attention of q over each row's first lens[b] keys, in q's dtype."""
    Tq, out = q.shape[2], []
    for b, n in enumerate(lens):
        s = q[b] @ k[b, :, :n].transpose(-1, -2) / q.shape[-1] ** 0.5
        rows, cols = torch.arange(Tq, device=q.device), torch.arange(n, device=q.device)
        hidden = cols[None, :] > rows[:, None] + n - Tq
        out.append(torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1) @ v[b, :, :n])
    return torch.stack(out)


def decode_step(q, k_cache, v_cache, cache_len):
    return decode_attention(q, k_cache, v_cache, cache_len) * 2


@torch.no_grad()
def test_decode_attention_compiles_for_growing_int_lengths():
    """An int cache_len is a Python scalar to dynamo: the first length specializes, the second
    recompiles with a symbolic length, later lengths reuse that graph."""
    q, k, v = decode_inputs(B=2, Tq=1)
    compiled, counter = compile_counted(decode_step)
    for n in (9, 13, 17, 20):
        ours, eager = compiled(q, k, v, n), decode_step(q, k, v, n)
        ref = decode_reference(q.double(), k.double(), v.double(), [n, n]) * 2
        assert_agrees(ours, eager, ref, atol=1e-5, what=f"cache_len {n}")
    assert_no_graph_breaks()
    assert counter.frame_count == 2


@torch.no_grad()
def test_decode_attention_compiles_with_per_row_lengths():
    """A per-row length tensor is a graph input: one graph for any values (under compile its
    values are trusted, as for a GPU tensor in eager mode)."""
    q, k, v = decode_inputs(B=2, Tq=2)
    compiled, counter = compile_counted(decode_step)
    for lens in ([5, 17], [20, 2]):
        cache_len = torch.tensor(lens)
        ours, eager = compiled(q, k, v, cache_len), decode_step(q, k, v, cache_len)
        ref = decode_reference(q.double(), k.double(), v.double(), lens) * 2
        assert_agrees(ours, eager, ref, atol=1e-5, what=f"cache_len {lens}")
    assert_no_graph_breaks()
    assert counter.frame_count == 1


def test_opcheck_decode_attention():
    q, k, v = decode_inputs(B=2, Tq=2)
    op = torch.ops.gptfast.decode_attention.default
    torch.library.opcheck(op, (q, k, v, None, 11, 0.2, None))
    lens = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(op, (q, k, v, lens, 20, 0.2, 2))


# ---- flash attention -------------------------------------------------------------------------


def attention_inputs(tq=19, tk=19, d=24, dtype=torch.float16, seed=0):
    """(1, 2, tq, d) queries and (1, 2, tk, d) keys/values (head dim not a power of 2), and an
    upstream grad."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, 2, t, d, generator=g).to(DEVICE, dtype) for t in (tq, tk, tk, tq))
    return (q, k, v), do


def attention_reference(q, k, v):
    """Bottom-right causal softmax(q k^T / sqrt(d)) v in eager PyTorch (run in float64)."""
    tq, tk = q.shape[-2], k.shape[-2]
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    s = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v,)


def causal_attention(q, k, v):
    return (attention(q, k, v, causal=True),)


@pytest.mark.parametrize("tq", [19, 7], ids=["self", "continuation"])
def test_attention_compiles_and_matches_eager(tq):
    inputs, do = attention_inputs(tq=tq)
    compiled, counter = compile_counted(causal_attention)
    ours = outputs_and_grads(compiled, inputs, [do])
    eager = outputs_and_grads(causal_attention, inputs, [do])
    ref = outputs_and_grads(attention_reference, inputs, [do], cast=torch.float64)
    check(ours[0] + ours[1], eager[0] + eager[1], ref[0] + ref[1], ["o", "dq", "dk", "dv"])
    assert_no_graph_breaks()
    assert counter.frame_count == 1


def dropout_attention(q, k, v):
    return (attention(q, k, v, causal=True, dropout_p=0.3),)


def test_compiled_dropout_follows_torch_seed():
    """Under compile the seed is drawn by the graph's own RNG: torch.manual_seed repeats a run,
    and successive calls drop different weights."""
    inputs, _ = attention_inputs(tq=9, tk=9, dtype=torch.float32)
    compiled, _ = compile_counted(dropout_attention)
    torch.manual_seed(3)
    first = compiled(*inputs)[0]
    torch.manual_seed(3)
    again, other = compiled(*inputs)[0], compiled(*inputs)[0]
    assert torch.equal(first, again)
    assert not torch.equal(again, other)
    assert_no_graph_breaks()


@torch._inductor.config.patch(fallback_random=True)
def test_compiled_dropout_with_eager_rng_matches_eager():
    """With Inductor's fallback_random the graph draws the seed exactly as eager mode does, so
    the compiled forward and backward (which regenerates the forward's mask) equal eager's."""
    inputs, do = attention_inputs(tq=9, tk=9, dtype=torch.float32)
    compiled, _ = compile_counted(dropout_attention)
    torch.manual_seed(5)
    ours = outputs_and_grads(compiled, inputs, [do])
    torch.manual_seed(5)
    eager = outputs_and_grads(dropout_attention, inputs, [do])
    for a, e in zip(ours[0] + ours[1], eager[0] + eager[1]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert_no_graph_breaks()


@pytest.mark.parametrize("dropout_p,padded", [(0.0, False), (0.25, False), (0.0, True)])
def test_opcheck_attention(dropout_p, padded):
    (q, k, v), do = attention_inputs(tq=5, tk=9, d=16, dtype=torch.float32)
    seed = torch.tensor([1234]) if dropout_p else None
    lens = (torch.tensor([3], dtype=torch.int32, device=DEVICE),) * 2 if padded else (None, None)
    torch.library.opcheck(torch.ops.gptfast.attention.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25,
                           dropout_p, seed, *lens, False))
    q, k, v = q.detach(), k.detach(), v.detach()  # the backward op has no backward
    o, lse2 = torch.ops.gptfast.attention(q, k, v, True, 0.25, dropout_p, seed, *lens, False)
    for need_dq, need_dkdv in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.gptfast.attention_backward.default,
                              (do, q, k, v, o, lse2, True, 0.25, dropout_p, seed, *lens, False,
                               need_dq, need_dkdv))


# ---- the model -------------------------------------------------------------------------------

# Head dim 24 (not a power of two), odd lengths: the kernels' boundary paths run.
TINY = {"vocab_size": 101, "context_length": 32, "emb_dim": 48, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


def tiny_model(kernels="triton"):
    torch.manual_seed(0)
    model = GPTModel(TINY, kernels=kernels).to(DEVICE)
    with torch.no_grad():  # non-trivial norm parameters
        for name, p in model.named_parameters():
            if name.endswith(("scale", "shift")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits_and_grads(model, idx, run=None):
    """Logits of ``run`` (default: the model itself, else e.g. its compiled form) and the
    model's parameter gradients."""
    model.zero_grad(set_to_none=True)
    logits = (model if run is None else run)(idx)
    logits.float().square().mean().backward()  # a loss that reaches every parameter
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_model_compiles_fullgraph_and_matches_eager():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 19), device=DEVICE)
    compiled, counter = compile_counted(model)
    ours = logits_and_grads(model, idx, compiled)
    eager = logits_and_grads(model, idx)
    ref = logits_and_grads(copy.deepcopy(model).double().use_kernels("torch"), idx)
    assert_agrees(ours[0], eager[0], ref[0], atol=1e-5, what="logits")
    for name in ref[1]:
        assert_agrees(ours[1][name], eager[1][name], ref[1][name], atol=1e-5, what=f"grad of {name}")
    logits_and_grads(model, idx, compiled)  # a second step: no recompile
    assert_no_graph_breaks()
    assert counter.frame_count == 1


def test_model_graph_has_no_breaks_per_explain():
    model = tiny_model().eval()
    idx = torch.randint(0, TINY["vocab_size"], (1, 7), device=DEVICE)
    explanation = torch._dynamo.explain(model)(idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@torch.no_grad()
def test_model_dynamic_sequence_length_compiles_once():
    """mark_dynamic on the sequence dim: one graph for every length (AOTAutograd without
    Inductor, as in the KV-cache test below)."""
    model = tiny_model().eval()
    compiled, counter = compile_counted(model, backend="aot_eager")
    for t in (7, 12, 19):
        idx = torch.randint(0, TINY["vocab_size"], (2, t), device=DEVICE)
        torch._dynamo.mark_dynamic(idx, 1)
        assert_agrees(compiled(idx), model(idx), model.use_kernels("torch")(idx), atol=1e-5,
                      what=f"logits at length {t}")
        model.use_kernels("triton")
    assert_no_graph_breaks()
    assert counter.frame_count == 1


@torch.no_grad()
def test_model_kv_cache_decoding_compiles_without_graph_breaks():
    """A prefill (flash attention) then one-token steps (decode attention) at int positions:
    one graph for the prefill and one for every step (compiled with a symbolic position, since
    the position already differs from the prefill's). AOTAutograd without Inductor: the
    Inductor side of symbolic shapes around the ops is tested above, at a fraction of the time."""
    model = tiny_model().eval()
    ref_model = copy.deepcopy(model).double().use_kernels("torch")
    compiled, counter = compile_counted(model, backend="aot_eager")
    idx = torch.randint(0, TINY["vocab_size"], (2, 9), device=DEVICE)

    def cached_logits(module, run):
        module.setup_cache(2, 16)
        logits = [run(idx[:, :4], start_pos=0)]
        logits += [run(idx[:, p:p + 1], start_pos=p) for p in range(4, 9)]
        module.reset_cache()
        return torch.cat(logits, dim=1)

    ours, eager = cached_logits(model, compiled), cached_logits(model, model)
    assert_agrees(ours, eager, cached_logits(ref_model, ref_model), atol=1e-5, what="cached logits")
    assert_no_graph_breaks()
    assert counter.frame_count == 2
