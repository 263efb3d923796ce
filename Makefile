PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_FLAGS := -c constraints.txt
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: run test test-all lint format venv clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FLAGS) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/pl-federated fit --config configs/quickstart.yaml

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m ""

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) lightning_logs wandb
