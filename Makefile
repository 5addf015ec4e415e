# Fleet telemetry platform. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test-deps demo test lint bench chaos proof up down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

demo: $(STAMP) ## run broker, database, consumer and a simulated fleet locally
	$(BIN)/python -m scripts.demo

test-deps: ## install the Debian packages the tests use (prometheus, docker-compose, chromium) if missing
	@scripts/test-deps.sh

test: $(STAMP) test-deps lint ## lint, then every test (real PostgreSQL and a local broker)
	$(BIN)/pytest

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check consumer producer_sim devtools tests scripts
	$(BIN)/ruff format --check consumer producer_sim devtools tests scripts
	$(BIN)/mypy

bench: $(STAMP) ## ingest, freshness, session-close, stream and API benchmarks (print numbers; see BENCHMARKS.md)
	$(BIN)/python -m scripts.bench_ingest
	$(BIN)/python -m scripts.bench_freshness
	$(BIN)/python -m scripts.bench_sessions
	$(BIN)/python -m scripts.bench_stream
	$(BIN)/python -m scripts.bench_api

chaos: $(STAMP) ## soak with kill -9, PostgreSQL crashes and outages, broker restart (~8 min; RELIABILITY.md)
	$(BIN)/python -m scripts.chaos

proof: $(STAMP) ## sessions and alerts of a faulty simulated fleet against its truth file (kill -9 included)
	$(BIN)/python -m scripts.sessions_proof

up: ## run the stack with docker compose (needs a Docker engine)
	docker compose up -d

down: ## stop the docker compose stack
	docker compose down

clean: ## remove the virtualenv and local state
	rm -rf $(VENV) .demo .bench .chaos .proof .pytest-artifacts .mypy_cache .ruff_cache .hypothesis
