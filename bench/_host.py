"""The host path of each op, per call: what one call costs the CPU, with the GPU's work left out.

On a machine without a GPU this module runs as its own process (``python -m bench._host``,
started by bench/test_host.py) with TRITON_INTERPRET=0 and Triton's driver replaced by a stub:
the kernels take their sm_90 launch plans and go through Triton's real dispatch (binding,
specialization, cache lookup) or our direct launcher, and only the last step, the C launcher
that would queue the kernel, is a counter. Everything else (checks, plans, allocations, autograd,
the torch ops an op runs around its kernels) runs for real on small CPU tensors, as do the ATen
counterparts at the same shapes. On a CUDA machine the same cases run in-process on tiny CUDA
tensors, where each kernel takes a few microseconds and the host's time per call shows.

Per case: microseconds per call (the best of ROUNDS rounds of CALLS calls) for our op and its ATen
counterpart, their ratio, and kernel launches per call: Triton launches (counted by the stub; on
CUDA by the profiler) plus the torch ops that launch a kernel (every dispatched op that is not a
view or an allocation). ``per_token`` does the same for greedy decoding with the KV cache.
"""

import contextlib
import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

CALLS, ROUNDS = 300, 7
STUB = not torch.cuda.is_available()
if STUB:  # before triton.jit decorates the kernels (gptfast.kernels is imported by the cases)
    os.environ["TRITON_INTERPRET"] = "0"

TRITON_LAUNCHES = [0]  # launches the stub received
RECORD: list | None = None  # when a list: each launch's (kernel, grid, stream, arguments)


class _StubKernel:
    """What the stubbed compiler returns: a compiled kernel whose launcher only counts (and
    records, see ``RECORD``)."""

    function = 0
    packed_metadata = ()

    def __init__(self, src=None, **_):
        self.src = src

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        TRITON_LAUNCHES[0] += 1
        if RECORD is not None:
            RECORD.append((self, args[:4], tuple(map(_argument, args[9:]))))


def _argument(a):
    """A launch argument as comparable data: a tensor by what Triton specializes on and its
    layout (two calls allocate their outputs anew), anything else as it is."""
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0)
    return a


class _StubUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class _StubDriver:
    """Triton's active driver without a GPU: device 0, stream 0, an sm_90 target."""

    utils = _StubUtils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def install_stub() -> None:
    """Route every Triton launch of this process into the stub (no compilation, no GPU)."""
    import triton
    import triton.compiler

    warnings.filterwarnings("ignore", module="triton")
    triton.runtime.driver.set_active(_StubDriver())
    triton.compiler.compile = lambda src, target=None, options=None, **_: _StubKernel(src)
    from gptfast.kernels import _common

    _common.CPU_LAUNCH = True  # CPU tensors go to the (stubbed) compiled kernels


# ---- counting -------------------------------------------------------------------------------

_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "lift_fresh", "detach", "alias", "set_", "resize_", "is_same_size", "_unsafe_view",
              "promote_types", "sym_size", "sym_stride", "sym_numel", "size", "stride"}
_SYNCS = {"_local_scalar_dense", "item", "equal"}  # a device-to-host read: a host sync on CUDA


class KernelOps(TorchDispatchMode):
    """Counts the dispatched torch ops that launch a GPU kernel (not views, allocations, nor host
    reads, which ``syncs`` counts) and runs our custom ops' bodies under it, so that the torch
    ops inside them count too."""

    def __init__(self):
        super().__init__()
        self.count = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "gptfast":  # a custom op: its Python body, counted op by op
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[func.name().split(".")[0]]._init_fn(*args, **(kwargs or {}))
        if name in _SYNCS:
            self.syncs += 1
        elif not func.is_view and name not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def launches(fn) -> tuple[int, int]:
    """(kernels, host reads) of one call of ``fn``: Triton launches plus kernel-launching torch
    ops, and the torch ops that read a device value on the host. On CUDA the kernels are those
    the profiler sees, and host reads are not counted (None)."""
    if not STUB:
        return _cuda_kernels(fn), None
    before = TRITON_LAUNCHES[0]
    with KernelOps() as ops:
        fn()
    return TRITON_LAUNCHES[0] - before + ops.count, ops.syncs


def _cuda_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


