# One entry point for a fresh machine that has python3, pip, make and gcc.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8001
METRICS_PORT ?= 8002
MODELS ?= models

.PHONY: install gen models serve test test-deps lint unit integration perf-analyzer clean

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
	$(PY) -m inferd.demo_models --out $(MODELS)

serve: gen models
	$(VENV)/bin/inferd serve --model-repository $(MODELS) --host $(HOST) --port $(PORT) \
		--metrics-port $(METRICS_PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p inferd.core

test-deps:
	scripts/install_test_deps.sh

test: lint test-deps
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

# Triton's perf_analyzer against a running `make serve` (its set-up is cached under .venv/).
PERF_MODEL ?= mlp
PERF_CONCURRENCY ?= 1:4:3
perf-analyzer: $(STAMP)
	$(PY) scripts/perf_analyzer.py -m $(PERF_MODEL) -i grpc -u $(HOST):$(PORT) \
		--concurrency-range $(PERF_CONCURRENCY)

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .mypy_cache .ruff_cache

# Benchmarks, not tests: starts its own servers (inferd, Triton, MLServer) on free loopback
# ports, runs loadtest/scenarios/*.toml (~18 min here) and writes docs/benchmarks.md.
.PHONY: bench
bench: $(STAMP)
	$(PY) -m inferd.loadtest.bench

# Where inferd spends its GIL time under load: starts inferd on the bench's tiny model, drives it
# at c=8 with inferd-loadtest and records it with py-spy (--gil --native, 200 Hz): the flame
# graph goes to docs/profiles/inferd-c8.svg, the top functions are printed. py-spy attaches with
# ptrace: root here; a container may need `--cap-add SYS_PTRACE`.
.PHONY: profile
profile: $(STAMP)
	$(PY) scripts/profile_server.py
