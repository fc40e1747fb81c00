#!/usr/bin/env bash
# One command for a lent GPU machine (torch 2.11, Triton 3.6, pytest-xdist and pytest-timeout there,
# no network): build fastattn against the machine's torch, run the GPU tests, run the
# default benchmark on the GPU, and leave logs + JSON + plots in $OUT (default:
# bench/results/gpu-run).
#
# Sized for one device call (at most 600 s) inside a session's 15 minutes of device time, the
# machine's start included: build <= 180 s, GPU tests <= 220 s, benchmark <= 180 s (its cases hurry
# to meet --deadline; a killed run still leaves its .partial.json). At most 8 files come back: gpu.txt,
# build.log, pytest-gpu.log, bench.log, and the benchmark's JSON, table and two plots.
#   bash bench/gpu_session.sh                          # everything, e.g. run(command=..., timeout_s=600)
#   STEPS="build test" bash bench/gpu_session.sh       # a part
#   BENCH_ARGS="--full" BENCH_TIME=540 STEPS="build bench" bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
STEPS=${STEPS:-"build test bench"}
BENCH_TIME=${BENCH_TIME:-180}
BENCH_ARGS=${BENCH_ARGS:-"--deadline $((BENCH_TIME - 60))"}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTATTN_CUDA_ARCH_LIST=${FASTATTN_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
# several test processes share the GPU when pytest-xdist is there (the kernels' tests are many and small)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120" || echo "")
for step in $STEPS; do
  start=$SECONDS
  case $step in
    build) timeout 180 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
             || { tail -50 "$OUT/build.log"; exit 1; } ;;
    # the tests whose ids name the GPU backends (1601 of 2914 today; most are skipped without a GPU)
    test)  timeout 220 $PY -m pytest -q $XDIST $PER_TEST --maxfail=50 -rfE -p no:cacheprovider tests \
             -k "cuda or triton or gpu" > "$OUT/pytest-gpu.log" 2>&1; tail -15 "$OUT/pytest-gpu.log" ;;
    bench) timeout "$BENCH_TIME" $PY -m bench --device cuda $BENCH_ARGS --out "$OUT" > "$OUT/bench.log" 2>&1
           tail -40 "$OUT/bench.log" ;;
    *) echo "unknown step $step (build, test, bench)"; exit 2 ;;
  esac
  echo "step $step: $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
done
