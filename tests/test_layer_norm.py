"""gptfast.kernels.layer_norm: layer_norm and add_layer_norm against float64 with the 2x-eager rule.

On CPU the kernels run in Triton's interpreter, so shapes stay small (wide rows get 1-3 rows);
the realistic GPT-2 shapes run only on CUDA.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import gptfast.kernels._common
from gptfast.kernels.layer_norm import MAX_N, add_layer_norm, layer_norm
from gptfast.kernels.testing import assert_agrees

# the module itself (the package exports a function of the same name, which `import ... as` finds)
ln = importlib.import_module("gptfast.kernels.layer_norm")
plans = importlib.import_module("gptfast.kernels.layer_norm_plans")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic shapes run on CUDA only")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute slack on top of 2x eager's error, for elements where eager happens to be exact: two
# units in the last place at 1.0 for fp16/bf16. (On CPU, Triton's interpreter rounds fp32 ->
# bf16 toward zero, up to 1 ulp where GPUs round to nearest, 1/2 ulp; this slack absorbs it.)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5


def _data(shape, dtype, param_dtype=None, affine="wb", seed=0, n=None):
    """x (shifted, so the mean matters), weight/bias of n (default: last dim) elements per
    ``affine``, and an upstream grad."""
    g = torch.Generator().manual_seed(seed)
    n = n or shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    p = param_dtype or dtype
    w = (torch.randn(n, generator=g) * 0.5 + 1).to(DEVICE, p) if "w" in affine else None
    b = (torch.randn(n, generator=g) * 0.2).to(DEVICE, p) if "b" in affine else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, w, b, dy


def _run(op, tensors, grads, view=lambda t: t, cast=None):
    """outs = op(view(x), *rest) on fresh leaves (cast to ``cast`` if given); backward with
    ``grads`` (None entries skip an output). Returns (outputs, grads of the leaves)."""
    leaves = [None if t is None else t.detach().to(cast or t.dtype).clone().requires_grad_() for t in tensors]
    outs = op(view(leaves[0]), *leaves[1:])
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def _check(ours, eager, ref, names):
    for name, a, e, r in zip(names, ours, eager, ref):
        if r is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype}, eager gives {e.dtype}"
        assert_agrees(a, e, r, atol=ATOL[e.dtype], what=name)


def _compare_layer_norm(shape, dtype, affine="wb", param_dtype=None, view=lambda t: t, base_shape=None):
    n = shape[-1]
    x, w, b, dy = _data(base_shape or shape, dtype, param_dtype, affine, n=n)
    dy = dy if base_shape is None else view(dy).contiguous()
    ours = _run(lambda x, w, b: layer_norm(x, w, b, EPS), (x, w, b), [dy], view)
    if param_dtype is None:
        eager = _run(lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS), (x, w, b), [dy], view)
    else:  # mixed dtypes, autocast style: compute in fp32, round each result to its tensor's dtype
        eager = _run(lambda x, w, b: F.layer_norm(x.float(), (n,), w, b, EPS).to(dtype), (x, w, b), [dy], view)
    ref = _run(lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS), (x, w, b), [dy], view, cast=torch.float64)
    assert ours[0][0].shape == shape and ours[0][0].dtype == dtype
    _check(ours[0] + ours[1], eager[0] + eager[1], ref[0] + ref[1], ["y", "dx", "dweight", "dbias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "rows,n",
    [(5, 1), (5, 7), (3, 768), (3, 1000), (3, 1600), (2, 4097), (2, 8193), (1, 12289)],
)
def test_layer_norm_matches_reference(rows, n, dtype):
    """Widths from 1 to past the register path (8193, 12289 loop over 4096-column blocks)."""
    _compare_layer_norm((rows, n), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_rows_several_programs(dtype):
    """Enough rows that the backward splits them over several programs (odd tail group)."""
    _compare_layer_norm((67, 96), dtype)


def test_gpu_sized_grid():
    """As many backward programs as on an H100 (here 151 row groups): the partial sums take
    several BLOCK_G steps of the reduction."""
    with gptfast.kernels._common.plans_of(None if DEVICE == "cuda" else 90):
        tile, warps = ln._bwd_plan(1000)
        groups, _ = ln._bwd_groups(301, 1, tile["ROWS"], warps, torch.device(DEVICE))
        assert groups > ln._sum_plan(1000, torch.device(DEVICE))["BLOCK_G"]
        _compare_add((301, 1000), torch.float16)


@pytest.mark.parametrize("rows", [0, 1])
def test_edge_row_counts(rows):
    _compare_layer_norm((rows, 33), torch.float32)
    _compare_layer_norm((rows, 8193), torch.float32)


def test_zero_rows_gives_zero_parameter_grads():
    x, w, b, _ = _data((0, 16), torch.float16)
    _, (dx, dw, db) = _run(lambda x, w, b: layer_norm(x, w, b), (x, w, b), [torch.empty_like(x)])
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_one_dimensional_and_leading_dims():
    _compare_layer_norm((40,), torch.float32)
    _compare_layer_norm((2, 3, 50), torch.bfloat16)


@pytest.mark.parametrize("affine", ["", "w", "b"])
def test_optional_weight_and_bias(affine):
    _compare_layer_norm((3, 100), torch.float16, affine=affine)
    _compare_layer_norm((2, 8200), torch.float32, affine=affine)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_parameters_with_half_activations(dtype):
    """Output and dx in x's dtype, dweight/dbias in fp32, like autocast'ed models."""
    _compare_layer_norm((3, 768), dtype, param_dtype=torch.float32)
    _compare_layer_norm((2, 8193), dtype, param_dtype=torch.float32)


def test_non_contiguous_inputs():
    # column slice: read in place through the row stride
    _compare_layer_norm((4, 100), torch.float32, view=lambda t: t[:, 3:103], base_shape=(4, 110))
    # transposed: the last dim is strided, copied to rows first
    _compare_layer_norm((6, 50), torch.bfloat16, view=lambda t: t.t(), base_shape=(50, 6))
    # every other row of a 3-D tensor
    _compare_layer_norm((2, 3, 64), torch.float16, view=lambda t: t[:, ::2], base_shape=(2, 6, 64))


def test_non_contiguous_grad():
    """An expanded upstream grad (stride 0), as from y.sum().backward()."""
    x = torch.randn(5, 30, device=DEVICE, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    layer_norm(x).sum().backward()
    F.layer_norm(x64, (30,)).sum().backward()
    assert (x.grad.double() - x64.grad).abs().max() < 1e-5


# ---- add_layer_norm ----------------------------------------------------------------------------


def _compare_add(shape, dtype, use=(True, True), affine="wb", r_dtype=None):
    """r_dtype: a residual of another dtype (autocast: half-precision branch, fp32 stream)."""
    out_dtype = torch.promote_types(dtype, r_dtype or dtype)
    x, w, b, _ = _data(shape, dtype, param_dtype=out_dtype, affine=affine)
    r, _, _, _ = _data(shape, r_dtype or dtype, seed=1)
    _, _, _, dy = _data(shape, out_dtype, seed=2)
    _, _, _, dsum = _data(shape, out_dtype, seed=3)
    grads = [dy if use[0] else None, dsum if use[1] else None]
    n = shape[-1]

    def eager_op(x, r, w, b):
        s = x + r
        return F.layer_norm(s, (n,), w, b, EPS), s

    ours = _run(lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS), (x, r, w, b), grads)
    eager = _run(eager_op, (x, r, w, b), grads)
    ref = _run(eager_op, (x, r, w, b), grads, cast=torch.float64)
    names = ["normalized", "sum", "dx", "dresidual", "dweight", "dbias"]
    _check(ours[0] + ours[1], eager[0] + eager[1], ref[0] + ref[1], names)
    # the stored sum is eager's rounded x + residual, exactly; Triton's interpreter rounds
    # fp32 -> bf16 toward zero (GPUs round to nearest even), so there within one bf16 ulp
    s, s_eager = ours[0][1].float(), eager[0][1].float()
    if DEVICE == "cpu" and out_dtype == torch.bfloat16:
        assert ((s - s_eager).abs() <= s_eager.abs() * 2.0**-7).all()
    else:
        assert torch.equal(s, s_eager)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(5, 7), (3, 768), (3, 1600), (2, 8193)])
def test_add_layer_norm_matches_reference(rows, n, dtype):
    _compare_add((rows, n), dtype)


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["norm-only", "sum-only"])
def test_add_layer_norm_one_output_used(use):
    _compare_add((3, 64), torch.float32, use=use)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_add_layer_norm_half_branch_onto_fp32_residual(dtype):
    """Under autocast the block adds a bf16/fp16 branch to the fp32 residual stream: fp32 out."""
    _compare_add((3, 768), dtype, r_dtype=torch.float32)


def test_add_layer_norm_shapes_and_no_affine():
    _compare_add((2, 3, 40), torch.bfloat16, affine="")
    _compare_add((0, 40), torch.float32)


# ---- determinism ---------------------------------------------------------------------------


def _grads_twice(op, tensors, grads):
    return [_run(op, tensors, grads)[1] for _ in range(2)]


@pytest.mark.parametrize("rows,n", [(64, 768), (3, 8193)])
def test_backward_is_bitwise_deterministic(rows, n):
    x, w, b, dy = _data((rows, n), torch.bfloat16)
    first, second = _grads_twice(layer_norm, (x, w, b), [dy])
    for name, a, c in zip(["dx", "dweight", "dbias"], first, second):
        assert torch.equal(a, c), f"{name} differs between two runs"


@CUDA
@pytest.mark.parametrize("n", [768, 1600, 4096])
def test_backward_is_bitwise_deterministic_cuda(n):
    x, w, b, dy = _data((8192, n), torch.float16)
    r = torch.randn_like(x)
    first, second = _grads_twice(add_layer_norm, (x, r, w, b), [dy, dy])
    for name, a, c in zip(["dx", "dresidual", "dweight", "dbias"], first, second):
        assert torch.equal(a, c), f"{name} differs between two runs"


# ---- realistic shapes (CUDA) ---------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [768, 1024, 1600, 4096])
def test_gpt2_shapes_cuda(n, dtype):
    _compare_layer_norm((8192, n), dtype)
    _compare_add((8192, n), dtype)


@CUDA
@pytest.mark.parametrize("rows,n", [(512, 8192), (64, 65536), (2, MAX_N)])
def test_wide_rows_cuda(rows, n):
    _compare_layer_norm((rows, n), torch.bfloat16)
    _compare_add((rows, n), torch.float16)


@CUDA
def test_fp32_parameters_cuda():
    _compare_layer_norm((4096, 1600), torch.bfloat16, param_dtype=torch.float32)


# ---- the host path ---------------------------------------------------------------------------


def test_inference_call_skips_autograd_and_agrees():
    """Without gradients the forward launches directly (no graph node, no statistics stored)
    and gives the very same output as the differentiable call."""
    x, w, b, _ = _data((5, 300), torch.bfloat16)
    r = torch.randn_like(x)
    with torch.no_grad():
        y, (h, s) = layer_norm(x, w, b), add_layer_norm(x, r, w, b)
    assert y.grad_fn is None and h.grad_fn is None
    x.requires_grad_()
    y2, (h2, s2) = layer_norm(x, w, b), add_layer_norm(x, r, w, b)
    assert y2.grad_fn is not None and h2.grad_fn is not None
    for a, c in ((y, y2), (h, h2), (s, s2)):
        assert torch.equal(a, c.detach())


def test_plans_follow_the_named_gpu():
    """The per-shape plan cache keys on the capability the plans are made for."""
    cpu = torch.device("cpu")
    with gptfast.kernels._common.plans_of(80):
        sm80 = ln.bwd_plan(768, torch.bfloat16, cpu, False, True, True)
    with gptfast.kernels._common.plans_of(90):
        sm90 = ln.bwd_plan(768, torch.bfloat16, cpu, False, True, True)
    assert (sm80.groups, sm90.groups) == (108 * 2, 132 * 3)  # row groups: resident programs of all SMs


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_double_backward_is_refused_by_name(op):
    x, w, b, dy = _data((3, 40), torch.float32)
    x, w = x.requires_grad_(), w.requires_grad_()
    y = layer_norm(x, w, b) if op == "layer_norm" else add_layer_norm(x, torch.randn_like(x), w, b)[0]
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{op}: double backward .* is not supported"):
        dx.sum().backward()


# ---- clear errors ------------------------------------------------------------------------


def test_rejects_mixed_devices():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one device"):
        layer_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        add_layer_norm(x, torch.randn(2, 8, device="meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors without the interpreter")
def test_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(gptfast.kernels._common, "INTERPRETING", False)
    with pytest.raises(RuntimeError, match="need CUDA"):
        layer_norm(torch.randn(2, 8))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bool])
def test_rejects_non_float_dtypes(dtype):
    x = torch.ones(2, 8, device=DEVICE, dtype=dtype)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        layer_norm(x)
    with pytest.raises(TypeError, match="weight must be float32"):
        layer_norm(torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE, dtype=dtype))


def test_rejects_bad_parameter_shapes():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\).*\(9,\)"):
        layer_norm(x, torch.ones(9, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*\(1, 8\)"):
        layer_norm(x, None, torch.ones(1, 8, device=DEVICE))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        layer_norm(x, [1.0] * 8)


def test_rejects_bad_widths():
    with pytest.raises(ValueError, match=f"1 to {MAX_N} elements, got {MAX_N + 1}"):
        layer_norm(torch.zeros(1, 1, device=DEVICE).expand(2, MAX_N + 1))
    with pytest.raises(ValueError, match="1 to .* elements, got 0"):
        layer_norm(torch.zeros(3, 0, device=DEVICE))
    with pytest.raises(ValueError, match="at least one dimension"):
        layer_norm(torch.tensor(1.0, device=DEVICE))


@pytest.mark.parametrize("eps", [math.nan, math.inf, "1e-5", True])  # 0 and < 0: as torch
def test_rejects_bad_eps(eps):
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        layer_norm(x, eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        add_layer_norm(x, x, eps=eps)


def test_rejects_mismatched_residual():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(2, 8\), got \(2, 9\)"):
        add_layer_norm(x, torch.randn(2, 9, device=DEVICE))
    with pytest.raises(TypeError, match="residual must be float32, float16 or bfloat16"):
        add_layer_norm(x, x.long())


# ---- ahead-of-time compile -------------------------------------------------------------------


def _key(kernel, constexprs, warps):
    return kernel.__name__, tuple(sorted(constexprs.items())), warps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aot_configs_cover_every_plan(dtype):
    """Whatever width comes in, the configs the heuristics pick are among aot_configs()."""
    flags = {"HAS_RESIDUAL", "HAS_DSUM", "HAS_W", "HAS_B", "STATS"}
    listed = {_key(c["fn"], {k: v for k, v in c["constexprs"].items() if k not in flags}, c["num_warps"])
              for c in ln.aot_configs()}
    widths = {1, 2, 5, 768, 1000, 1600, 12289, 65536, MAX_N}
    widths |= {(1 << k) + d for k in range(21) for d in (-1, 0, 1) if 1 <= (1 << k) + d <= MAX_N}
    for n in sorted(widths):
        kernel, tile, warps = ln._fwd_plan(n, dtype)
        assert _key(kernel, tile, warps) in listed, f"forward plan for N={n} not compiled ahead of time"
        tile, warps = ln._bwd_plan(n, dtype)
        assert _key(ln._bwd_kernel, tile, warps) in listed, f"backward plan for N={n} not compiled"
        if not tile["WHOLE_ROW"]:
            sums = dict(BLOCK_N=tile["BLOCK_N"])
            assert _key(ln._bwd_row_sums_kernel, sums, warps) in listed, f"row sums for N={n} not compiled"
        for sms in (4, 108, 132, 170):  # interpreter, A100, H100, B200
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(plans, "_sm_count", lambda device: sms)
                tile = ln._sum_plan(n, None)
            assert _key(ln._sum_partials_kernel, tile, 8) in listed, f"reduction for N={n} not compiled"


# ---- launch plans: latency cover and tuning ----------------------------------------------------


@pytest.mark.parametrize("n", [768, 1024, 1280, 1600])
def test_backward_plan_keeps_enough_bytes_in_flight(n):
    """GPT-2 widths, bf16, plain layer_norm (x and dy): the resident programs of an SM have at
    least ~29 KB of loads in flight (an H200's 4.8 TB/s over 132 SMs times ~0.8 us), counting
    the NUM_STAGES - 1 tiles that the pipelined row loop prefetches."""
    tile, warps = ln._bwd_plan(n, torch.bfloat16)
    programs_per_sm = plans._programs_per_sm(warps, 90)
    in_flight = programs_per_sm * (tile["NUM_STAGES"] - 1) * tile["ROWS"] * n * 2 * 2
    assert tile["NUM_STAGES"] > 1 and in_flight >= 29_000, f"N={n}: {in_flight} bytes in flight per SM"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_prefetch_fits_shared_memory(dtype):
    """The prefetched x/dy/ds tiles (NUM_STAGES - 1 of them, in their dtype) stay within the
    budget that keeps 3 programs per SM on an A100; the widest fp32 rows are not pipelined, the
    widest half-precision ones prefetch one tile."""
    for n in [256, 768, 1600, 2048, 4096, 8192, 8193, 65536]:
        tile, _ = ln._bwd_plan(n, dtype)
        prefetched = (tile["NUM_STAGES"] - 1) * tile["ROWS"] * tile["BLOCK_N"] * 3 * dtype.itemsize
        assert prefetched <= plans._BWD_PREFETCH_BYTES
    assert ln._bwd_plan(8192, dtype)[0]["NUM_STAGES"] == (1 if dtype == torch.float32 else 2)
    assert ln._bwd_plan(1600, dtype)[0]["NUM_STAGES"] == 3


@pytest.mark.parametrize("warps", [2, 4, 8, 16])
def test_backward_register_budget_keeps_one_wave(warps):
    """Within its register budget (which the static gate checks on the compiled kernels) the
    planned programs per SM are resident at once by the occupancy calculator's count, and no
    more fit at 8 registers more, so the persistent grid (SMs x programs per SM) is one wave."""
    from gptfast.kernels.testing import occupancy

    for cc, sms in ((80, 108), (90, 132)):
        budget, programs = plans._bwd_max_registers(warps, cc), plans._programs_per_sm(warps, cc)
        assert occupancy(cc, warps, budget, 0)["blocks"] >= programs
        assert occupancy(cc, warps, budget + 8, 0)["blocks"] < programs or budget == 255
        with gptfast.kernels._common.plans_of(cc):
            groups, _ = ln._bwd_groups(1 << 20, 1, 2, warps, torch.device("cpu"))
        assert groups == sms * programs


def test_tuned_plans_agree_and_stay_deterministic():
    """Every tunable backward tile of a class runs here (interpreter) and gives the same
    bitwise-deterministic gradients as twice itself, within the rule of the reference."""
    from gptfast.kernels import tuning

    for config in ln.TUNING_SPACE[ln.BWD_KERNEL]["fp32-1024"][:3]:
        with tuning.use({ln.BWD_KERNEL: {"fp32-1024": config}}):
            assert ln._bwd_plan(700, torch.float32)[0]["ROWS"] == config["rows"]
            # the launch's cached plan follows the table too
            cached = ln.bwd_plan(700, torch.float32, torch.device(DEVICE), True, True, True).main
            assert (cached.kwargs["ROWS"], cached.kwargs["num_warps"]) == (config["rows"], config["num_warps"])
            _compare_add((9, 700), torch.float32)
            x, w, b, dy = _data((9, 700), torch.float32)
            first, second = _grads_twice(layer_norm, (x, w, b), [dy])
            assert all(torch.equal(a, c) for a, c in zip(first, second))
