#!/usr/bin/env bash
# `make sanitize`: the C++ CPU kernels built with AddressSanitizer + UBSan in a
# separate tree (the installed build is never touched), then the CPU op tests and
# the fuzz tests run against that build with libasan preloaded into Python.
#   PY                      the Python to use (default: .venv/bin/python of this checkout)
#   FASTATTN_SANITIZE_DIR   where the copy and its build live (default: $TMPDIR/fastattn-sanitize);
#                           kept between runs so a rebuild only recompiles changed files
#   SANITIZE_PHASE          build | test | all (default all)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
work=${FASTATTN_SANITIZE_DIR:-${TMPDIR:-/tmp}/fastattn-sanitize}
phase=${SANITIZE_PHASE:-all}
src=$work/src
start=$(date +%s)

if [ "$phase" != test ]; then
    mkdir -p "$src" "$work/build"
    # tracked and new (not ignored) files only: no .venv, no installed _C*.so; tar keeps mtimes,
    # so the build below recompiles only what changed
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -e "$1" && printf "%s\0" "$1"' _ {} \
        | tar --null -T - -cf -) | (cd "$src" && tar -xf -)
    echo "== building the sanitized CPU kernels in $src"
    (cd "$src" && FASTATTN_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace \
        --build-temp "$work/build")
    echo "== build took $(( $(date +%s) - start )) s"
fi

if [ "$phase" != build ]; then
    libasan=$(gcc -print-file-name=libasan.so)
    libstdcxx=$(gcc -print-file-name=libstdc++.so)
    [ -e "$libasan" ] || { echo "libasan.so not found (gcc -print-file-name gave $libasan)"; exit 1; }
    cd "$src"
    # libstdc++ preloaded too: ASan's __cxa_throw interceptor needs the real one at start-up, or the
    # first C++ exception thrown by an extension (triton's pybind11 imports) aborts the process
    export PYTHONPATH=$src LD_PRELOAD="$libasan $libstdcxx"
    # CPython and torch keep allocations until exit by design: leak reports would be noise
    export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
    export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
    # the tests must load the sanitized library, not the installed one
    "$PY" -c "import fastattn._ext as e, sys; f = e._C.__file__; print('fastattn._C:', f); \
sys.exit(0 if f.startswith('$src/') else 'the sanitized fastattn._C was not loaded')"
    t0=$(date +%s)
    # Triton's kernels are not C++: their cases would only run the interpreter slowly under ASan
    "$PY" -m pytest -q -p no:cacheprovider -k "not triton" \
        tests/test_cpu_cbam_ops.py tests/test_cpu_attention_ops.py tests/test_attention_op_cases.py \
        tests/test_cbam_op_cases.py tests/test_fuzz.py
    # the one-op inference forward is checked through the module (its weights come from there)
    "$PY" -m pytest -q -p no:cacheprovider -k "cpu_inference" tests/test_cbam_modules.py
    echo "== sanitized tests took $(( $(date +%s) - t0 )) s"
fi
echo "== make sanitize took $(( $(date +%s) - start )) s"
