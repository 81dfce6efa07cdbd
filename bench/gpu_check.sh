#!/usr/bin/env bash
# The one-call GPU check: test suite, quick benchmark and a short profile on a CUDA machine.
#
#   bench/gpu_check.sh OUTDIR
#
# Runs from the repo root with PYTHONPATH=<repo> and the machine's own python (no venv):
#   env      OUTDIR/env.txt      nvidia-smi, python/torch/triton versions, device, git commit
#   wheels   (only if .gpu_wheels/*.whl exist) pip install --no-deps into a temp dir on PYTHONPATH,
#            e.g. Liger-Kernel: `pip download --no-deps liger-kernel -d .gpu_wheels` beforehand
#   tests    OUTDIR/tests.log, OUTDIR/tests.xml (junit): pytest tests, less the three kernel files
#   tests_kernels  OUTDIR/tests_kernels.log, .xml: the kernel files (many Triton compiles, realistic
#            shapes); GPU_CHECK_TESTS=PATHS replaces both steps by one `tests` step over PATHS
#   bench    the quick benchmark of the kernels (every bench/ module but the two below):
#            OUTDIR/bench.log, OUTDIR/bench.json (pytest-benchmark), OUTDIR/results/ (summary)
#   bench_model  the quick generation and whole-model benchmarks (bench/test_generation.py,
#            bench/test_model.py): OUTDIR/bench_model.log, OUTDIR/bench_model.json,
#            OUTDIR/results-model/ (summary)
#   tune     OUTDIR/tune.log, OUTDIR/configs/<device>.json: bench/tune.py's tuning table, to commit
#            as gptfast/kernels/configs/<device>.json (GPU_CHECK_TUNE=0 skips it; on CPU a dry run)
#   profile  OUTDIR/profile.log, OUTDIR/profile/ (only if `python -m gptfast profile` exists)
#   sanitizer_memcheck, sanitizer_racecheck  OUTDIR/sanitizer_*.log: a few small kernel tests
#            (SANITIZER_TESTS below) under `compute-sanitizer --tool memcheck` and `--tool
#            racecheck`; each tool's error count goes to steps.txt. On by default when
#            compute-sanitizer is on the PATH and there is a CUDA device; skipped with a message
#            otherwise (GPU_CHECK_SANITIZER=0: off; =1: also on a dry run)
# Each step has its own timeout (under 10 minutes in all: 60 + 120 + 100 + 80 + 120 + 30 + 2 x 40
# s, to leave the machine's start and a rerun room in a 15-minute device budget);
# a failing or timed-out step does not stop the others, and a benchmark step cut short keeps the
# summary of the cases it finished. OUTDIR/steps.txt lists each step's exit status. Exit status: 0 if every
# step passed on a CUDA device; 1 if a step failed; 3 if there was no CUDA device (a dry run:
# the steps still run, on CPU; GPU_CHECK_ALLOW_CPU=1 makes such a run exit 0 when they pass).
#
# Environment: PYTHON (default python3), GPU_CHECK_TESTS (default "tests"),
# GPU_CHECK_PROFILE_ARGS (arguments of `python -m gptfast profile`),
# GPU_CHECK_TIMEOUT_TESTS / _TESTS_KERNELS / _BENCH / _BENCH_MODEL / _TUNE / _PROFILE / _SANITIZER
# (seconds; default 60 / 120 / 100 / 80 / 120 / 30 / 40 per tool), GPU_CHECK_TUNE (default 1),
# GPU_CHECK_SANITIZER (auto, 0 or 1).
set -u -o pipefail

OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$OUTDIR/steps.txt"
FAILED=()

step() {  # step NAME TIMEOUT_S COMMAND...: run with a timeout, output to OUTDIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc note=""
    shift 2
    echo "== $name (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (timed out after ${limit}s)"; fi
    echo "$name: exit $rc$note, $((SECONDS - start))s" | tee -a "$OUTDIR/steps.txt"
    tail -n 15 "$OUTDIR/$name.log"
    if [ "$rc" -ne 0 ]; then FAILED+=("$name"); fi
}

