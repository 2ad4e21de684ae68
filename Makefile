# The two README commands: `make run` (set up + main job) and `make test` (set up + test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; override (e.g. TORCH_SPEC="torch>=2.6") on machines with a GPU build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test setup dev lint typecheck unit soak bench records clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

dev: $(VENV)/.dev-installed

run: setup
	$(BIN)/fedexperts run --overwrite

lint: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: dev
	$(BIN)/mypy

unit: dev
	$(BIN)/python -m pytest

test: lint typecheck unit

# Long runs on real processes (Flower deployments killed and resumed, churn): not in `make test`.
soak: dev
	$(BIN)/python -m pytest -m soak -s

bench: dev
	$(BIN)/python -m benchmarks

# Keep the studies' run records (each run's metrics.jsonl and config.toml, ~16 KB) under docs/results, so
# `fedexperts claims docs/results` and `fedexperts compare --study NAME --out docs/results/NAME` rebuild the
# tables in docs/RESULTS.md from the repository (finished runs are read, never rerun).
STUDIES ?= studies
records:
	cd $(STUDIES) && find . \( -path './*/*/seed-*/metrics.jsonl' -o -path './*/*/seed-*/config.toml' \) \
		-exec cp --parents {} $(CURDIR)/docs/results/ \;

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
