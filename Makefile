# moelab: the two commands a new user needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test lint format demo compare bench clean

setup: $(STAMP)

# torch is pinned and installed first (an unpinned torch pulls a multi-GB CUDA build); a torch that
# is already in the venv (e.g. a CUDA build a GPU user installed) is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q numpy
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

test: setup lint
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/python -m moelab.demo

# the matched architecture comparison (configs/compare/, docs/ARCHITECTURES.md): ~30 min on 2 CPU cores
compare: setup
	$(BIN)/python -m moelab.compare

bench: setup
	$(BIN)/python benchmarks/moe_layer.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
