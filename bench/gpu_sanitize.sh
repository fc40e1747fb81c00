#!/usr/bin/env bash
# fastattn's GPU kernels under NVIDIA's compute-sanitizer, for a lent GPU machine, after
# bench/gpu_session.sh's build step (fastattn._C built against the machine's torch):
#   memcheck                        every CUDA kernel and the Triton kernels (and the PyTorch kernels
#                                   around them): out-of-bounds and misaligned accesses, faults
#   racecheck, synccheck            the CUDA kernels (namespace fastattn): shared-memory hazards,
#                                   invalid barriers
#   initcheck                       reads of uninitialised global memory, by any kernel of a run of
#                                   the CUDA backend (a hit in a PyTorch, cuBLAS or cuDNN kernel
#                                   names that kernel in the log)
# each once with FASTATTN_UNVERIFIED_KERNELS unset and once with it =1 (the kernel variants not yet
# verified on a GPU, fastattn/_verified.py). bench/gpu_sanitize_driver.py calls every op forward and
# backward once on small shapes per dtype and layout, and checks the results loosely.
#
# Sized for ~150 s (SANITIZE_TIME) of one ten-minute device call, beside the build, the GPU tests and
# the benchmark: runs go in the order above, memcheck first; each is killed when the budget is spent,
# and a run that would start with under 20 s left is skipped and says so. (Not yet run on a GPU: how
# many of the eight runs fit in 150 s is to be seen; TOOLS and SANITIZE_TIME choose.) Writes two files to
# $OUT (default bench/results/gpu-run): sanitize.txt (one line per run: tool, variant, exit code,
# error count, the driver's verdict, seconds) and sanitize.log (the sanitizer's and driver's output).
# Exit status 0 only when every run that ran had 0 errors and the driver passed.
#   bash bench/gpu_sanitize.sh
#   SANITIZE_TIME=300 TOOLS="memcheck racecheck" bash bench/gpu_sanitize.sh
# Overrides: PY (python), COMPUTE_SANITIZER (the binary), DRIVER (the command the sanitizer runs).
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
PY=${PY:-python3}
SANITIZE_TIME=${SANITIZE_TIME:-150}
TOOLS=${TOOLS:-"memcheck racecheck synccheck initcheck"}
DRIVER=${DRIVER:-"$PY bench/gpu_sanitize_driver.py --device cuda"}
SUMMARY=$OUT/sanitize.txt
LOG=$OUT/sanitize.log
: > "$SUMMARY"
: > "$LOG"

find_sanitizer() {
  local candidate
  for candidate in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
      "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
      $(ls -d /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -V -r) \
      $($PY -c "import glob, site; print(' '.join(sorted(glob.glob(site.getsitepackages()[0] + '/nvidia/*/bin/compute-sanitizer'))))" 2>/dev/null); do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}
SANITIZER=$(find_sanitizer) || {
  echo "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*, pip's nvidia packages); set COMPUTE_SANITIZER" \
    | tee -a "$SUMMARY"
  exit 3
}
echo "sanitizer: $SANITIZER ($("$SANITIZER" --version 2>&1 | grep -m1 -i version))" | tee -a "$SUMMARY"

# every tensor its own cudaMalloc, so that memcheck sees a read past a tensor's end instead of
# landing in the caching allocator's slack; one Triton config per kernel, not every candidate
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASTATTN_TRITON_AUTOTUNE=0 PYTHONUNBUFFERED=1
# the CUDA kernels live in namespace fastattn; Triton's are named _<op>_kernel (only memcheck runs them)
if "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name "; then
  CUDA_ONLY=(--kernel-name kns=fastattn)
else
  CUDA_ONLY=()
fi

status=0
start=$SECONDS
for tool in $TOOLS; do
  for unverified in 0 1; do
    left=$((SANITIZE_TIME - (SECONDS - start)))
    variant=$([ "$unverified" = 1 ] && echo "FASTATTN_UNVERIFIED_KERNELS=1" || echo "verified kernels")
    if [ "$left" -lt 20 ]; then
      echo "$tool | $variant | skipped: out of time (SANITIZE_TIME=$SANITIZE_TIME)" | tee -a "$SUMMARY"
      status=1
      continue
    fi
    case $tool in
      memcheck) flags=(--tool memcheck); backends=cuda,triton ;;
      racecheck|synccheck) flags=(--tool "$tool" "${CUDA_ONLY[@]}"); backends=cuda ;;
      # unfiltered: initcheck must see the writes of PyTorch's kernels that fill our kernels' inputs
      initcheck) flags=(--tool initcheck); backends=cuda ;;
      *) echo "unknown tool $tool (memcheck, racecheck, synccheck, initcheck)"; exit 2 ;;
    esac
    echo "=== $tool, $variant, backends $backends" >> "$LOG"
    t0=$SECONDS
    env $([ "$unverified" = 1 ] && echo FASTATTN_UNVERIFIED_KERNELS=1) \
      timeout "$left" "$SANITIZER" "${flags[@]}" --error-exitcode 99 --print-limit 20 \
      $DRIVER --backends "$backends" > "$OUT/.sanitize-run.log" 2>&1
    rc=$?
    cat "$OUT/.sanitize-run.log" >> "$LOG"
    errors=$(grep -o "ERROR SUMMARY: [0-9]* error" "$OUT/.sanitize-run.log" | tail -1 | grep -o "[0-9]*")
    driver=$(grep "^driver: .* cases" "$OUT/.sanitize-run.log" | tail -1)
    rm -f "$OUT/.sanitize-run.log"
    [ "$rc" = 124 ] && driver="timed out after ${left} s; ${driver:-the driver did not finish}"
    echo "$tool | $variant | rc $rc | ${errors:-?} errors | ${driver:-no driver summary} | $((SECONDS - t0)) s" \
      | tee -a "$SUMMARY"
    [ "$rc" = 0 ] && [ "${errors:-x}" = 0 ] || status=1
  done
done
echo "sanitize: $((SECONDS - start)) s, $([ $status = 0 ] && echo "clean" || echo "NOT clean: see $LOG")" | tee -a "$SUMMARY"
exit $status
