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

# the whole suite, then the C++ CPU kernels' op and fuzz tests again under ASan + UBSan
test: build
	$(VPY) -m pytest -q --durations=15 tests
	$(MAKE) sanitize

bench: build
	$(VPY) -m bench
	$(VPY) -m bench.convert_cases

# The C++ CPU kernels under AddressSanitizer + UBSan, in a separate build tree.
sanitize: $(STAMP)
	bash tests/run_sanitized.sh

clean:
	rm -rf build fastattn/_C*.so $(BUILT)
