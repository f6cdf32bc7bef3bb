# Two commands do all the set-up on a fresh machine:
#   make demo   pretrain rotary / sinusoidal / learned on the built-in corpus and compare them
#   make test   install and run the test suite
PYTHON ?= python3
TORCH ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-fast lint demo bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The pinned torch goes in first: an open range with no torch installed pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: install
	$(BIN)/python -m roformer.cli demo --output_dir runs/demo

bench: install
	$(BIN)/python benchmarks/bench_model.py

# On a GPU machine whose python3 has torch, transformers and accelerate (no install, no download needed).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
