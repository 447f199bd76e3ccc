# One entry point for the usual jobs. `make test` works on a machine with nothing but Python 3.11+.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint serve bench-model clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

serve: $(STAMP)
	$(BIN)/hytrec serve

bench-model: $(STAMP)
	$(BIN)/hytrec bench model --plot docs/benchmarks/model.png --markdown docs/benchmarks/model.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
