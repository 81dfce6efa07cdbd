"""What the tests, the benchmark suite and the static report share: the agreement rule and
the ahead-of-time compiler.

The agreement rule (the FlashAttention test method, "2x rule"): a kernel computing in dtype D is
compared with a float64 reference. Its max abs error must be at most ``factor`` times the error
that eager PyTorch makes in the same dtype against the same reference, plus an absolute slack
``atol`` (for outputs where eager happens to be exact).

Ahead-of-time compilation: Triton's interpreter runs kernels on CPU but forgives what the GPU
compiler does not (tl.dot shapes below 16, layouts, shared-memory overflow). ``compile_kernel``
compiles a kernel to cubin for sm_80 (A100) or sm_90 (H100) with the ptxas shipped in the triton
wheel. A kernel module opts in by defining ``aot_configs()``: an iterable of dicts with keys
``name``, ``fn`` (the @triton.jit kernel), ``signature`` ({arg: "*fp16" | "i32" | "fp32" |
"constexpr" ...}), ``constexprs`` ({arg: value}) and optionally ``num_warps``/``num_stages``/``attrs``,
covering every launch configuration its heuristics can pick. Kernels decorated under
TRITON_INTERPRET=1 cannot be compiled, so ``compile_module`` runs the compiler in a subprocess
with the interpreter switched off: ``python -m gptfast.kernels.testing MODULE``.

Static figures of a compiled kernel (``kernel_stats``, ``occupancy``): registers, spills, shared
memory, resident blocks per SM, the matrix and load instructions and the main loop's length,
read from the cubin with the ``cuobjdump`` that ships in the triton wheel. The gate
(tests/test_static.py) and the report (``python -m gptfast.kernels.report``) share them.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# --- the agreement rule ----------------------------------------------------------------------


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, computed in float64 (0.0 for empty tensors)."""
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} differs from reference {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def agreement(out, eager, ref, factor=2.0, atol=0.0) -> dict:
    """Errors of ``out`` and ``eager`` against ``ref``, the bound, and whether ``out`` is within it."""
    err, eager_err = max_err(out, ref), max_err(eager, ref)
    bound = factor * eager_err + atol
    finite = bool(torch.isfinite(out).all())
    return {"err": err, "eager_err": eager_err, "bound": bound, "ok": finite and err <= bound}


def assert_agrees(out, eager, ref, factor=2.0, atol=0.0, what="output") -> None:
    """Fail unless ``out`` is finite and within ``factor`` x eager's error (+ atol) of ``ref``."""
    a = agreement(out, eager, ref, factor, atol)
    assert a["ok"], (
        f"{what}: max error {a['err']:.3e} exceeds {factor} x eager error {a['eager_err']:.3e}"
        f" + {atol:.1e} = {a['bound']:.3e} (or is not finite)"
    )


# --- ahead-of-time compilation --------------------------------------------------------------

# Shared memory a block may use (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ROOT = Path(__file__).resolve().parents[2]  # the directory holding the gptfast package


def _compiled(fn, signature, constexprs, cc, num_warps=4, num_stages=3, attrs=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def compile_kernel(fn, signature, constexprs, cc, num_warps=4, num_stages=3, attrs=None):
    """Compile one kernel config to cubin for compute capability ``cc``; returns its metadata.

    ``attrs`` are the argument specialisations a real launch gets (e.g. 16-byte divisibility
    of pointers and strides); without them the compiler skips vectorised and pipelined loads
    and reports less shared memory than the launch would use.
    """
    return _compiled(fn, signature, constexprs, cc, num_warps, num_stages, attrs).metadata


# --- static figures of a compiled kernel ------------------------------------------------------

# Per-SM limits of sm_80 (A100) and sm_90 (H100/H200), as CUDA's occupancy calculator uses them.
SM_COUNT = {80: 108, 90: 132}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # the largest carveout, reserved part included
REGS_PER_SM, SUB_PARTITIONS, MAX_WARPS, MAX_BLOCKS = 65536, 4, 64, 32
REG_UNIT = 256  # registers are allocated per warp, 256 at a time (8 per thread)
SHARED_UNIT, SHARED_RESERVED = 128, 1024  # allocation unit; the 1 KiB CUDA keeps per block

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_WIDTHS = (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1))


def _access_bytes(op: str) -> int:
    """Bytes per thread of a load/store opcode such as LDL.LU.64 or LDG.E.128 (default 4)."""
    parts = set(op.split(".")[1:])
    return next((size for key, size in _WIDTHS if key in parts), 4)


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary (cuobjdump, ptxas) shipped in the triton wheel that is imported."""
    import triton.backends.nvidia

    return str(Path(triton.backends.nvidia.__file__).parent / "bin" / name)


def _is_spin(ops: list, lo: int, hi: int) -> bool:
    """Whether the loop [lo, hi] only polls a counter in global memory (a strong load or an
    atomic, no matrix product): a wait, not a work loop; the loop around it is the work loop."""
    body = [op for a, op, _ in ops if lo <= a <= hi and op != "NOP"]
    polls = any(op.startswith(("LDG.E.STRONG", "ATOMG", "ATOM.")) for op in body)
    return polls and len(body) <= 16 and not any(op.startswith("HGMMA") for op in body)


def _sass_figures(sass: str) -> dict:
    """Matrix and load instructions, spill bytes and loop lengths read from ``cuobjdump -sass``.

    Spills: Triton keeps no arrays in local memory, so every local store/load (STL/LDL) is a
    spill; their bytes are what ``ptxas -v`` reports as spill stores/loads (checked equal on the
    dropout forward, triton 3.9: 380/388 B on sm_90, 340/452 B on sm_80). Loops: each backward
    branch (a BRA to an earlier address) closes a loop from its target block to the branch; an
    innermost loop holds no other. ``loops`` are their instruction counts (NOPs aside) in
    program order; ``main_loop`` is the shortest: in the flash kernels the masked (diagonal,
    boundary) loop repeats the unmasked steady-state loop's work plus the masking, so the
    shortest is the one most key or query tiles go through. Loops that only poll a barrier (the
    wait for a TMA copy) are left out, and so are those that only poll a counter (the one-pass
    backward's wait for its turn): the loop around such a poll is the work loop.
    """
    ops = [(int(a, 16), op, rest) for a, op, rest in _INSTRUCTION.findall(sass)]
    names = {op.split(".")[0] for _, op, _ in ops}
    spills = {"STL": 0, "LDL": 0}
    ldg_bytes = 0
    for _, op, _ in ops:
        base = op.split(".")[0]
        if base in spills:
            spills[base] += _access_bytes(op)
        elif base == "LDG":
            ldg_bytes = max(ldg_bytes, _access_bytes(op))
    loops = []
    for addr, op, rest in ops:
        target = re.search(r"0x([0-9a-f]+)\s*$", rest.strip())
        if op.split(".")[0] == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    loops = [(lo, hi) for lo, hi in loops if not _is_spin(ops, lo, hi)]
    inner = [(lo, hi) for lo, hi in loops
             if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in loops)]
    bodies = [[op for a, op, _ in ops if lo <= a <= hi and op != "NOP"] for lo, hi in sorted(inner)]
    # a barrier poll (a TMA copy's mbarrier wait: SYNCS.PHASECHK and the branch, at most an
    # address computation beside them) is no work loop
    lengths = [len(body) for body in bodies
               if not (len(body) <= 4 and any(op.startswith("SYNCS.PHASECHK") for op in body))]
    mma = "wgmma" if "HGMMA" in names else "mma.sync" if "HMMA" in names else "none"
    loads = [name for name, ops_ in (("TMA", {"UTMALDG", "UBLKCP"}), ("cp.async", {"LDGSTS"}))
             if names & ops_]
    if ldg_bytes:
        loads.append(f"ldg.{8 * ldg_bytes}")  # the widest plain global load, in bits
    return {"spill_stores": spills["STL"], "spill_loads": spills["LDL"], "mma": mma,
            "loads": "+".join(loads) or "none", "loops": lengths,
            "main_loop": min(lengths) if lengths else None, "sass": len(ops)}


def kernel_stats(cubin: bytes, dynamic_shared: int, sass: bool = True) -> dict:
    """Static figures of one compiled kernel: registers per thread, stack frame and spill bytes,
    shared memory per block (Triton's dynamic allocation plus the cubin's static one), and
    ``_sass_figures``; from ``cuobjdump --dump-resource-usage`` and ``cuobjdump -sass``.

    Disassembling takes ~0.8 s a kernel, the resource usage ~0.01 s: with ``sass=False`` the
    SASS figures are None, and the spill bytes are 0 when the stack frame is empty (spill slots
    live in it), read from the SASS otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)

        def cuobjdump(*args):  # nvdisasm's format warnings on stderr are ignored
            cmd = [nvidia_tool("cuobjdump"), *args, str(path)]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

        out = cuobjdump("--dump-resource-usage")
        found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
        stats = {"registers": int(found["REG"]), "stack": int(found["STACK"]),
                 "shared": dynamic_shared + int(found["SHARED"])}
        if sass:
            return {**stats, **_sass_figures(cuobjdump("-sass"))}
        spills = _sass_figures(cuobjdump("-sass")) if stats["stack"] else {}
        return {**stats, **dict.fromkeys(("mma", "loads", "loops", "main_loop", "sass")),
                "spill_stores": spills.get("spill_stores", 0),
                "spill_loads": spills.get("spill_loads", 0)}


def occupancy(cc: int, num_warps: int, registers: int, shared: int) -> dict:
    """Resident blocks and warps per SM of a kernel, and which limit binds.

    As CUDA's occupancy calculator: registers go per warp in units of REG_UNIT, and each of the
    4 sub-partitions holds whole warps out of its quarter of the register file; shared memory
    per block is rounded up to SHARED_UNIT after adding the 1 KiB CUDA reserves per block; at
    most MAX_WARPS warps and MAX_BLOCKS blocks. ``limit`` names the binding one(s).
    """
    regs_per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    warps_by_regs = REGS_PER_SM // SUB_PARTITIONS // regs_per_warp * SUB_PARTITIONS
    block_shared = -(-(shared + SHARED_RESERVED) // SHARED_UNIT) * SHARED_UNIT
    limits = {
        "registers": warps_by_regs // num_warps,
        "shared": SHARED_PER_SM[cc] // block_shared,
        "warps": MAX_WARPS // num_warps,
        "blocks": MAX_BLOCKS,
    }
    blocks = min(limits.values())
    return {"blocks": blocks, "warps": blocks * num_warps, "limits": limits,
            "limit": "+".join(k for k, v in limits.items() if v == blocks)}


def launch_config(name: str, fn, args: dict, constexprs: dict, num_warps: int,
                  num_stages: int = 3) -> dict:
    """The aot config of the launch ``fn[grid](**args, **constexprs, num_warps=..., num_stages=...)``,
    specialised as Triton's JIT specialises a launch: ``args`` holds each runtime argument's
    value, a tensor as its pointer type ("*bf16"; 16-byte aligned, as torch allocates); ints equal
    to 1 become constexprs and multiples of 16 get the divisibility hint, except the arguments
    the kernel does not specialise on; floats are fp32. For ``report_cases()`` of kernel modules.
    """
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, param in enumerate(fn.params):
        arg = param.name
        value = args.get(arg)
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif isinstance(value, str):
            signature[arg], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[arg] = "fp32"
        elif param.do_not_specialize:
            signature[arg] = "i32"
        elif value == 1:
            signature[arg], consts[arg] = "constexpr", 1
        else:
            signature[arg] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return {"name": name, "fn": fn, "signature": signature, "constexprs": consts, "attrs": attrs,
            "num_warps": num_warps, "num_stages": num_stages}


@contextlib.contextmanager
def sm_count_of(module: str, count: int):
    """Let ``module``'s launch plans see ``count`` SMs (its ``_sm_count``), with no GPU present."""
    mod = sys.modules[module]
    real = mod._sm_count
    mod._sm_count = lambda *_: count
    try:
        yield
    finally:
        mod._sm_count = real


def config_key(cfg: dict) -> str:
    """What identifies the compiled code of an aot config (its name aside)."""
    attrs = sorted((str(k), v) for k, v in (cfg.get("attrs") or {}).items())
    return json.dumps([cfg["fn"].__module__, cfg["fn"].__name__, cfg["signature"],
                       sorted(cfg["constexprs"].items()), attrs, cfg.get("num_warps", 4),
                       cfg.get("num_stages", 3)], default=str)


def async_reads_of_refilled_buffers(ttgir: str, num_stages: int) -> list[str]:
    """The asynchronous wgmma reads of a software-pipelined shared buffer that the pipeline
    refills while they may still be pending: a WAR race on shared memory.

    A ``warp_group_dot_wait {pendings = n > 0}`` leaves up to n wgmma groups in flight; its
    operands name the shared buffers they still read. Such a buffer, if it is one of the
    pipeline's multi-buffered allocations (``local_alloc : () -> memdesc<S x ...>``), needs a
    slot more than the prefetch distance (S >= num_stages): with S = num_stages - 1 the load of
    tile i + S is issued into the very slot that tile i's wgmma still reads. Returns one line
    (the wait, the buffer, S) per such read; the interpreter cannot see this (it has no shared
    memory and runs tl.dot synchronously).
    """
    defs = {}
    for line in ttgir.splitlines():
        if m := re.match(r"\s*(%[\w.]+)(?::\d+)? = (\S+) (.*)", line):
            defs[m.group(1)] = (m.group(2), m.group(3))
    views = ("ttg.memdesc_subslice", "ttg.memdesc_index", "ttg.memdesc_trans")

    def allocation(value):  # through subviews to the op that made the buffer
        while value in defs and defs[value][0] in views:
            value = re.match(r"(%[\w.]+)", defs[value][1]).group(1)
        return value, *defs.get(value, ("", ""))

    races = []
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot_wait" not in line or "{pendings = 0 " in line:
            continue
        operands = line.split("warp_group_dot_wait", 1)[1].split("{", 1)[0]
        for value in re.findall(r"%[\w.]+", operands):
            buffer, op, rest = allocation(value)
            slots = re.match(r": \(\) -> !ttg.memdesc<(\d+)x", rest)
            if op == "ttg.local_alloc" and slots and int(slots.group(1)) < num_stages:
                wait = line.split("loc(")[0].strip()
                races.append(f"{wait}: {buffer} has {slots.group(1)} slots")
    return races


def pipelined_tiles(ttgir: str) -> int:
    """How many 2-D 16-bit tile buffers in shared memory the software pipeliner allocated (a
    leading slot dimension: (slots, rows, cols)); 0: the loop issues its loads and waits for
    them itself."""
    return len(re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<\d+x\d+x\d+x(?:bf16|f16)",
                          ttgir))


def config_record(cfg: dict, cc: int, sass: bool = True) -> dict:
    """Compile one aot config for ``cc``: its name, kernel, cc, triton version, ok/error, the
    per-block shared-memory limit, ``kernel_stats``' figures (``sass``: see there) and, for
    sm_90, the races ``async_reads_of_refilled_buffers`` finds and the ``pipelined_tiles``."""
    import triton

    record = {"name": cfg["name"], "kernel": cfg["fn"].__name__, "cc": cc,
              "triton": triton.__version__, "limit": SHARED_LIMIT[cc],
              "num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    try:
        kernel = _compiled(cfg["fn"], cfg["signature"], cfg["constexprs"], cc,
                           record["num_warps"], record["num_stages"], cfg.get("attrs"))
        record.update(ok=True, error=None, **kernel_stats(kernel.asm["cubin"], kernel.metadata.shared, sass))
        if cc >= 90:  # wgmma's asynchronous reads against the software pipeline's refills
            record["races"] = async_reads_of_refilled_buffers(kernel.asm["ttgir"], record["num_stages"])
            record["pipelined_tiles"] = pipelined_tiles(kernel.asm["ttgir"])
    except Exception as exc:  # reported to the caller, which fails with the message
        record.update(ok=False, shared=None, error=f"{type(exc).__name__}: {exc}"[:2000])
    return record


def compiler_env(pythonpath: str | None = None) -> dict:
    """Environment of a compiler subprocess: no interpreter; ``pythonpath`` (e.g. a side-installed
    triton) ahead of the repository."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [p for p in (pythonpath, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_shards(args: list[str], shards: int, pythonpath: str | None = None, timeout=900) -> list[dict]:
    """Run ``python -m ARGS --shard i/shards`` for each i in parallel; their JSON output lines."""
    env = compiler_env(pythonpath)
    procs = [subprocess.Popen([sys.executable, "-m", *args, "--shard", f"{i}/{shards}"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    records = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"compiler process {' '.join(args)} failed:\n{err[-4000:]}")
            records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finally:
        for proc in procs:
            proc.kill()
    return records


def shard(items: list, cost, spec: str) -> list:
    """The part ``i`` of ``spec`` = "i/n" of ``items``: longest first, each to the lightest part."""
    i, n = map(int, spec.split("/"))
    loads, mine = [0.0] * n, []
    for item in sorted(items, key=cost, reverse=True):
        part = loads.index(min(loads))
        loads[part] += cost(item)
        if part == i:
            mine.append(item)
    return mine


def compile_cost(cfg: dict) -> float:
    """Rough relative compile time, to balance shards: Philox dropout code compiles slowly."""
    return 4.0 if cfg["constexprs"].get("DROPOUT") else 1.0


def compile_module(module: str, ccs=(80, 90), timeout=900, shards=1, pythonpath=None,
                   sass=True) -> list[dict]:
    """Compile every config of ``module.aot_configs()`` for each cc, in compiler subprocesses
    (``shards`` of them in parallel; ``pythonpath`` first on their path, e.g. another triton).
    A config with a ``ccs`` entry (the compute capabilities whose launch plans pick it) is
    compiled for those only.

    Returns one ``config_record`` per (config, cc); ``sass=False``: without the SASS figures
    but the spills (``kernel_stats``), several times faster.
    """
    args = ["gptfast.kernels.testing", module, *map(str, ccs), *([] if sass else ["--no-sass"])]
    return run_shards(args, shards, pythonpath, timeout)


def _main(module: str, ccs: list[int], part: str, sass: bool) -> None:
    import importlib

    configs = importlib.import_module(module).aot_configs()
    for cfg in shard(configs, compile_cost, part):
        for cc in ccs:
            if cc in cfg.get("ccs", ccs):  # a config the plans pick on some GPUs only
                print(json.dumps(config_record(cfg, cc, sass)), flush=True)


if __name__ == "__main__":
    argv = sys.argv[1:]
    part, sass = "0/1", "--no-sass" not in argv
    argv = [a for a in argv if a != "--no-sass"]
    if "--shard" in argv:
        at = argv.index("--shard")
        part = argv[at + 1]
        del argv[at:at + 2]
    _main(argv[0], [int(c) for c in argv[1:]] or [80, 90], part, sass)
