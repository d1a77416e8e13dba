# yochameleon — two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements-lock.txt
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= disabled

.PHONY: setup demo test test-slow test-gpu lint format bench clean

setup: $(VENV)/.installed

# The lock file pins every package to versions that install from this machine's local wheels
# (torch 2.14.1 / torchvision 0.29.1); pyproject.toml keeps loose ranges for users.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m yochameleon.demo --out outputs/demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/yochameleon bench train --model tiny --json outputs/bench_train.json

clean:
	rm -rf outputs .pytest_cache .ruff_cache
