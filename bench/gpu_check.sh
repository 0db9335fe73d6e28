#!/usr/bin/env bash
# Build, test and benchmark fastinf's GPU kernels in ONE call of at most 8 minutes on a fresh GPU machine.
#
#   bash bench/gpu_check.sh                 # all stages: env, build, test, bench, summary
#   bash bench/gpu_check.sh build test      # some stages only
#   bash bench/gpu_check.sh build sweep     # Triton block-size sweep (tuning; not in the default run)
#
# Runs with the machine's system python3 (torch 2.11 + CUDA 13.0, triton 3.6; no venv, no internet, no
# diffusers): the checkout is used through PYTHONPATH, nothing is installed. Every stage has a time limit; the
# limits add up to 455 s with their kill grace (ENV 10 + BUILD 140 + TEST 120 + BENCH 160 + SUMMARY 10, plus
# 3 s each), 470 s with the arch probe (at most 15 s), under the 480 s of the call. Everything goes to $OUT (else bench/results/gpu_check/) as it is
# produced (tee, unbuffered python, the CSV row by row), at most 8 files (what the device tool brings back):
#   env.txt        GPU, driver, versions, the arch the build targets, whether pytest-xdist is there
#   build.log      the JIT build of csrc/ (torch.utils.cpp_extension + ninja), with its time
#   test.log       pytest tests/ops (-n workers with pytest-xdist; serially otherwise, GPU tier first);
#                  FASTINF_REQUIRE_BACKENDS=cuda,triton turns a missing backend (a failed build) into a failure
#   junit.xml      the same tests, per test case
#   bench.log      bench/bench_ops.py output (traffic model and goals beside every measurement)
#   bench_ops.csv  the benchmark rows (commit it as bench/results/gpu/bench_ops.csv)
#   summary.txt    one line per stage: status and seconds, then the summary table
# The exit status is non-zero if any stage failed (a failed build fails the check). The last thing printed is
# the summary table: op, dtype, shape, backend, ms, % of roofline, speed-up vs the bf16 unfused baseline.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FASTINF_CACHE="${FASTINF_CACHE:-/tmp/fastinf-cache}" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
STAGES="${*:-env build test bench summary}"
ENV_LIMIT="${ENV_LIMIT:-10}" BUILD_LIMIT="${BUILD_LIMIT:-140}" TEST_LIMIT="${TEST_LIMIT:-120}"
BENCH_LIMIT="${BENCH_LIMIT:-160}" SUMMARY_LIMIT="${SUMMARY_LIMIT:-10}" SWEEP_LIMIT="${SWEEP_LIMIT:-300}"
KILL_AFTER=3
status=0
: >"$OUT_DIR/summary.txt"

# the arch to build for: this GPU's only (a build for every arch torch knows would not fit the budget)
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$(timeout 15 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  [ -n "$cap" ] && export TORCH_CUDA_ARCH_LIST="$cap"
fi
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=1; else XDIST=0; fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PT_TIMEOUT="--timeout=60"; else PT_TIMEOUT=""; fi

export PY OUT_DIR XDIST PT_TIMEOUT

stage() {  # stage NAME LIMIT LOG CMD...   (LOG is appended to)
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s) ===" | tee -a "$OUT_DIR/$log" >&2
  timeout --kill-after=$KILL_AFTER "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$log"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT_DIR/summary.txt" >&2
  [ "$rc" -eq 0 ] || status=1
  return 0
}

# pytest tests/ops: -n workers with pytest-xdist, else serially with the GPU tier first. The nvcc compile check is
# left out here (the build stage compiles the same sources for this GPU); a backend that cannot load fails.
TEST_SCRIPT='
common=(-q -rs -p no:cacheprovider --durations=10 --junitxml="$OUT_DIR/junit.xml" $PT_TIMEOUT
        -k "not test_cu_compiles and not test_compile_check_catches_errors")
export FASTINF_REQUIRE_BACKENDS="${FASTINF_REQUIRE_BACKENDS:-cuda,triton}"
if [ "$XDIST" = 1 ]; then
  exec "$PY" -m pytest "${common[@]}" -n "${TEST_WORKERS:-12}" tests/ops
fi
echo "# pytest-xdist is not installed: running serially, the GPU tier first"
exec "$PY" -m pytest "${common[@]}" tests/ops/test_gpu.py tests/ops/test_trace_cov_gpu.py tests/ops/test_numerics.py \
  tests/ops/test_ops_reference.py tests/ops/test_kernels_interp.py tests/ops/test_trace_cov_interp.py \
  tests/ops/test_cuda_compile.py
'

ENV_SCRIPT='
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
nvcc --version | tail -2 || true
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS xdist=$XDIST ninja=$(command -v ninja)"
"$PY" -c "
import sys, torch, triton
p = torch.cuda.get_device_properties(0)
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(\"device\", p.name, torch.cuda.get_device_capability(), p.multi_processor_count, \"SMs\")
"
git log -1 --oneline 2>/dev/null || true
'

for s in $STAGES; do
  case "$s" in
    env)
      stage env "$ENV_LIMIT" env.txt bash -c "$ENV_SCRIPT"
      ;;
    build)
      stage build "$BUILD_LIMIT" build.log "$PY" -c "
import logging, time
logging.basicConfig(level=logging.INFO)
from fastinf._ext import build
t = time.perf_counter()
m = build.load(verbose=True)
print('built', m.__name__, 'in %.1f s' % (time.perf_counter() - t), 'at', build.build_dir())
import fastinf.ops as ops
print(ops.backends())
"
      ;;
    test)
      stage test "$TEST_LIMIT" test.log bash -c "$TEST_SCRIPT"
      ;;
    bench)
      stage bench "$BENCH_LIMIT" bench.log "$PY" bench/bench_ops.py --dtypes bfloat16,float32 --budget 0.15 \
        --min-reps 3 --warmup 2 --out "$OUT_DIR/bench_ops.csv"
      ;;
    sweep)
      stage sweep "$SWEEP_LIMIT" bench.log "$PY" bench/bench_ops.py --sweep --budget 0.3 --min-reps 3 \
        --out "$OUT_DIR/bench_ops_sweep.csv"
      ;;
    summary)  # the stages, then the table: the last thing printed
      echo "# stages"
      cat "$OUT_DIR/summary.txt"
      if [ -f "$OUT_DIR/bench_ops.csv" ]; then
        timeout --kill-after=$KILL_AFTER "$SUMMARY_LIMIT" "$PY" bench/bench_ops.py --summary "$OUT_DIR/bench_ops.csv" \
          2>&1 | tee -a "$OUT_DIR/summary.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1  # a crash of the table fails the check too
      else
        echo "# no bench_ops.csv: no summary table" | tee -a "$OUT_DIR/summary.txt"
      fi
      ;;
    *)
      echo "unknown stage $s (env, build, test, bench, summary, sweep)" >&2
      status=2
      ;;
  esac
done
exit $status
