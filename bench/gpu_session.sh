#!/usr/bin/env bash
# One command for a lent GPU machine (torch 2.11, Triton 3.6, pytest-xdist and pytest-timeout there,
# no network): build fastattn against the machine's torch, run the GPU tests twice (the verified
# kernels, then with FASTATTN_UNVERIFIED_KERNELS=1: the new kernel variants of fastattn/_verified.py),
# run bench/gpu_sanitize.sh if it exists, and benchmark the verified and unverified kernels side by
# side against SDPA (as users call it, and each SDPA kernel forced), FlashAttention-2 where installed,
# eager and timm. Logs, JSON and plots are written to $LOGDIR (default: build/gpu-session) and packed
# at the end into $OUT/gpu-session.tar.gz beside $OUT/gpu.txt: the device tool brings back at most 8
# files from $OUT, and a session writes more than that. Unpack the archive under bench/results/<device>/.
#
# Time plan, sized for one device call (at most 600 s) inside a session's 15 minutes of device time
# (the machine's start, a few minutes, comes on top and is not in this call). Each step has its own
# time-out, cut to what is left of TOTAL (580 s); a step that would get under 20 s is skipped:
#   info             ~5 s   nvidia-smi, versions                                       -> gpu.txt
#   build           140 s   pip install -e . for this GPU's arch only                   -> build.log
#   test            110 s   tests whose ids name cuda/triton/gpu, verified kernels      -> pytest-gpu.log
#   test-unverified  80 s   the attention tests of cuda/triton, unverified kernels on   -> pytest-gpu-unverified.log
#   sanitize        110 s   bench/gpu_sanitize.sh if present (else skipped)            -> sanitize.log
#   bench           110 s   the GPU targets + CBAM 8x256x56x56 float16, --unverified    -> bench.log + JSON, .md, 2 PNG
# Two files land in $OUT, gpu.txt and gpu-session.tar.gz (packed also when a step fails; a benchmark
# killed by its time-out leaves a .partial.json). A timed-out pytest gets SIGINT first, so it still
# prints its summary.
#   bash bench/gpu_session.sh                         # everything: run(command=..., timeout_s=600)
#   DRY_RUN=1 bash bench/gpu_session.sh               # print the plan, run nothing
#   STEPS="build test" bash bench/gpu_session.sh      # a part
#   BENCH_ARGS="--full" BENCH_TIME=500 STEPS="build bench" bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
LOGDIR=${LOGDIR:-build/gpu-session}
STEPS=${STEPS:-"build test test-unverified sanitize bench"}
TOTAL=${TOTAL:-580}
BUILD_TIME=${BUILD_TIME:-140}
TEST_TIME=${TEST_TIME:-110}
UNVERIFIED_TIME=${UNVERIFIED_TIME:-80}
SANITIZE_TIME=${SANITIZE_TIME:-110}
BENCH_TIME=${BENCH_TIME:-110}
SANITIZER=${SANITIZER:-bench/gpu_sanitize.sh}
PY=${PY:-python3}
# the issue-14 targets and the main CBAM shape, new kernels beside old; compile and fastattn-reference left out
# (minutes of inductor compiles; the reference is the eager formula again)
BENCH_PROVIDERS=${BENCH_PROVIDERS:-"fastattn-cuda,fastattn-triton,fastattn-cuda-unverified,fastattn-triton-unverified,\
eager,sdpa,sdpa-flash,sdpa-efficient,sdpa-cudnn,sdpa-math,flash-attn,timm"}
BENCH_ARGS=${BENCH_ARGS:-"--only cbam,attention --dtype float16 --cases gpu-targets,8x256x56x56 --unverified \
--providers $BENCH_PROVIDERS --deadline $((BENCH_TIME - 50))"}
# the tests that exercise the unverified variants (attention kernels, fastattn/_verified.py)
UNVERIFIED_TESTS=${UNVERIFIED_TESTS:-"tests/test_attention_op_cases.py tests/test_cuda_attention_mma.py tests/test_cuda_attention_ops.py \
tests/test_triton_attention_ops.py tests/test_attention_functional.py"}
DRY_RUN=${DRY_RUN:-0}