def us_per_call(fn, calls=CALLS, rounds=ROUNDS) -> float:
    """Best of ``rounds`` rounds of ``calls`` back-to-back calls, in microseconds per call. On
    CUDA wall time, each round ending with a synchronize (tiny kernels: the host's time is what
    shows); on the CPU the thread's own CPU time, which a busy machine disturbs much less."""
    cuda = not STUB
    clock = time.perf_counter if cuda else time.thread_time  # CPU: this thread's time only
    fn()
    best = float("inf")
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return best / calls * 1e6


# ---- the cases ------------------------------------------------------------------------------


def _device():
    return "cpu" if STUB else "cuda"


def _grad_call(forward, inputs, grads):
    """forward + backward: the op, then the gradients of every input that requires them."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    wants = [t for t in leaves if t.requires_grad]

    def call():
        out = forward(*leaves)
        torch.autograd.grad(out, wants, grads)

    return call


def _no_grad_call(forward, inputs):
    def call():
        with torch.no_grad():
            forward(*inputs)

    return call


def cases() -> list[dict]:
    """Each public op at a tiny shape, forward and forward + backward, next to its ATen
    counterpart: (name, mode, ours, aten, aten's name)."""
    from gptfast import kernels as K

    dev, dtype = _device(), torch.bfloat16 if not STUB else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    x, r, w, b = rand(4, 64), rand(4, 64), rand(64), rand(64)
    q, k, v = rand(1, 2, 16, 32), rand(1, 2, 16, 32), rand(1, 2, 16, 32)
    q1, kc, vc = rand(1, 2, 1, 32), rand(1, 2, 64, 32), rand(1, 2, 64, 32)
    hidden, weight = rand(8, 32), rand(50, 32)
    x1, w1, b1 = rand(1, 1, 64), rand(256, 64), rand(256)
    targets = torch.randint(0, 50, (8,), generator=g, device=dev)
    eps = 1e-5
    out = []

    def add(name, ours, aten, aten_name, inputs, grads=None):
        out.append(dict(op=name, mode="fwd", ours=_no_grad_call(ours, inputs),
                        aten=_no_grad_call(aten, inputs), aten_name=aten_name))
        if grads is not None:
            out.append(dict(op=name, mode="fwd+bwd", ours=_grad_call(ours, inputs, grads),
                            aten=_grad_call(aten, inputs, grads), aten_name=aten_name))

    add("layer_norm", lambda x, w, b: K.layer_norm(x, w, b, eps),
        lambda x, w, b: F.layer_norm(x, (64,), w, b, eps), "F.layer_norm", [x, w, b], rand(4, 64))
    add("add_layer_norm", lambda x, r, w, b: K.add_layer_norm(x, r, w, b, eps),
        lambda x, r, w, b: (F.layer_norm(x + r, (64,), w, b, eps), x + r),
        "x + r, F.layer_norm", [x, r, w, b], (rand(4, 64), rand(4, 64)))
    add("attention", lambda q, k, v: K.attention(q, k, v, causal=True),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "F.scaled_dot_product_attention", [q, k, v], rand(1, 2, 16, 32))
    add("decode_attention", lambda q, kc, vc: K.decode_attention(q, kc, vc, 17),
        lambda q, kc, vc: F.scaled_dot_product_attention(q, kc[:, :, :17], vc[:, :, :17]),
        "F.scaled_dot_product_attention", [q1, kc, vc])
    add("linear", lambda x, w, b: K.linear(x, w, b, "gelu_tanh"),  # a decode step's MLP product
        lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"), "F.gelu(F.linear)",
        [x1, w1, b1])
    # The trainer's call (its targets checked on the host); check_targets=True adds one kernel
    # and a read of its flag (a host sync), whose stubbed launch would leave the flag unwritten.
    add("linear_cross_entropy", lambda h, w: K.linear_cross_entropy(h, w, targets, check_targets=False),
        lambda h, w: F.cross_entropy(F.linear(h, w).float(), targets),
        "F.cross_entropy(F.linear)", [hidden, weight], torch.ones((), device=dev))
    return out


def measure() -> list[dict]:
    rows = []
    for case in cases():
        ours, aten = us_per_call(case["ours"]), us_per_call(case["aten"])
        (kernels, syncs), (aten_kernels, _) = launches(case["ours"]), launches(case["aten"])
        rows.append(dict(op=case["op"], mode=case["mode"], us=ours, aten_us=aten,
                         ratio=ours / aten, launches=kernels, syncs=syncs,
                         aten_launches=aten_kernels, aten_name=case["aten_name"]))
    return rows


# ---- greedy decoding ------------------------------------------------------------------------

DECODE_CFG = {"vocab_size": 512, "context_length": 160, "emb_dim": 64, "n_heads": 4,
              "n_layers": 12, "drop_rate": 0.0, "qkv_bias": False}  # 124M's depth, tiny widths


SHORT, LONG = 8, 40  # new tokens of the two runs whose difference is per token


def decoding(provider: str, batch: int, layers: int = 12, prompt: int = 16):
    """``run(n)``: greedy decoding of n tokens after a ``prompt``-token prompt by ``provider``:
    "uncached" (the chapter's loop), "kv-torch", "kv-triton", "kv-triton-graph" (CUDA only)."""
    from gptfast import GPTModel, generate, generate_text_simple

    prompt = torch.randint(0, 512, (batch, prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(_device())
    torch.manual_seed(0)
    kernels = "torch" if provider in ("uncached", "kv-torch") else "triton"
    model = GPTModel({**DECODE_CFG, "n_layers": layers}, kernels=kernels).to(_device()).eval()
    if provider == "uncached":
        return lambda n: generate_text_simple(model, prompt, n, DECODE_CFG["context_length"])
    graph = provider == "kv-triton-graph"
    return lambda n: generate(model, prompt, n, use_cache=True, cuda_graph=graph)


def kernels_per_token(provider: str, batch: int, layers: int = 12) -> tuple[float, float | None]:
    """(kernel launches, host reads) per generated token (see ``launches``): exact counts, so
    two short runs do, after a 100-token prompt (decode attention splits its keys, as GPT-2's
    decoding does: split and merge kernels)."""
    run = decoding(provider, batch, layers, prompt=100)
    short, long = launches(lambda: run(2)), launches(lambda: run(4))
    return tuple(None if a is None else (b - a) / 2 for a, b in zip(short, long))


def per_token(batches=(1, 8)) -> list[dict]:
    """Host microseconds and kernel launches per generated token of greedy decoding with the
    KV cache, from two runs of different lengths (prefill cancels out), next to the chapter's
    uncached loop. A 12-layer model of tiny width: the per-token cost of the host path scales
    with the layers and the ops per layer, not with the width. On CUDA also with the graph
    (launches: what the profiler sees per token, the graph's kernels included)."""
    providers = ["uncached", "kv-torch", "kv-triton"] + ([] if STUB else ["kv-triton-graph"])
    rows = []
    for batch in batches:
        for provider in providers:
            run = decoding(provider, batch)
            short = us_per_call(lambda: run(SHORT), calls=1, rounds=3)  # noqa: B023
            long = us_per_call(lambda: run(LONG), calls=1, rounds=3)  # noqa: B023
            kernels, syncs = kernels_per_token(provider, batch)
            rows.append(dict(provider=provider, batch=batch, launches_per_token=kernels,
                             us_per_token=(long - short) / (LONG - SHORT), syncs_per_token=syncs))
    return rows


def _recorded(fn) -> list:
    global RECORD
    RECORD = []
    try:
        fn()
        return RECORD
    finally:
        RECORD = None


def variant_cases() -> list[dict]:
    """More calls whose launches differ by shape or flags, for ``launch_equivalence`` only:
    LayerNorm's wide rows (the looping kernels and the row sums), no weight nor bias (no
    reduction), a weight only, 3-D input, bf16 input with bf16 and then fp32 parameters (one
    config, two compiled kernels), a row-strided bf16 input added to an fp32 residual;
    the fused loss with a bias and label smoothing, an aligned vocabulary with "sum", several
    chunks, and "none" (whose backward reruns the chunk loop)."""
    import importlib

    from gptfast import kernels as K

    lce = importlib.import_module("gptfast.kernels.linear_cross_entropy")
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(1)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    def chunked(fn):  # 16-row chunks of 64 classes: 40 tokens take 3
        def call():
            saved, lce.plans.CHUNK_BYTES = lce.plans.CHUNK_BYTES, 16 * 64 * 4
            try:
                fn()
            finally:
                lce.plans.CHUNK_BYTES = saved
        return call

    wide, w_wide = rand(3, 8200), rand(8200)
    x, w = rand(2, 5, 64), rand(64)
    strided, residual = rand(4, 128, dtype=torch.bfloat16)[:, :64], rand(4, 64)
    hidden, weight, bias = rand(40, 32), rand(50, 32), rand(50)
    targets = torch.randint(0, 50, (40,), generator=g, device=dev)
    one = torch.ones((), device=dev)
    return [
        {"op": "layer_norm wide", "ours": _grad_call(lambda x, w, b: K.layer_norm(x, w, b),
                                                     [wide, w_wide, w_wide], rand(3, 8200))},
        {"op": "layer_norm no params", "ours": _grad_call(K.layer_norm, [x], rand(2, 5, 64))},
        {"op": "layer_norm weight only", "ours": _grad_call(K.layer_norm, [x, w], rand(2, 5, 64))},
        {"op": "layer_norm wide", "mode": "fwd", "ours": _no_grad_call(K.layer_norm, [wide, w_wide])},
        {"op": "layer_norm bf16, bf16 then fp32 parameters", "mode": "fwd", "ours": _no_grad_call(
            lambda x, w: (K.layer_norm(x, w.bfloat16(), w.bfloat16()), K.layer_norm(x, w, w)),
            [x.bfloat16(), w])},  # one plan (x's dtype), two specializations
        {"op": "add_layer_norm strided bf16 + fp32", "ours": _grad_call(
            lambda x, r, w: K.add_layer_norm(x, r, w), [strided, residual, w],
            (rand(4, 64), rand(4, 64)))},
        {"op": "linear_cross_entropy bias, smoothing", "ours": _grad_call(
            lambda h, w, b: K.linear_cross_entropy(h, w, targets, b, label_smoothing=0.1,
                                                   check_targets=False),
            [hidden, weight, bias], one)},
        {"op": "linear_cross_entropy aligned, sum", "ours": _grad_call(
            lambda h, w: K.linear_cross_entropy(h, w, targets, reduction="sum", check_targets=False),
            [hidden, rand(64, 32)], one)},
        {"op": "linear_cross_entropy chunks", "ours": chunked(_grad_call(
            lambda h, w: K.linear_cross_entropy(h, w, targets, check_targets=False),
            [hidden, rand(64, 32)], one))},
        {"op": "linear_cross_entropy none", "ours": _grad_call(
            lambda h, w: K.linear_cross_entropy(h, w, targets, reduction="none", check_targets=False),
            [hidden, weight], rand(40))},
    ]


class _Forgetful(dict):
    """A ``Kernel``'s cache that finds nothing: each launch takes Triton's dispatch."""

    def get(self, key, default=None):
        return None


def launch_equivalence() -> list[str]:
    """Each case's launches (``cases`` and ``variant_cases``) through ``_common.Kernel``'s direct
    path against the same call through Triton's own dispatch (every launch: the kernels' caches
    find nothing): the same compiled kernel (so the same specialization), grid, stream and
    arguments, launch for launch. Returns the differences (none when they agree)."""
    from gptfast.kernels import _common

    kernels = [k for name, mod in sys.modules.items() if name.startswith("gptfast.kernels.")
               for k in vars(mod).values() if isinstance(k, _common.Kernel)]
    problems = []
    for case in cases() + variant_cases():
        for fn in (case["ours"], case.get("aten")):
            if fn is not None:
                fn()  # compile (stubbed) and fill the caches
        direct = _recorded(case["ours"])
        for k in kernels:  # every launch of the call through Triton's dispatch
            k._compiled = _Forgetful()
        triton_path = _recorded(case["ours"])
        for k in kernels:
            k._compiled = {}
        what = f"{case['op']} {case.get('mode', 'fwd+bwd')}"  # (variants: fwd+bwd unless named)
        if not direct:
            problems.append(f"{what}: no launch recorded")
        if len(direct) != len(triton_path):
            problems.append(f"{what}: {len(direct)} launches direct, {len(triton_path)} by Triton")
        for i, (a, b) in enumerate(zip(direct, triton_path)):
            if a[0] is not b[0]:
                problems.append(f"{what} launch {i}: another compiled kernel than Triton's")
            if a[1:] != b[1:]:
                problems.append(f"{what} launch {i}: grid/stream/arguments differ: {a[1:]} vs {b[1:]}")
    return problems


def main(argv) -> None:
    if STUB:
        install_stub()
    what = argv[1] if len(argv) > 1 else "ops"
    torch.set_num_threads(1)
    run = {"ops": measure, "tokens": per_token, "equivalence": launch_equivalence,
           "count": lambda: kernels_per_token("kv-triton", 1, layers=2)}[what]
    with contextlib.redirect_stdout(sys.stderr):  # only the JSON goes to stdout
        rows = run()
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv)
