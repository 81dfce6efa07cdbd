"""Decode attention over a KV cache (gptfast/kernels/decode_attention.py) against a float64 reference.

Every cache buffer is longer than the valid length and its unused tail is filled with NaN:
a kernel that reads (or weights) a position at or past cache_len returns NaN and fails.
On CPU the kernels run in Triton's interpreter, so shapes stay small there; the realistic
decode shapes run only on CUDA.
"""

import importlib
import math

import pytest
import torch
import triton

from gptfast.kernels import tuning
from gptfast.kernels.decode_attention import decode_attention
from gptfast.kernels.testing import assert_agrees, max_err

common = importlib.import_module("gptfast.kernels._common")
dec = importlib.import_module("gptfast.kernels.decode_attention")  # the package re-exports the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="realistic shapes need a GPU (slow in the interpreter)")



def slack(ref, dtype):
    """Absolute slack of the rule: one ulp of ``dtype`` at the largest output magnitude (at least
    1: values are unit normal), two for fp32 (eager's own error there is summation-order noise).
    It also covers the interpreter's fp32 -> bf16 casts, which truncate instead of rounding."""
    ulps = 2.0 if dtype == torch.float32 else 1.0
    return ulps * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)


def make_inputs(B, H, Tq, D, t_max, dtype, lens, seed=0, device=DEVICE):
    """Random q and (B, H, t_max, D) caches whose positions >= lens[b] hold NaN."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    k = torch.randn(B, H, t_max, D, generator=g).to(device, dtype)
    v = torch.randn(B, H, t_max, D, generator=g).to(device, dtype)
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return q, k, v


def attend(q, k, v, lens, scale, dtype):
    """softmax(q k^T * scale + causal bottom-right mask) v over each row's valid keys, in dtype."""
    Tq = q.shape[2]
    out = []
    for b, n in enumerate(lens):
        qb, kb, vb = (t[b].to(dtype) for t in (q, k[:, :, :n], v[:, :, :n]))
        s = (qb @ kb.transpose(-1, -2)) * scale
        rows, cols = torch.arange(Tq, device=q.device), torch.arange(n, device=q.device)
        hidden = cols[None, :] > rows[:, None] + n - Tq
        out.append(torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1) @ vb)
    return torch.stack(out)


