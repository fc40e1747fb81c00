#!/usr/bin/env bash
# One command for a lent GPU machine (torch 2.11, no network): build fastattn
# against the machine's torch, run the GPU test suite, run the full benchmark,
# and leave logs + JSON + plots in $OUT (default: bench/results/gpu-run).
#   bash bench/gpu_session.sh            # everything
#   STEPS="build test" bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
STEPS=${STEPS:-"build test bench"}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTATTN_CUDA_ARCH_LIST=${FASTATTN_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
for step in $STEPS; do
  case $step in
    build) timeout 300 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
             || { tail -50 "$OUT/build.log"; exit 1; } ;;
    test)  timeout 300 $PY -m pytest -q -x --timeout=120 -p no:cacheprovider tests \
             -k "cuda or triton or gpu" > "$OUT/pytest-gpu.log" 2>&1; tail -5 "$OUT/pytest-gpu.log" ;;
    bench) timeout 420 $PY -m bench --device cuda --full --out "$OUT" > "$OUT/bench.log" 2>&1; tail -40 "$OUT/bench.log" ;;
  esac
done