if [ "$DRY_RUN" = 1 ]; then
  XDIST="-n 8"; PER_TEST="--timeout=120"; ARCH='$(compute capability)'
else
  mkdir -p "$OUT"
  rm -rf "$LOGDIR" && mkdir -p "$LOGDIR"
  # one archive of everything, however the session ends
  trap 'cp "$LOGDIR/gpu.txt" "$OUT/gpu.txt" 2>/dev/null; tar czf "$OUT/gpu-session.tar.gz" -C "$LOGDIR" .' EXIT
  export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  export FASTATTN_CUDA_ARCH_LIST=${FASTATTN_CUDA_ARCH_LIST:-${ARCH:-9.0}}
  { nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  } > "$LOGDIR/gpu.txt" 2>&1
  # several test processes share the GPU when pytest-xdist is there (the kernels' tests are many and small)
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120" || echo "")
fi
PYTEST="$PY -m pytest -q $XDIST $PER_TEST --maxfail=50 -rfE -p no:cacheprovider"

# step -> "seconds|log|command"
plan() {
  case $1 in
    build) echo "$BUILD_TIME|build.log|$PY -m pip install -q --no-build-isolation --no-deps -e ." ;;
    test) echo "$TEST_TIME|pytest-gpu.log|$PYTEST tests -k 'cuda or triton or gpu'" ;;
    test-unverified) echo "$UNVERIFIED_TIME|pytest-gpu-unverified.log|FASTATTN_UNVERIFIED_KERNELS=1 $PYTEST \
$UNVERIFIED_TESTS -k 'cuda or triton'" ;;
    sanitize) if [ -f "$SANITIZER" ]; then echo "$SANITIZE_TIME|sanitize-step.log|OUT=$LOGDIR SANITIZE_TIME=\$STEP_TIME bash $SANITIZER"
              else echo "0|-|skipped: $SANITIZER is absent"; fi ;;
    bench) echo "$BENCH_TIME|bench.log|$PY -m bench --device cuda $BENCH_ARGS --out $LOGDIR" ;;
    *) return 1 ;;
  esac
}

for step in $STEPS; do
  plan "$step" > /dev/null || { echo "unknown step $step (build, test, test-unverified, sanitize, bench)"; exit 2; }
done

if [ "$DRY_RUN" = 1 ]; then
  sum=0
  for step in $STEPS; do
    IFS='|' read -r secs log cmd <<< "$(plan "$step")"
    printf 'step %s: %s s -> %s: %s\n' "$step" "$secs" "$log" "$cmd"
    sum=$((sum + secs))
  done
  echo "total: $sum s of steps, TOTAL $TOTAL s, one device call of at most 600 s; output in $OUT"
  exit 0
fi

for step in $STEPS; do
  IFS='|' read -r secs log cmd <<< "$(plan "$step")"
  if [ "$log" = "-" ]; then
    echo "step $step: $cmd" | tee -a "$LOGDIR/gpu.txt"
    continue
  fi
  left=$((TOTAL - SECONDS))
  [ "$left" -lt 0 ] && left=0
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 20 ]; then
    echo "step $step: skipped, ${left} s left of $TOTAL" | tee -a "$LOGDIR/gpu.txt"
    continue
  fi
  start=$SECONDS
  # SIGINT first (pytest then prints its summary), SIGKILL 5 s later
  STEP_TIME=$((secs - 10)) timeout -s INT -k 5 "$secs" bash -c "$cmd" > "$LOGDIR/$log" 2>&1
  rc=$?
  echo "step $step: rc $rc, $((SECONDS - start)) s (limit $secs)" | tee -a "$LOGDIR/gpu.txt"
  tail -15 "$LOGDIR/$log"
  if [ "$step" = build ] && [ $rc -ne 0 ]; then
    tail -50 "$LOGDIR/$log"
    exit 1
  fi
done
