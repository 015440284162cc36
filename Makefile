# Everything a developer or CI runs. `make demo` and `make test` create the
# virtual environment they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-unit lint bench soak clean

$(BIN)/adpa: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,flower]'
	touch $@

install: $(BIN)/adpa

## The whole system once, on the embedded default (SQLite + filesystem broker).
demo: install
	$(BIN)/adpa demo --embedded

## Every test: unit, integration (PostgreSQL + Redis), end to end.
test: install
	$(BIN)/pytest

## Tests that need no server.
test-unit: install
	$(BIN)/pytest tests/unit

## Ratios against a baseline measured in the same run (needs PostgreSQL + Redis).
bench: install
	$(BIN)/python scripts/bench.py

## Thousands of jobs while workers are killed and Redis restarts (minutes).
soak: install
	$(BIN)/python scripts/soak.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf .adpa .pytest_cache .mypy_cache .ruff_cache
