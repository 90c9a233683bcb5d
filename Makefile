# `make demo` and `make test` do all setup on a fresh machine (a venv in .venv), then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint bench
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python hybrid_trainer.py configs/demo.json

test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench.py --model smollm2-135m-instruct
