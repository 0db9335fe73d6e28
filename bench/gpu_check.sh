#!/usr/bin/env bash
# Build, test and benchmark fastinf's GPU kernels in one run on a fresh GPU machine.
#
#   bash bench/gpu_check.sh                 # all stages: env, build, test, bench
#   bash bench/gpu_check.sh build test      # some stages only
#   bash bench/gpu_check.sh build sweep     # Triton block-size sweep (tuning; not in the default run)
#
# Run from anywhere; it works in the repository root. Needs python3 with torch (CUDA), triton, pytest,
# ninja and nvcc on the machine (no pip install: the checkout is used through PYTHONPATH). Results go to
# $OUT if set (the device tool copies that folder back), else to bench/results/gpu_check/:
#   env.txt        GPU, driver, torch / triton / CUDA versions
#   build.log      the JIT build of csrc/ (torch.utils.cpp_extension + ninja), with its time
#   test_gpu.log   pytest tests/ops (tier a, the GPU tier c, the nvcc compile check; tier b needs the
#                  CPU interpreter and is skipped here)
#   bench.log      bench/bench_ops.py output (ends with the issue's speed goals)
#   bench_ops.csv  the benchmark rows (copy it to bench/results/bench_ops.csv and commit it)
#   sweep.log, bench_ops_sweep.csv   (stage sweep only)
#   summary.txt    one line per stage: status and seconds
# Each stage has a time limit (seconds: BUILD_LIMIT, TEST_LIMIT, BENCH_LIMIT) so that the whole run fits
# in 10 minutes and every log comes back; the exit status is non-zero if any stage failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
export FASTINF_CACHE="${FASTINF_CACHE:-/tmp/fastinf-cache}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
STAGES="${*:-env build test bench}"
BUILD_LIMIT="${BUILD_LIMIT:-240}" TEST_LIMIT="${TEST_LIMIT:-240}" BENCH_LIMIT="${BENCH_LIMIT:-300}"
SWEEP_LIMIT="${SWEEP_LIMIT:-300}"
status=0
: >"$OUT_DIR/summary.txt"

stage() {  # stage NAME LIMIT LOG CMD...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s) ===" >&2
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT_DIR/summary.txt" >&2
  [ "$rc" -eq 0 ] || status=1
}

for s in $STAGES; do
  case "$s" in
    env)
      {
        date -u
        nvidia-smi || true
        nvcc --version || true
        "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
        git log -1 --oneline 2>/dev/null || true
      } >"$OUT_DIR/env.txt" 2>&1
      cat "$OUT_DIR/env.txt" >&2
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
      stage test "$TEST_LIMIT" test_gpu.log "$PY" -m pytest -q -rs tests/ops --durations=15
      ;;
    bench)
      stage bench "$BENCH_LIMIT" bench.log "$PY" bench/bench_ops.py --budget 0.3 --min-reps 3 --out "$OUT_DIR/bench_ops.csv"
      ;;
    sweep)
      stage sweep "$SWEEP_LIMIT" sweep.log "$PY" bench/bench_ops.py --sweep --budget 0.3 --min-reps 3 \
        --out "$OUT_DIR/bench_ops_sweep.csv"
      ;;
    *)
      echo "unknown stage $s (env, build, test, bench, sweep)" >&2
      status=2
      ;;
  esac
done
cat "$OUT_DIR/summary.txt" >&2
exit $status
