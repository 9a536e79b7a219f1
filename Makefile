# One entry point for a fresh machine that has python3, pip, make and gcc.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8001
METRICS_PORT ?= 8002
MODELS ?= models

.PHONY: install gen models serve test test-deps lint unit integration clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Regenerates gen/ from protos/ (the committed copy must match: tests/unit/test_generated_code.py).
gen: $(STAMP)
	$(PY) scripts/generate_protos.py

models: $(STAMP)
	$(PY) -m server.demo_models --out $(MODELS)

serve: gen models
	$(VENV)/bin/inferd serve --model-repository $(MODELS) --host $(HOST) --port $(PORT) \
		--metrics-port $(METRICS_PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy server/core

test-deps:
	scripts/install_test_deps.sh

test: lint test-deps
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .mypy_cache .ruff_cache