# --- environment ------------------------------------------------------------------------------
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    CUDA=1
else
    CUDA=0
    echo "!! no CUDA device: this is a DRY RUN on CPU (interpreter agreement cases only, no GPU timings)"
fi
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted changes: $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') paths"
    echo "cuda device: $([ "$CUDA" = 1 ] && echo yes || echo 'NONE (dry run)')"
    "$PY" - <<'PYEOF' 2>&1
import platform, torch, triton
print("python:", platform.python_version(), platform.machine())
print("torch:", torch.__version__, "cuda", torch.version.cuda)
print("triton:", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
for name in ("pytest", "pytest_benchmark", "liger_kernel", "matplotlib", "tiktoken", "transformers"):
    try:
        mod = __import__(name)
        print(f"{name}:", getattr(mod, "__version__", "present"))
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
PYEOF
    echo "--- nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi not available"
} >"$OUTDIR/env.txt"
sed -n 1,12p "$OUTDIR/env.txt"

# --- wheels carried to an offline machine (e.g. Liger-Kernel) ----------------------------------
shopt -s nullglob
WHEELS=(.gpu_wheels/*.whl)
if [ ${#WHEELS[@]} -gt 0 ]; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${WHEELS[@]}"
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# --- (a) the test suite -----------------------------------------------------------------------
# The ahead-of-time compile checks (CI's stand-in for a GPU) are left to CI: here every kernel
# is compiled for real. --durations shows where the step's time goes.
# The kernel files run in a step of their own: a first run compiles many kernel variants, and
# a timeout there must not hide the results of the other tests.
PYTEST=("$PY" -m pytest -q -rfEs -k "not aot_compile" --durations=15 -p no:cacheprovider)
KERNEL_TESTS=(tests/test_attention.py tests/test_layer_norm.py tests/test_decode_attention.py)
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
    # shellcheck disable=SC2086  # GPU_CHECK_TESTS may name several paths
    step tests "${GPU_CHECK_TIMEOUT_TESTS:-230}" "${PYTEST[@]}" $GPU_CHECK_TESTS --junitxml="$OUTDIR/tests.xml"
else
    step tests "${GPU_CHECK_TIMEOUT_TESTS:-60}" "${PYTEST[@]}" tests "${KERNEL_TESTS[@]/#/--ignore=}" \
        --junitxml="$OUTDIR/tests.xml"
    step tests_kernels "${GPU_CHECK_TIMEOUT_TESTS_KERNELS:-120}" "${PYTEST[@]}" "${KERNEL_TESTS[@]}" \
        --junitxml="$OUTDIR/tests_kernels.xml"
fi

# --- (b) the quick benchmark: kernels, then the whole model and generation ---------------------
MODEL_BENCH=(bench/test_generation.py bench/test_model.py)
step bench "${GPU_CHECK_TIMEOUT_BENCH:-100}" "$PY" -m pytest bench --benchmark-only --quick -q -rfEs \
    -p no:cacheprovider "${MODEL_BENCH[@]/#/--ignore=}" \
    --results-dir "$OUTDIR/results" --benchmark-json "$OUTDIR/bench.json"
step bench_model "${GPU_CHECK_TIMEOUT_BENCH_MODEL:-80}" "$PY" -m pytest "${MODEL_BENCH[@]}" \
    --benchmark-only --quick -q -rfEs -p no:cacheprovider \
    --results-dir "$OUTDIR/results-model" --benchmark-json "$OUTDIR/bench_model.json"

# --- (b2) the per-device tuning table (bench/tune.py) ------------------------------------------
# Sweeps the tunable launch configs at GPT-2 shapes (agreement-checked) and writes
# OUTDIR/configs/<device name>.json, to commit as gptfast/kernels/configs/<device name>.json.
# GPU_CHECK_TUNE=0 skips it; on CPU it is a dry run in the interpreter (plumbing only).
if [ "${GPU_CHECK_TUNE:-1}" != 0 ]; then
    TUNE_TIMEOUT=${GPU_CHECK_TIMEOUT_TUNE:-120}
    if [ "$CUDA" = 1 ]; then
        # no new shape class past the budget, and the table is rewritten after each class
        step tune "$TUNE_TIMEOUT" "$PY" -m bench.tune --out-dir "$OUTDIR/configs" \
            --budget $((TUNE_TIMEOUT * 3 / 4))
    else
        step tune "$TUNE_TIMEOUT" env TRITON_INTERPRET=1 "$PY" -m bench.tune \
            --dry-run --out-dir "$OUTDIR/configs"
    fi
fi

# --- (c) a short profile ----------------------------------------------------------------------
if "$PY" -m gptfast profile --help >/dev/null 2>&1; then
    if [ "$CUDA" = 1 ]; then
        DEFAULT_PROFILE="--config 124M --batch 8 --mode train --kernels triton --dtype bf16 --active 2"
    else
        DEFAULT_PROFILE="--config tiny --batch 1 --seq-len 32 --mode forward --kernels torch --device cpu"
    fi
    # shellcheck disable=SC2086
    step profile "${GPU_CHECK_TIMEOUT_PROFILE:-30}" "$PY" -m gptfast profile \
        ${GPU_CHECK_PROFILE_ARGS:-$DEFAULT_PROFILE} --out "$OUTDIR/profile"
else
    echo "profile: skipped, 'python -m gptfast profile' is not available" | tee -a "$OUTDIR/steps.txt"
fi

# --- (d) compute-sanitizer: memory errors and shared-memory races in small kernel tests ---------
# Small shapes, odd lengths, dropout, ragged decode lengths and wide LayerNorm rows: every kernel
# and its masked edges, at sizes the tools check in seconds (the kernels are compiled already).
# Without PyTorch's caching allocator each tensor is an allocation of its own, so memcheck sees
# an access past its end.
SANITIZER_TESTS=(
    tests/test_attention.py::test_dropout_matches_eager_with_kernel_mask
    tests/test_attention.py::test_non_contiguous_inputs_and_grad
    tests/test_layer_norm.py::test_add_layer_norm_matches_reference
    tests/test_decode_attention.py::test_per_row_lengths
    tests/test_decode_attention.py::test_split_count_changes_only_rounding
)
sanitizer_errors() {  # sum of the error counts of a log's summary lines; "unknown" without one
    awk '/(ERROR|RACECHECK) SUMMARY/ { n++; if (match($0, /[0-9]+ error/)) s += substr($0, RSTART, RLENGTH - 6) }
         END { print (n ? s + 0 : "unknown") }' "$1"
}
SANITIZE=${GPU_CHECK_SANITIZER:-auto}
if [ "$SANITIZE" = 0 ]; then
    echo "sanitizer: skipped (GPU_CHECK_SANITIZER=0)" | tee -a "$OUTDIR/steps.txt"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "sanitizer: skipped, compute-sanitizer is not on the PATH" | tee -a "$OUTDIR/steps.txt"
elif [ "$CUDA" = 0 ] && [ "$SANITIZE" != 1 ]; then
    echo "sanitizer: skipped, no CUDA device (GPU_CHECK_SANITIZER=1 runs it anyway)" | tee -a "$OUTDIR/steps.txt"
else
    for tool in memcheck racecheck; do
        step "sanitizer_$tool" "${GPU_CHECK_TIMEOUT_SANITIZER:-40}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 1 \
            "${PYTEST[@]}" "${SANITIZER_TESTS[@]}"
        echo "sanitizer_$tool: $(sanitizer_errors "$OUTDIR/sanitizer_$tool.log") errors" | tee -a "$OUTDIR/steps.txt"
    done
fi

# --- verdict ----------------------------------------------------------------------------------
echo "--- results in $OUTDIR"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED steps: ${FAILED[*]}" | tee -a "$OUTDIR/steps.txt"
    exit 1
fi
if [ "$CUDA" = 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "all steps passed, but there was NO CUDA DEVICE: no GPU check was done" | tee -a "$OUTDIR/steps.txt"
    exit 3
fi
echo "all steps passed" | tee -a "$OUTDIR/steps.txt"
