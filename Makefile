# Two commands on a fresh machine: `make demo` and `make test`. Everything else they need,
# they install into .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test check lint typecheck bench bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/expense_demo.py

lint: install
	$(BIN)/ruff check waystation tests examples $(wildcard benchmarks)
	$(BIN)/ruff format --check waystation tests examples $(wildcard benchmarks)

typecheck: install
	$(BIN)/mypy --strict waystation

check: lint typecheck

test: check
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/throughput.py

# The peers (DBOS, LangGraph) go into a venv of their own so they never touch .venv.
PEERS := .venv-bench
$(PEERS)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet -e '.[bench]'
	touch $@

bench-peers: install $(PEERS)/.installed
	$(BIN)/python benchmarks/throughput.py --peers $(PEERS)/bin/python

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