def check(q, k, v, cache_len, what, scale=None, **kwargs):
    """Run the kernel and assert the 2x-eager rule against the float64 reference."""
    lens = cache_len.tolist() if isinstance(cache_len, torch.Tensor) else [cache_len] * q.shape[0]
    scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        out = decode_attention(q, k, v, cache_len, scale=scale, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref = attend(q, k, v, lens, scale_, torch.float64)
    eager = attend(q, k, v, lens, scale_, q.dtype)
    assert_agrees(out, eager, ref, atol=slack(ref, q.dtype), what=what)
    return out, ref


# (B, H, Tq, D, t_max, cache_len): cache lengths 1, 17, 97, 1000; Tq 1 and 3 (16 below).
CPU_CASES = [
    (2, 2, 1, 64, 24, 17),
    (1, 2, 3, 48, 128, 97),
    (2, 1, 1, 80, 112, 97),
    (1, 1, 1, 16, 1003, 1000),
    (1, 2, 1, 128, 8, 1),
    (1, 1, 3, 16, 5, 3),  # every cached position is a query
    (1, 1, 3, 64, 40, 17),
    (1, 1, 20, 16, 45, 40),  # two query blocks
]
GPU_CASES = [
    (2, 3, Tq, D, 1100, n)
    for Tq in (1, 3, 16) for D in (16, 48, 64, 80, 96, 112, 128) for n in (17, 97, 1000)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,Tq,D,t_max,n", CPU_CASES + (GPU_CASES if CUDA else []))
def test_matches_reference(B, H, Tq, D, t_max, n, dtype):
    q, k, v = make_inputs(B, H, Tq, D, t_max, dtype, [n] * B)
    check(q, k, v, n, f"B{B} H{H} Tq{Tq} D{D} len{n} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sixteen_queries(dtype):
    q, k, v = make_inputs(1, 1, 16, 32, 50, dtype, [40])
    check(q, k, v, 40, f"Tq16 {dtype}")


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_per_row_lengths(Tq, index_dtype):
    lens = [3, 40, 17] if Tq == 3 else [1, 40, 17]
    q, k, v = make_inputs(3, 2, Tq, 64, 48, torch.float16, lens)
    check(q, k, v, torch.tensor(lens, dtype=index_dtype), f"per-row lengths {lens} Tq{Tq}")
    if CUDA:  # lengths already on the GPU
        check(q, k, v, torch.tensor(lens, dtype=index_dtype, device=DEVICE), "per-row lengths on GPU")


def test_per_row_matches_scalar_length():
    """A lengths tensor with equal entries gives the int result, bit for bit."""
    q, k, v = make_inputs(2, 2, 1, 32, 40, torch.float32, [33, 33])
    with torch.no_grad():
        a = decode_attention(q, k, v, 33)
        b = decode_attention(q, k, v, torch.tensor([33, 33]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("Tq", [1, 3])
def test_split_count_changes_only_rounding(Tq):
    n = 7 * dec._split_launch(Tq).block_n - 15  # 7 key tiles, the last one partial (97 on CPU)
    q, k, v = make_inputs(1, 2, Tq, 48, n + 3, torch.float32, [n])
    outs = {}
    for splits in (1, 2, 3, 7):
        assert dec._plan(2, Tq, n, q.device, splits).num_splits == splits
        outs[splits], _ = check(q, k, v, n, f"{splits} splits", num_splits=splits)
    for splits, out in outs.items():
        assert max_err(out, outs[1]) <= 1e-6, f"{splits} splits differ from 1 split"


def test_split_plan_covers_the_cache():
    for max_len in (1, 17, 97, 1000):
        for splits in (None, 1, 4, 1000):
            plan = dec._plan(4, 1, max_len, torch.empty(0, device=DEVICE).device, splits)
            assert plan.chunk % plan.launch.block_n == 0
            assert (plan.num_splits - 1) * plan.chunk < max_len <= plan.num_splits * plan.chunk
            if splits is not None:
                assert plan.num_splits <= splits


def test_gpu_split_heuristic(monkeypatch):
    """The CUDA heuristic (with an H100's 132 SMs): split batch-1 decode, not big batches."""
    monkeypatch.setattr(common, "_named", 90)
    monkeypatch.setattr(dec, "_sm_count", lambda device: 132)
    cuda = None  # planned as sm_90 with 132 SMs, without a GPU
    one = dec._plan(1 * 12, 1, 4096, cuda)
    assert one.launch == dec.Launch(1, 32, 4, 3) and 8 <= one.num_splits <= dec.MAX_SPLITS
    assert 12 * one.num_splits >= 132 and one.chunk >= dec._MIN_CHUNK_TILES * 32
    assert dec._plan(64 * 16, 1, 4096, cuda).num_splits == 1  # enough programs already
    assert dec._plan(12, 1, 100, cuda).num_splits == 4  # a short cache: one tile per chunk
    assert dec._plan(12, 5, 4096, cuda).launch.block_m == 16
    assert dec._plan(12, 1, 4096, cuda, block_d=128).launch.block_n == 16


@pytest.mark.parametrize("sms", [108, 132, 170])  # A100, H100/H200, B200
@pytest.mark.parametrize("block_d", [64, 128])
@pytest.mark.parametrize("q_len", [1, 4])
def test_split_plan_fills_every_sm(monkeypatch, sms, block_d, q_len):
    """Below one program per SM (B*H < SMs) the keys split until every SM has a program, as
    far as whole key tiles allow; chunks stay whole tiles, cover the cache, at most MAX_SPLITS."""
    monkeypatch.setattr(common, "_named", 90)
    monkeypatch.setattr(dec, "_sm_count", lambda device: sms)
    for batch_heads in (1, 2, 12, 25, 96, 8 * 16, 200, 64 * 16):
        for max_len in (1, 40, 1000, 1024, 4096):
            plan = dec._plan(batch_heads, q_len, max_len, None, block_d=block_d)
            tiles = triton.cdiv(max_len, plan.launch.block_n)
            programs = batch_heads * plan.num_splits  # one query block: q_len <= 16
            assert plan.chunk % plan.launch.block_n == 0 and plan.num_splits <= dec.MAX_SPLITS
            assert (plan.num_splits - 1) * plan.chunk < max_len <= plan.num_splits * plan.chunk
            need = min(sms, batch_heads * tiles)  # one program per SM, or one per key tile
            if triton.cdiv(need, batch_heads) <= dec.MAX_SPLITS:
                assert programs >= need, f"B*H={batch_heads} len={max_len}: {programs} programs, {sms} SMs"
            elif max_len > 1:
                assert plan.num_splits >= dec.MAX_SPLITS // 2
            if batch_heads >= dec._PROGRAMS_PER_SM * sms:
                assert plan.num_splits == 1


def test_plan_off_cuda_assumes_default_sm_count(monkeypatch):
    """Planning for a GPU on a machine without one (e.g. a static report) assumes 132 SMs."""
    monkeypatch.setattr(common, "_named", 90)
    assert dec._sm_count(None) == dec._sm_count(torch.device("cpu")) == dec.DEFAULT_SM_COUNT == 132
    plan = dec._plan(12, 1, 1024, None)
    assert 12 * plan.num_splits >= 132  # 1024 keys = 32 tiles of 32: 16 chunks of 2 tiles
    assert (plan.num_splits, plan.chunk) == (16, 64)


@pytest.mark.parametrize("lens", [[40, 40], [1, 47]])
def test_merge_is_deterministic(lens):
    """Split, merge and the key slots in a fixed order: two runs agree bit for bit."""
    q, k, v = make_inputs(2, 3, 1, 64, 48, torch.bfloat16, lens)
    with torch.no_grad():
        runs = [decode_attention(q, k, v, torch.tensor(lens), num_splits=3) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_tuned_launch_is_used_and_agrees():
    """A table entry replaces the static launch of its shape class only, and the result still
    follows the rule (every tunable config runs here, in the interpreter)."""
    cls = "bf16-d64-q1"
    static = dec._split_launch(1, 64, torch.bfloat16)
    q, k, v = make_inputs(1, 2, 1, 64, 80, torch.bfloat16, [70])
    for config in dec.TUNING_SPACE[cls]:
        with tuning.use({dec.SPLIT_KERNEL: {cls: config}}):
            launch = dec._split_launch(1, 64, torch.bfloat16)
            assert (launch.block_n, launch.num_warps, launch.num_stages) == tuple(config.values())
            assert dec._split_launch(1, 64, torch.float16) == static  # another class
            assert dec._split_launch(1, 128, torch.bfloat16) == dec._split_launch(1, 128, torch.bfloat16)
            check(q, k, v, 70, f"tuned {config}")
    assert dec._split_launch(1, 64, torch.bfloat16) == static


def test_tuning_space_is_compiled(monkeypatch):
    """Every config a table may pick is among aot_configs() (so the compile check covers it)."""
    monkeypatch.setattr(dec, "INTERPRETING", False)
    monkeypatch.setattr(common, "_named", 90)
    names = {c["name"] for c in dec.aot_configs()}
    for cls, space in dec.TUNING_SPACE.items():
        t, d, q = cls.split("-")
        for c in space:
            name = (f"split-{t}-{d}-m{q[1:]}n{c['block_n']}-w{c['num_warps']}s{c['num_stages']}"
                    "-flags_on")
            assert name in names, f"{cls} {c} is not compiled ahead of time"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # and every static launch
        for block_d in (16, 32, 64, 128):
            for q_len in (1, 3):
                cfg = dec._split_launch(q_len, block_d, dtype)
                assert any(f"-{dec._TRITON_DTYPE[dtype]}-d{block_d}-m{cfg.block_m}n{cfg.block_n}-"
                           f"w{cfg.num_warps}s{cfg.num_stages}-" in n for n in names)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    """Lengths on the GPU: no host sync, one plan for every length, so a captured decode step
    replays correctly after the lengths change (as gptfast's KVCacheDecoder does)."""
    lens = torch.tensor([100, 700], device=DEVICE)
    q, k, v = make_inputs(2, 12, 1, 64, 1024, torch.bfloat16, [1024, 1024])
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_attention(q, k, v, lens)  # warm-up: compile
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_attention(q, k, v, lens)
        for new in ([100, 700], [1, 1024], [513, 64]):
            lens.copy_(torch.tensor(new))
            graph.replay()
            torch.cuda.synchronize()
            ref = attend(q, k, v, new, 1 / 8, torch.float64)
            assert_agrees(out, attend(q, k, v, new, 1 / 8, torch.bfloat16), ref,
                          atol=slack(ref, torch.bfloat16), what=f"replay with lengths {new}")


def test_noncontiguous_views():
    """Caches that are slices of bigger buffers (seq-major layout, spare heads and columns)."""
    B, H, Tq, D, t_max, n = 2, 2, 3, 40, 30, 26
    g = torch.Generator().manual_seed(1)
    q_big = torch.randn(B, 2 * Tq, H + 1, 2 * D, generator=g).to(DEVICE, torch.float16)
    kv_big = torch.randn(2, B, t_max + 5, H + 1, 2 * D, generator=g).to(DEVICE, torch.float16)
    kv_big[:, :, n:] = float("nan")
    q = q_big[:, :Tq, :H, :D].transpose(1, 2)  # (B, H, Tq, D) with seq-major strides
    k = kv_big[0, :, :t_max, 1:, ::2].transpose(1, 2)  # every other column: head_dim stride 2
    v = kv_big[1, :, :t_max, :H, D:].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous()) and k.stride(-1) == 2
    check(q, k, v, n, "non-contiguous views")


def test_scale():
    q, k, v = make_inputs(1, 2, 1, 32, 20, torch.float32, [20])
    check(q, k, v, 20, "scale 0.3", scale=0.3)


def test_inference_only():
    q, k, v = make_inputs(1, 1, 1, 16, 8, torch.float32, [8])
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        decode_attention(q, k, v, 8)
    with torch.inference_mode():
        out = decode_attention(q, k, v, 8)
    assert not out.requires_grad


def test_empty_inputs():
    q, k, v = make_inputs(1, 2, 0, 16, 8, torch.float16, [8])
    assert decode_attention(q, k, v, 4).shape == (1, 2, 0, 16)
    q, k, v = make_inputs(0, 2, 1, 16, 8, torch.float16, [])
    assert decode_attention(q, k, v, torch.zeros(0, dtype=torch.int64)).shape == (0, 2, 1, 16)


def _bad(**changes):
    q, k, v = make_inputs(2, 2, 2, 16, 10, torch.float32, [10, 10])
    args = dict(q=q, k_cache=k, v_cache=v, cache_len=6)
    args.update(changes)
    return args


@pytest.mark.parametrize("args,error,match", [
    (_bad(q=torch.zeros(2, 2, 16)), ValueError, "q must be 4-D"),
    (_bad(k_cache=[1]), TypeError, "k_cache must be a torch.Tensor"),
    (_bad(q=torch.zeros(2, 3, 2, 16, device=DEVICE)), ValueError, "must agree in batch, heads and head_dim"),
    (_bad(q=torch.zeros(2, 2, 2, 8, device=DEVICE)), ValueError, "must agree in batch, heads and head_dim"),
    (_bad(v_cache=torch.zeros(2, 2, 11, 16, device=DEVICE)), ValueError, "same shape"),
    (_bad(q=torch.zeros(2, 2, 2, 16, device=DEVICE, dtype=torch.float16)), TypeError, "share one dtype"),
    (_bad(q=torch.zeros(2, 2, 2, 16, device=DEVICE, dtype=torch.int32)), TypeError,
     "float32, float16 or bfloat16"),
    (dict(zip(("q", "k_cache", "v_cache"), make_inputs(1, 1, 1, 8, 4, torch.float32, [4])), cache_len=2),
     ValueError, r"head_dim must be in \[16, 128\]"),
    (dict(zip(("q", "k_cache", "v_cache"), make_inputs(1, 1, 1, 160, 4, torch.float32, [4])), cache_len=2),
     ValueError, r"head_dim must be in \[16, 128\]"),
    (_bad(cache_len=0), ValueError, "must be >= 1"),
    (_bad(cache_len=11), ValueError, r"must be <= the cache size \(k_cache.shape\[2\] = 10\)"),
    (_bad(cache_len=1), ValueError, "2 queries but cache_len is 1"),
    (_bad(cache_len=True), TypeError, "cache_len must be an int"),
    (_bad(cache_len=6.0), TypeError, "cache_len must be an int"),
    (_bad(cache_len=torch.tensor([6, 11])), ValueError, r"max\(cache_len\) must be <= the cache size"),
    (_bad(cache_len=torch.tensor([6, 1])), ValueError, r"2 queries but min\(cache_len\) is 1"),
    (_bad(cache_len=torch.tensor([6, 0])), ValueError, r"min\(cache_len\) must be >= 1"),
    (_bad(cache_len=torch.tensor([6])), ValueError, r"shape \(batch,\) = \(2,\)"),
    (_bad(cache_len=torch.tensor([6.0, 6.0])), TypeError, "int32 or int64"),
    (_bad(scale=float("nan")), ValueError, "scale must be a finite number"),
    (_bad(num_splits=0), ValueError, "num_splits must be a positive int"),
])
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        decode_attention(**args)


@pytest.mark.skipif(not CUDA, reason="needs a GPU next to the CPU")
def test_mixed_devices():
    q, k, v = make_inputs(1, 1, 1, 16, 8, torch.float32, [8])
    with pytest.raises(ValueError, match="one device"):
        decode_attention(q, k.cpu(), v, 8)


# --------------------------------------------------------------------------------------------
# Realistic decode shapes (GPU only)
# --------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H", [(1, 12), (1, 16), (8, 12), (8, 16)])
@pytest.mark.parametrize("n", [1024, 2500, 4096])
@pytest.mark.parametrize("Tq", [1, 4])
def test_realistic_decode(B, H, n, Tq, dtype):
    q, k, v = make_inputs(B, H, Tq, 64, 4096, dtype, [n] * B)
    check(q, k, v, n, f"B{B} H{H} len{n} Tq{Tq} {dtype}")


@cuda_only
def test_realistic_ragged_batch():
    lens = [1024, 4096, 1, 3000, 2049, 17, 4000, 512]
    q, k, v = make_inputs(8, 12, 1, 64, 4096, torch.float16, lens)
    check(q, k, v, torch.tensor(lens, device=DEVICE), "ragged batch of 8")
