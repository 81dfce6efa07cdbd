"""gptfast.kernels.linear_cross_entropy against F.cross_entropy(F.linear(...).float()) in float64.

Loss and the gradients of hidden, weight and bias follow the 2x rule: the error against the
float64 reference is at most twice that of eager PyTorch in the same dtype, plus a slack of
one unit in the last place of the dtype at the reference's largest magnitude (two for bf16 on
CPU, where Triton's interpreter rounds fp32 -> bf16 toward zero, GPUs to nearest). Small
shapes: on CPU the kernel runs in Triton's interpreter. The chunk budget is shrunk in most tests
so that several chunks (and a short last one) run.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from gptfast import GPTModel
from gptfast.kernels import LinearCrossEntropyLoss, linear_cross_entropy
from gptfast.kernels.testing import assert_agrees

lce = importlib.import_module("gptfast.kernels.linear_cross_entropy")  # the module, not the function
lce_plans = importlib.import_module("gptfast.kernels.linear_cross_entropy_plans")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def small_chunks(monkeypatch):
    """A chunk budget of ~4 rows at vocab 1000 in fp32, so every test runs several chunks."""
    monkeypatch.setattr(lce_plans, "CHUNK_BYTES", 16 * 1024)


def reference(hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # .float(), fp64 kept
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    return loss.view(targets.shape) if reduction == "none" else loss


def make(tokens, d, vocab, dtype, bias=True, ignored=0.0, seed=0):
    """hidden (tokens..., d), weight (vocab, d), targets, bias; logits of order 1-3."""
    g = torch.Generator().manual_seed(seed)
    shape = tokens if isinstance(tokens, tuple) else (tokens,)
    hidden = torch.randn(*shape, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * (2.0 / d**0.5)
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignored] = -100
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)
    return cast(hidden), cast(weight), targets.to(DEVICE), cast(b)


def loss_and_grads(fn, hidden, weight, targets, bias, upstream=None, cast=None, **kw):
    """fn's loss and the gradients of (hidden, weight, bias), on fresh leaves cast to ``cast``."""
    leaves = [None if t is None else t.detach().to(cast or t.dtype).requires_grad_()
              for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], targets, leaves[2], **kw)
    g = torch.ones_like(loss) if upstream is None else upstream.to(loss.device, loss.dtype)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, wanted, g))
    return [loss.detach()] + [None if t is None else next(grads) for t in leaves]


def slack(ref, dtype):
    ulps = 2 if (DEVICE == "cpu" and dtype == torch.bfloat16) else 1
    return ulps * torch.finfo(dtype).eps * ref.abs().max().item() + 1e-12


def check(hidden, weight, targets, bias, upstream=None, **kw):
    dtype = hidden.dtype
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, bias, upstream, **kw)
    eager = loss_and_grads(reference, hidden, weight, targets, bias, upstream, **kw)
    ref = loss_and_grads(reference, hidden, weight, targets, bias, upstream, cast=torch.float64, **kw)
    for name, o, e, r in zip(("loss", "grad hidden", "grad weight", "grad bias"), ours, eager, ref):
        if r is None:
            assert o is None
            continue
        assert (o.dtype, o.shape) == (e.dtype, e.shape), f"{name}: {o.dtype} {o.shape}, eager {e.dtype}"
        if name == "loss" and not torch.isfinite(r).all():  # all ignored under "mean": nan
            assert torch.isnan(o).all() and torch.isnan(e).all(), (o, e)
            continue
        assert_agrees(o, e, r, atol=slack(r, dtype if name != "loss" else torch.float32), what=name)
    return ours


# ---- numerics against float64 ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_dtype_and_reduction(dtype, reduction, small_chunks):
    """vocab 1000, 23 tokens (6 chunks in fp32, the last one short), some targets ignored."""
    h, w, t, b = make(23, 24, 1000, dtype, ignored=0.2)
    g = torch.Generator().manual_seed(5)  # the test must not depend on the global RNG
    upstream = torch.rand(23, generator=g) + 0.5 if reduction == "none" else torch.tensor(1.7)
    check(h, w, t, b, upstream, reduction=reduction)


