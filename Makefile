# Entry points for a fresh machine with Python >= 3.11: `make demo`, `make test` and `make test-students`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-students install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"

demo: install
	$(BIN)/mtt-lab quickstart --out runs/quickstart

test: install
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not students" --durations=20

# every notebook's student version run top to bottom, its checks failing politely (as long again as the notebooks)
test-students: install
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m students --durations=8
