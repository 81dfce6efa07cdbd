#!/usr/bin/env bash
# The one-call GPU check: test suite, quick benchmarks, a short profile and compute-sanitizer on
# a CUDA machine, sized for one 15-minute device lease.
#
#   bench/gpu_check.sh OUTDIR
#
# Runs from the repo root with PYTHONPATH=<repo> and the machine's own python (no venv). Steps
# (GPU_CHECK_STEPS, default "tests bench bench_model profile memcheck"; "tune" and "racecheck"
# on request), each with its log OUTDIR/<step>.log:
#   env          OUTDIR/env.txt: nvidia-smi, python/torch/triton/xdist versions, device, commit
#   wheels       (only if .gpu_wheels/*.whl exist) pip install --no-deps into a temp dir on
#                PYTHONPATH, e.g. Liger-Kernel: `pip download --no-deps liger-kernel -d .gpu_wheels`
#   tests        pytest tests (less the static gate, CI's job) on GPU_CHECK_WORKERS xdist workers
#                (default: cores - 2; serial without pytest-xdist): OUTDIR/tests.xml (junit),
#                OUTDIR/tests-outcomes.jsonl (each failure: node id, phase, message)
#   tests_rerun  only after failures: those tests again, serially, in order, a fresh process after
#                any test that leaves the CUDA context broken (bench/_test_outcomes.py), so that
#                OUTDIR/tests-failed.txt marks each failure "own failure" or "cascade"
#   bench        the quick kernel benchmarks: OUTDIR/bench.json, OUTDIR/results/ (quick.md ...)
#   bench_model  the quick generation and whole-model benchmarks: OUTDIR/bench_model.json,
#                OUTDIR/results-model/
#   profile      `python -m gptfast profile`, GPT-2 124M bf16 training with the Triton kernels:
#                OUTDIR/profile/
#   memcheck, racecheck  a few small kernel tests (SANITIZER_TESTS) under compute-sanitizer
#                (--tool memcheck / racecheck, PyTorch's caching allocator off); the error count
#                goes to steps.txt. Skipped with a message without compute-sanitizer or CUDA.
#   tune         bench/tune.py's table: OUTDIR/configs/<device>.json, to commit as
#                gptfast/kernels/configs/<device>.json (on CPU a dry run)
# Sizes, from the first H200 run (2026-12-04, 16 cores): tests 160 s on 14 workers, kernel bench
# 91 s, model bench 105 s (before its recipe, graphs and dropout-0.1 cases), memcheck 25 s; the profile,
# racecheck and tune are unmeasured. The default steps take ~8-9 minutes and at most 745 s with
# every timeout hit (tests 200, rerun 60, bench 105, bench_model 300, profile 35, memcheck 35,
# env ~10): over the device tool's 600 s per command, so a lease runs them as two commands,
# GPU_CHECK_STEPS="tests bench" (<= 375 s) then "bench_model profile memcheck" (<= 380 s); with
# the machine's start (1-2 min) that leaves ~2-4 minutes of a 15-minute lease for the
# experiments or one rerun (e.g. GPU_CHECK_STEPS=tests). A failing or timed-out step does not stop the others; a
# benchmark step cut short keeps the summary of the cases it finished. OUTDIR/steps.txt lists
# each step's exit status and time. GPU_CHECK_BUNDLE=DIR copies at most 7 files there, for a
# tool that returns few: steps.txt, env.txt, tests-failed.txt, kernels-quick.md, model-quick.md,
# profile.log and gpu_check.tgz (all of OUTDIR).
# Exit status: 0 if every step passed on a CUDA device; 1 if a step failed; 3 without a CUDA
# device (a dry run: the steps still run, on CPU; GPU_CHECK_ALLOW_CPU=1 makes it exit 0).
#
# Environment: PYTHON (default python3), GPU_CHECK_STEPS, GPU_CHECK_TESTS (paths of the tests
# step, default "tests"), GPU_CHECK_WORKERS, GPU_CHECK_PROFILE_ARGS, GPU_CHECK_BUNDLE,
# GPU_CHECK_TIMEOUT_<STEP> (seconds: TESTS 200, TESTS_RERUN 60, BENCH 105, BENCH_MODEL 300,
# PROFILE 35, MEMCHECK 35, RACECHECK 90, TUNE 120).
set -u -o pipefail

OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
PY=${PYTHON:-python3}
STEPS=" ${GPU_CHECK_STEPS:-tests bench bench_model profile memcheck} "
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$OUTDIR/steps.txt"
FAILED=()

wanted() { [[ "$STEPS" == *" $1 "* ]]; }
limit() {  # limit STEP DEFAULT: GPU_CHECK_TIMEOUT_<STEP> or DEFAULT
    local var="GPU_CHECK_TIMEOUT_${1^^}"
    echo "${!var:-$2}"
}
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
    echo "host: $(hostname), $(nproc) cores"
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
for name in ("pytest", "xdist", "pytest_benchmark", "liger_kernel", "matplotlib", "tiktoken",
             "transformers"):
    try:
        mod = __import__(name)
        print(f"{name}:", getattr(mod, "__version__", "present"))
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
PYEOF
    echo "--- nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi not available"
} >"$OUTDIR/env.txt"
sed -n 1,13p "$OUTDIR/env.txt"

# --- wheels carried to an offline machine (e.g. Liger-Kernel) ----------------------------------
shopt -s nullglob
WHEELS=(.gpu_wheels/*.whl)
if [ ${#WHEELS[@]} -gt 0 ]; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${WHEELS[@]}"
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# --- (a) the test suite, then its failures again, one at a time --------------------------------
# The static gate (every config compiled for sm_80 and sm_90, twice) is CI's: here every kernel
# is compiled for real. --durations shows where the step's time goes.
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
if wanted tests; then
    PARALLEL=()
    if "$PY" -c "import xdist" 2>/dev/null; then
        PARALLEL=(-n "${GPU_CHECK_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}")
    else
        echo "tests: pytest-xdist is missing, running serially" | tee -a "$OUTDIR/steps.txt"
    fi
    OUTCOMES="$OUTDIR/tests-outcomes.jsonl"
    : >"$OUTCOMES"
    # shellcheck disable=SC2086  # GPU_CHECK_TESTS may name several paths
    step tests "$(limit tests 200)" env GPU_CHECK_OUTCOMES="$OUTCOMES" "${PYTEST[@]}" \
        ${PARALLEL[@]+"${PARALLEL[@]}"} -p bench._test_outcomes --durations=15 --junitxml="$OUTDIR/tests.xml" \
        ${GPU_CHECK_TESTS:-tests --ignore=tests/test_static.py}
    if grep -q '"outcome": "failed"' "$OUTCOMES"; then
        RERUN=$(limit tests_rerun 60)
        step tests_rerun "$RERUN" "$PY" -m bench._test_outcomes "$OUTCOMES" "$OUTDIR/tests-failed.txt" \
            --budget $((RERUN - 10)) -p no:cacheprovider -rfE
    fi
fi

# --- (b) the quick benchmarks: kernels, then the whole model and generation --------------------
MODEL_BENCH=(bench/test_generation.py bench/test_model.py)
BENCH_JSON=() MODEL_JSON=()  # pytest-benchmark's JSON needs timings: a dry run's cases have none
if [ "$CUDA" = 1 ]; then
    BENCH_JSON=(--benchmark-json "$OUTDIR/bench.json") MODEL_JSON=(--benchmark-json "$OUTDIR/bench_model.json")
fi
if wanted bench; then
    step bench "$(limit bench 105)" "${PYTEST[@]}" bench --benchmark-only --quick \
        "${MODEL_BENCH[@]/#/--ignore=}" --results-dir "$OUTDIR/results" ${BENCH_JSON[@]+"${BENCH_JSON[@]}"}
fi
if wanted bench_model; then
    step bench_model "$(limit bench_model 300)" "${PYTEST[@]}" "${MODEL_BENCH[@]}" --benchmark-only \
        --quick --results-dir "$OUTDIR/results-model" ${MODEL_JSON[@]+"${MODEL_JSON[@]}"}
fi

# --- (c) a short profile ----------------------------------------------------------------------
if wanted profile; then
    if [ "$CUDA" = 1 ]; then
        DEFAULT_PROFILE="--config 124M --batch 8 --mode train --kernels triton --dtype bf16 --active 2"
    else
        DEFAULT_PROFILE="--config tiny --batch 1 --seq-len 32 --mode forward --kernels torch --device cpu"
    fi
    # shellcheck disable=SC2086
    step profile "$(limit profile 35)" "$PY" -m gptfast profile ${GPU_CHECK_PROFILE_ARGS:-$DEFAULT_PROFILE} \
        --out "$OUTDIR/profile"
fi

# --- (d) compute-sanitizer: memory errors and shared-memory races in small kernel tests ---------
# Small shapes, odd lengths, dropout (both dK/dV plans), ragged decode lengths and wide
# LayerNorm rows: every kernel and its masked edges, at sizes the tools check in seconds (the
# kernels are compiled already). Without PyTorch's caching allocator each tensor is an
# allocation of its own, so memcheck sees an access past its end.
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
for tool in memcheck racecheck; do
    if ! wanted "$tool"; then
        continue
    elif ! command -v compute-sanitizer >/dev/null 2>&1; then
        echo "$tool: skipped, compute-sanitizer is not on the PATH" | tee -a "$OUTDIR/steps.txt"
    elif [ "$CUDA" = 0 ]; then
        echo "$tool: skipped, no CUDA device" | tee -a "$OUTDIR/steps.txt"
    else
        step "$tool" "$(limit "$tool" "$([ "$tool" = memcheck ] && echo 35 || echo 90)")" \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
            --target-processes all --error-exitcode 1 "${PYTEST[@]}" "${SANITIZER_TESTS[@]}"
        echo "$tool: $(sanitizer_errors "$OUTDIR/$tool.log") errors" | tee -a "$OUTDIR/steps.txt"
    fi
done

# --- (e) the per-device tuning table (bench/tune.py), on request ---------------------------------
# Sweeps the tunable launch configs at GPT-2 shapes (agreement-checked); no new shape class past
# 3/4 of the timeout, and the table is rewritten after each class. On CPU: a dry run.
if wanted tune; then
    TUNE_TIMEOUT=$(limit tune 120)
    if [ "$CUDA" = 1 ]; then
        step tune "$TUNE_TIMEOUT" "$PY" -m bench.tune --out-dir "$OUTDIR/configs" --budget $((TUNE_TIMEOUT * 3 / 4))
    else
        step tune "$TUNE_TIMEOUT" env TRITON_INTERPRET=1 "$PY" -m bench.tune --dry-run --out-dir "$OUTDIR/configs"
    fi
fi

# --- verdict and bundle -----------------------------------------------------------------------
echo "--- results in $OUTDIR"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED steps: ${FAILED[*]}" | tee -a "$OUTDIR/steps.txt"
    RC=1
elif [ "$CUDA" = 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "all steps passed, but there was NO CUDA DEVICE: no GPU check was done" | tee -a "$OUTDIR/steps.txt"
    RC=3
else
    echo "all steps passed" | tee -a "$OUTDIR/steps.txt"
    RC=0
fi
if [ -n "${GPU_CHECK_BUNDLE:-}" ]; then
    mkdir -p "$GPU_CHECK_BUNDLE"
    for pair in steps.txt:steps.txt env.txt:env.txt tests-failed.txt:tests-failed.txt \
                results/quick.md:kernels-quick.md results-model/quick.md:model-quick.md \
                profile.log:profile.log; do
        if [ -f "$OUTDIR/${pair%%:*}" ]; then cp "$OUTDIR/${pair%%:*}" "$GPU_CHECK_BUNDLE/${pair##*:}"; fi
    done
    tar czf "$GPU_CHECK_BUNDLE/gpu_check.tgz" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"
    echo "bundle: $(ls "$GPU_CHECK_BUNDLE" | tr '\n' ' ')"
fi
exit $RC