@pytest.mark.parametrize("vocab", [1, 7, 1000, 8192, 50257])
def test_vocab_sizes(vocab, monkeypatch):
    """A single class, tiny and odd vocabularies, whole 4096-column blocks only (8192), and
    GPT-2's 50,257 (12 whole blocks and a partial one: no multiple of any tile).
    Chunks of 4 rows at most (at 50,257 one chunk: CPU BLAS sums a one-row product over 50,257
    terms sequentially, which is not what this tests)."""
    monkeypatch.setattr(lce_plans, "CHUNK_BYTES", max(16 * 1024, 5 * vocab * 4))
    h, w, t, b = make(5 if vocab == 50257 else 9, 8, vocab, torch.float32, ignored=0.2)
    check(h, w, t, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing(dtype, reduction, small_chunks):
    h, w, t, b = make(11, 16, 1000, dtype, ignored=0.3, seed=1)
    upstream = torch.rand(11, generator=torch.Generator().manual_seed(5)) + 0.5 if reduction == "none" else None
    check(h, w, t, b, upstream, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index(ignored, reduction, small_chunks):
    """"mean" divides by the non-ignored count; all ignored gives torch's nan (mean) or 0."""
    fraction = {"none": 0.0, "some": 0.4, "all": 1.0}[ignored]
    h, w, t, b = make(10, 16, 300, torch.float32, ignored=fraction)
    loss = check(h, w, t, b, reduction=reduction, label_smoothing=0.05)[0]
    if ignored == "all" and reduction == "mean":
        assert torch.isnan(loss)


def test_other_ignore_index_in_range(small_chunks):
    """ignore_index may be a real class: those targets are skipped, -100 is then out of range."""
    h, w, t, b = make(12, 16, 50, torch.float32)
    t[::3] = 4
    check(h, w, t, b, ignore_index=4)
    with pytest.raises(ValueError, match="target -100 is out of range"):
        linear_cross_entropy(h, w, torch.full_like(t, -100), b, ignore_index=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias_batched_non_contiguous_hidden(dtype, small_chunks):
    """hidden (batch, seq, d) as a column slice of a wider tensor, targets (batch, seq)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 7, 40, generator=g).to(DEVICE, dtype)
    _, w, t, _ = make((3, 7), 24, 333, dtype, bias=False, ignored=0.1)
    hidden = wide[..., 5:29]
    assert not hidden.is_contiguous()
    check(hidden, w, t, None)


def test_non_contiguous_weight_and_int32_targets(small_chunks):
    h, w, t, b = make(9, 16, 100, torch.float32)
    check(h, w.t().contiguous().t(), t.to(torch.int32), b)


def test_no_tokens():
    h, w, t, b = make(0, 8, 10, torch.float32)
    for reduction in ("mean", "sum", "none"):
        ours = linear_cross_entropy(h, w, t, b, reduction=reduction)
        torch.testing.assert_close(ours, reference(h, w, t, b, reduction=reduction), equal_nan=True)


def test_dweight_accumulates_in_fp32_across_chunks(monkeypatch):
    """Many chunks of one row each (64 here): rounding each chunk's dW to bf16 would add up
    to many times eager's single rounding; fp32 accumulation stays within the 2x rule."""
    monkeypatch.setattr(lce_plans, "CHUNK_BYTES", 64 * 2)
    h, w, t, b = make(64, 16, 64, torch.bfloat16)
    assert lce.chunk_rows(64, 64, 2) == 1
    check(h, w, t, b, reduction="sum")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA accumulation paths")
@pytest.mark.parametrize("in_place", [True, False])
def test_dweight_fp32_accumulation_paths_on_cuda(in_place, monkeypatch):
    """Both CUDA ways of adding a chunk's bf16 product into the fp32 dW (addmm into it, or an
    fp32 product added) keep the 2x rule over many chunks."""
    if in_place and not lce._accumulating_addmm(torch.device(DEVICE)):
        pytest.skip("this torch's addmm(out_dtype=float32) needs self in the inputs' dtype")
    monkeypatch.setattr(lce, "_accumulating_addmm", lambda device: in_place)
    monkeypatch.setattr(lce_plans, "CHUNK_BYTES", 4 * 512 * 2)
    h, w, t, b = make(256, 64, 512, torch.bfloat16)
    check(h, w, t, b, reduction="sum")


def test_fwd_only_and_partial_requires_grad(small_chunks):
    h, w, t, b = make(9, 16, 100, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, b), reference(h, w, t, b))
    wl = w.clone().requires_grad_()  # only the weight: no grad for hidden is computed
    linear_cross_entropy(h, wl, t, b).backward()
    wr = w.clone().requires_grad_()
    reference(h, wr, t, b).backward()
    torch.testing.assert_close(wl.grad, wr.grad)


# ---- autograd behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_in_place_loss_scaling_and_second_backward(reduction, small_chunks):
    """loss *= 4 after the call scales the gradients (the saved gradients are never modified
    in place), and a second backward through a retained graph gives the same gradients."""
    h, w, t, b = make(9, 16, 100, torch.float32, ignored=0.2)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction)
    loss *= 4.0
    first = torch.autograd.grad(loss.sum(), leaves, retain_graph=True)
    second = torch.autograd.grad(loss.sum(), leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    ref = torch.autograd.grad((4.0 * reference(ref_leaves[0], ref_leaves[1], t, ref_leaves[2],
                                               reduction=reduction)).sum(), ref_leaves)
    for a, c, r in zip(first, second, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
        assert torch.equal(a, c)


def test_gradients_deterministic(small_chunks):
    h, w, t, b = make(13, 16, 500, torch.float32)
    a = loss_and_grads(linear_cross_entropy, h, w, t, b)
    c = loss_and_grads(linear_cross_entropy, h, w, t, b)
    assert all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_behaves_like_linear_plus_cross_entropy(dtype, small_chunks):
    """fp32 parameters under autocast: the projection in the autocast dtype, the loss in fp32,
    fp32 gradients; the same numbers as the unfused pair under the same autocast."""
    h, w, t, b = make(9, 16, 100, torch.float32, ignored=0.2)
    with torch.autocast(DEVICE, dtype=dtype):
        ours = loss_and_grads(linear_cross_entropy, h, w, t, b)
        eager = loss_and_grads(reference, h, w, t, b)
    assert ours[0].dtype == torch.float32
    ref = loss_and_grads(reference, h, w, t, b, cast=torch.float64)
    for name, o, e, r in zip(("loss", "grad hidden", "grad weight", "grad bias"), ours, eager, ref):
        assert o.dtype == e.dtype == torch.float32, name
        assert_agrees(o, e, r, atol=slack(r, dtype), what=name)


def test_module_matches_function(small_chunks):
    h, w, t, b = make(9, 16, 100, torch.float32, ignored=0.2)
    module = LinearCrossEntropyLoss(ignore_index=-100, reduction="sum", label_smoothing=0.1)
    assert "reduction='sum'" in repr(module)
    torch.testing.assert_close(module(h, w, t, b),
                               linear_cross_entropy(h, w, t, b, reduction="sum", label_smoothing=0.1))


# ---- memory: never a (tokens x vocab) tensor --------------------------------------------------


def test_chunk_plan_bounds_the_buffer():
    """At GPT-2's training shape the chunk buffer stays within CHUNK_BYTES, far below the logits."""
    for tokens, vocab, size in ((8192, 50257, 2), (8192, 50257, 4), (16384, 50257, 2), (5, 50257, 2),
                                (100, 10**8, 2)):
        rows = lce.chunk_rows(tokens, vocab, size)
        assert 1 <= rows <= tokens
        assert rows * vocab * size <= max(lce_plans.CHUNK_BYTES, vocab * size)
    assert lce.chunk_rows(8192, 50257, 2) * 50257 * 2 < 8192 * 50257 * 2 / 6


class LargestTensor(TorchDispatchMode):
    """The largest storage (bytes) among the outputs of every aten op run under it: each
    allocation of the op and of its autograd backward (Triton kernels only write in place)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


class Launches(TorchDispatchMode):
    """The aten ops run under it, less allocations and views (what launches a kernel on CUDA)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ("empty", "empty_strided"):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_loss_without_gradients_is_three_launches(monkeypatch, reduction):
    """No gradients and no target check: the logits' product, the row kernel and the loss
    kernel, as F.linear + F.cross_entropy launch 3; the check adds the targets kernel (and its
    one read), gradients it as well (their scale)."""
    kernels = []

    class Counted:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(lce, name)

        def config(self, **kw):
            return self.kernel.config(**kw)

        def __call__(self, *args):
            kernels.append(self.name)
            with _disable_current_modes():  # the interpreter's own tensor work is not counted
                return self.kernel(*args)

    for name in ("_TARGETS", "_CE", "_LOSS"):
        monkeypatch.setattr(lce, name, Counted(name))
    h, w, t, _ = make(6, 16, 64, torch.float32)  # an aligned vocabulary: one product
    t[1] = -100
    for check, grad, expected in ((False, False, ["_CE", "_LOSS"]),
                                  (True, False, ["_TARGETS", "_CE", "_LOSS"]),
                                  (False, True, ["_TARGETS", "_CE", "_LOSS"])):
        kernels.clear()
        with torch.set_grad_enabled(grad), Launches() as ops:
            loss = linear_cross_entropy(h.requires_grad_(grad), w, t, reduction=reduction,
                                        check_targets=check)
        assert kernels == expected, (check, grad)
        reads = ["_local_scalar_dense"] * check  # the first bad index, before any product
        assert ops.ops[:1 + check] == reads + ["mm"] and (grad or ops.ops == reads + ["mm"])
        torch.testing.assert_close(loss, reference(h.detach(), w, t, reduction=reduction))


def test_no_tokens_by_vocab_allocation(monkeypatch):
    """Every tensor the op and its backward create is at most the chunk buffer (31 rows of 1008
    here; on CPU its fp64 copy for the exact products, twice that) or the weight's size;
    eager's (tokens x vocab) logits show up in the same probe."""
    tokens, d, vocab = 256, 16, 1000
    monkeypatch.setattr(lce_plans, "CHUNK_BYTES", 32 * vocab * 4)
    h, w, t, b = make(tokens, d, vocab, torch.float32)
    logits_bytes = tokens * vocab * 4
    stride = lce.row_stride(vocab)  # 1008: rows 16-element aligned
    buffer = lce.chunk_rows(tokens, stride, 4) * stride * 4
    assert stride == 1008 and buffer <= lce_plans.CHUNK_BYTES
    for reduction in ("mean", "none"):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        with LargestTensor() as probe:
            loss = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction)
            loss.sum().backward()
        copies = 2 if DEVICE == "cpu" else 1
        assert buffer <= probe.largest <= max(copies * buffer, vocab * d * 4), probe.largest
        assert probe.largest <= logits_bytes / 4
    with LargestTensor() as probe:
        reference(*leaves[:2], t, leaves[2]).backward()
    assert probe.largest >= logits_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory statistics")
def test_peak_memory_at_gpt2_training_shape():
    """8192 tokens x 50,257 x 768 in bf16: loss forward + backward within 10% of eager's peak
    extra memory, far below one (tokens x vocab) bf16 tensor (0.82 GB)."""
    g = torch.Generator("cuda").manual_seed(0)
    h = torch.randn(8192, 768, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (0.02 * torch.randn(50257, 768, device="cuda", generator=g)).bfloat16().requires_grad_()
    t = torch.randint(0, 50257, (8192,), device="cuda", generator=g)

    def extra(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.autograd.grad(fn(h, w, t), (h, w))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours, eager = extra(linear_cross_entropy), extra(reference)
    assert ours <= 0.1 * eager, (ours, eager)
    assert ours < 8192 * 50257 * 2 / 2


# ---- bad input --------------------------------------------------------------------------------


def _bad_cases():
    h, w, t, b = make(6, 8, 20, torch.float32)
    return [
        ((h, w, torch.full_like(t, 20), b), {}, ValueError, "target 20 is out of range for 20 classes"),
        ((h, w, torch.full_like(t, -1), b), {}, ValueError, "target -1 is out of range"),
        ((h, w, t[:5], b), {}, ValueError, r"targets must have shape \(6,\)"),
        ((h, w[:, :7], t, b), {}, ValueError, r"weight must have shape \(vocab, 8\)"),
        ((h, w[0], t, b), {}, ValueError, "weight must have shape"),
        ((h, w, t, b[:3]), {}, ValueError, r"bias must have shape \(20,\)"),
        ((h.long(), w, t, b), {}, TypeError, "hidden must be float32, float16 or bfloat16"),
        ((h, w.double(), t, b), {}, TypeError, "weight must be float32"),
        ((h, w, t.float(), b), {}, TypeError, "targets must be int64 or int32"),
        ((h, w.half(), t, b), {}, TypeError, "one dtype"),
        ((h, w, t, b), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((h, w, t, b), {"label_smoothing": 1.5}, ValueError, "label_smoothing must be a number in"),
        ((h, w, t, b), {"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
        ((h, "w", t, b), {}, TypeError, "weight must be a torch.Tensor"),
        ((h, w[:0], t, b), {}, ValueError, "at least one row"),
        ((h[:, :0], w[:, :0], t, b), {}, ValueError, r"last dimension d .* at least 1, got hidden of shape \(6, 0\)"),
        ((h, w, t, b), {"check_targets": "yes"}, TypeError, "check_targets must be True or False"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_is_named_before_launch(case, monkeypatch):
    args, kwargs, error, match = _bad_cases()[case]
    monkeypatch.setattr(lce, "_chunked", lambda *a: pytest.fail("launched on bad input"))
    with pytest.raises(error, match=match):
        linear_cross_entropy(*args, **kwargs)


def test_bad_target_raises_and_the_process_goes_on():
    """The same ValueError on CUDA as on CPU (no device-side assert): afterwards the device
    still works, and the next call with good targets gives the right loss and gradients."""
    h, w, t, b = make(6, 8, 20, torch.float32)
    bad = t.clone()
    bad[4] = 25
    with pytest.raises(ValueError, match="target 25 is out of range for 20 classes"):
        linear_cross_entropy(h.requires_grad_(), w, bad, b)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # a poisoned context would raise here
    assert torch.equal(torch.arange(4, device=DEVICE).sum(), torch.tensor(6, device=DEVICE))
    check(h.detach(), w, t, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unchecked_bad_target_gives_nan(reduction):
    """check_targets=False skips the host read: the bad token's loss (and with it the mean) is
    NaN, never a read outside its row; the other tokens keep their losses."""
    h, w, t, b = make(6, 8, 20, torch.float32)
    bad = t.clone()
    bad[2] = -7
    loss = linear_cross_entropy(h, w, bad, b, reduction=reduction, check_targets=False)
    if reduction == "mean":
        assert torch.isnan(loss)
        return
    good = reference(h, w, t, b, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(6) != 2]).all()
    torch.testing.assert_close(loss[torch.arange(6) != 2], good[torch.arange(6) != 2])


def test_double_backward_is_refused_by_name():
    h, w, t, b = make(6, 8, 20, torch.float32)
    h = h.requires_grad_()
    (dh,) = torch.autograd.grad(linear_cross_entropy(h, w, t, b), h, create_graph=True)
    with pytest.raises(RuntimeError, match="linear_cross_entropy: double backward .* is not supported"):
        dh.sum().backward()


class ProductShapes(TorchDispatchMode):
    """The operand shapes of every matrix product run under it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.shapes.append([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [False, True])
def test_products_run_on_aligned_operands(bias, small_chunks):
    """No product has the odd vocabulary (1000 here, as GPT-2's 50,257) as an extent, which
    makes cuBLAS fall back to align-1 kernels: without a bias the aligned main part (960 rows)
    and the tail (40), with one the padded rows (1008)."""
    h, w, t, b = make(11, 16, 1000, torch.float32, bias=bias)
    leaves = [x.clone().requires_grad_() for x in (h, w)]
    with ProductShapes() as probe:
        linear_cross_entropy(leaves[0], leaves[1], t, b).backward()
    extents = {n for shapes in probe.shapes for shape in shapes for n in shape}
    assert 1000 not in extents
    assert ({1008} if bias else {960, 40}) <= extents
    assert lce.vocab_parts(50257) == ((0, 50240), (50240, 50257))
    assert lce.vocab_parts(50304) == ((0, 50304),) and lce.vocab_parts(7) == ((0, 7),)


def test_mixed_devices_are_named(monkeypatch):
    h, w, t, b = make(6, 8, 20, torch.float32)
    meta = w.to("meta")
    with pytest.raises(ValueError, match="tensors must be on one device.*weight on meta"):
        linear_cross_entropy(h, meta, t, b)


# ---- the model ----------------------------------------------------------------------------------

TINY = {"vocab_size": 211, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}


def tiny_model(kernels):
    torch.manual_seed(0)
    return GPTModel(TINY, kernels=kernels).to(DEVICE)


def batch(ignore=True):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, TINY["vocab_size"], (2, 11), generator=g)
    targets = torch.randint(0, TINY["vocab_size"], (2, 11), generator=g)
    if ignore:
        targets[0, :3] = -100
    return idx.to(DEVICE), targets.to(DEVICE)


def model_loss_and_grads(model, idx, targets, run=None):
    model.zero_grad(set_to_none=True)
    loss = (run or model.loss)(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_model_loss_is_the_chapter_loss():
    """kernels="torch": GPTModel.loss is the book's calc_loss_batch, bit for bit."""
    model = tiny_model("torch")
    idx, targets = batch()
    logits = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.equal(model.loss(idx, targets), expected)


def test_model_fused_loss_agrees_with_the_chapter():
    idx, targets = batch()
    ours = model_loss_and_grads(tiny_model("triton"), idx, targets)
    eager = model_loss_and_grads(tiny_model("torch"), idx, targets)
    ref = model_loss_and_grads(tiny_model("torch").double(), idx, targets)
    assert_agrees(ours[0], eager[0], ref[0], atol=1e-6, what="loss")
    for name in ref[1]:
        assert_agrees(ours[1][name], eager[1][name], ref[1][name], atol=1e-6, what=f"grad of {name}")


def test_model_forward_unchanged_by_the_factoring():
    model = tiny_model("torch")
    idx, _ = batch()
    assert torch.equal(model(idx), model.out_head(model.hidden_states(idx)))


def test_model_loss_rejects_mismatched_targets():
    model = tiny_model("triton")
    idx, targets = batch()
    with pytest.raises(ValueError, match="targets must be a tensor shaped like the token ids"):
        model.loss(idx, targets[:, :5])


def test_model_loss_compiles_fullgraph():
    """torch.compile(fullgraph=True) over GPTModel.loss with kernels="triton": no graph break,
    one graph, the eager fused loss and gradients (AOTAutograd: the op's fake and autograd)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("triton")
    idx, targets = batch()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.loss, backend=counter, fullgraph=True)
    ours = model_loss_and_grads(model, idx, targets, compiled)
    eager = model_loss_and_grads(model, idx, targets)
    torch.testing.assert_close(ours[0], eager[0], rtol=1e-6, atol=1e-6)
    for name in eager[1]:
        torch.testing.assert_close(ours[1][name], eager[1][name], rtol=1e-5, atol=1e-6, msg=name)
    model_loss_and_grads(model, idx, targets, compiled)  # no recompile
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_opcheck():
    """Every tensor on the test's device (on a GPU the upstream gradient too: CPU tensors do not
    reach the Triton path there)."""
    h, w, t, b = make(5, 8, 30, torch.float32, ignored=0.2)
    hl, wl, bl = (x.clone().requires_grad_() for x in (h, w, b))
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.gptfast.linear_cross_entropy.default,
                              (hl, wl, t, bl, -100, reduction, 0.1, True, True, True, True))
    torch.library.opcheck(torch.ops.gptfast.linear_cross_entropy_backward.default,
                          (torch.rand(5, device=DEVICE), h, w, t, b, -100, 0.1, True, True, True))


# ---- ahead-of-time configs (the static gate, tests/test_static.py, compiles them) -------------


def test_aot_configs_cover_every_launch():
    """Whatever the vocabulary, the launch the heuristic picks is among aot_configs()."""
    listed = {(c["constexprs"]["BLOCK_V"], c["num_warps"]) for c in lce.aot_configs()
              if c["fn"] is lce._ce_kernel}
    assert {c["signature"]["TARGETS"] for c in lce.aot_configs() if c["fn"] is lce._targets_kernel} == {
        "*i64", "*i32"}
    for vocab in (1, 7, 127, 128, 129, 1000, 2049, 4096, 4097, 50257, 10**6):
        launch = lce._launch(vocab)
        assert (launch.block_n, launch.num_warps) in listed, vocab



# ---- targets validated where the data is made (gptfast.dataset) --------------------------------


def test_prepared_batches_are_valid_targets(tmp_path):
    """TokenData's batches hold GPT-2 ids only (<|endoftext|> the largest) and check_vocab
    refuses a model too small for them up front; such targets need no range check in the loss."""
    from gptfast.dataset import TokenData, prepare

    (tmp_path / "a.txt").write_text("the cat sat on the mat.\n" * 30)
    prepare([tmp_path / "a.txt"], tmp_path / "d", val_fraction=0.2, seq_len=8)
    data = TokenData(tmp_path / "d")
    data.check_vocab(50257)
    with pytest.raises(ValueError, match="up to 50256 .* do not fit a model vocabulary of 1000"):
        data.check_vocab(1000)
    _, targets = data.batch("train", [0, 5], 8)
    assert targets.max() <= 50256
    t = torch.from_numpy(targets).to(DEVICE)
    h, w, _, _ = make((2, 8), 8, 50257, torch.float32, bias=False)
    unchecked = linear_cross_entropy(h, w, t, check_targets=False)
    torch.testing.assert_close(unchecked, linear_cross_entropy(h, w, t))
