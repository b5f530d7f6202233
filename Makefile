# `make test` and `make demo` create (or reuse) the virtual environment, install, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-all demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt $(wildcard requirements-reference.txt)
	@# diffusers 0.42, transformers 5 and numpy 2.4 need Python >= 3.11; pip would only say it finds no matching version.
	test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON) is older than 3.11: run with PYTHON=python3.11 (or newer)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# Reference implementations used only by tests; installed without their (outdated) pins.
	if [ -f requirements-reference.txt ]; then $(PY) -m pip install -q --no-deps -r requirements-reference.txt && $(PY) tests/install_reference_fixups.py; fi
	touch $@

install: $(VENV)/.installed

# pytest exits non-zero (5) when it collects no test, so an empty run fails here too. The tests run one torch thread
# each (tests/conftest.py), so TEST_WORKERS pytest workers (pytest-xdist; one test file per worker at a time, so a
# file's model fixtures are built once) use the cores; TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# The slow-marked tests (CI runs them; 6-7 min in all on 2 cores, measured by .ci/run): real-size SDXL wiring (one
# bf16 LoRA step of each script; ~16 GB RAM and ~6.5 GB of /tmp), 20 default steps of each script raising a pixel
# reward end to end, and the two-process runs of the SD3 and FLUX twins and their resume checks.
test-slow: install
	$(PY) -m pytest -q -s -m slow tests

test-all: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
