# The two commands of the README. Both do all set-up on a fresh clone.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-stamp
BUILT   := $(VENV)/.build-stamp
SOURCES := $(shell find csrc triton_kernels fastattn -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null) setup.py
export MAX_JOBS ?= 2
# torch.compile's cache (tests and bench) inside the clone, not in /tmp, so that it goes with the clone
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/build/inductor-cache

.PHONY: test bench setup build sanitize clean

setup: $(STAMP)
$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

build: $(BUILT)
$(BUILT): $(STAMP) $(SOURCES)
	$(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

# The whole suite and, beside it, `make sanitize` (the C++ CPU kernels built under ASan + UBSan, and their op
# and fuzz tests run again against that build) at nice 19: it runs on the CPU time the suite leaves idle
# instead of after it. Its log is printed after the suite's; the target fails if either fails.
# docs/testing.md: the time budget and where it goes.
test: build
	@mkdir -p build
	@nice -n 19 bash tests/run_sanitized.sh > build/sanitize.log 2>&1 & sanitize=$$!; \
	$(VPY) -m pytest -q --durations=15 tests; suite=$$?; \
	echo "== make sanitize (beside the suite; log: build/sanitize.log)"; \
	wait $$sanitize; sanitized=$$?; cat build/sanitize.log; \
	echo "== make test: suite rc $$suite, sanitize rc $$sanitized"; \
	[ $$suite -eq 0 ] && [ $$sanitized -eq 0 ]

bench: build
	$(VPY) -m bench
	$(VPY) -m bench.convert_cases

# The C++ CPU kernels under AddressSanitizer + UBSan, in a separate build tree.
sanitize: $(STAMP)
	bash tests/run_sanitized.sh

clean:
	rm -rf build fastattn/_C*.so $(BUILT)
