# The two commands of the README. `make run`: install and run the main job on the embedded default.
# `make test`: install and run the whole test suite (lint, types, tests); .ci/run calls exactly this.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install install-test run test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

# npm ci: the real @segment/analytics-node, analytics.js and playwright-core that tests/test_tracking_clients.py
# drives, exactly as locked; Debian's chromium for analytics.js in a real browser (apt, never a downloaded one).
install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	npm ci --prefix tests/clients/node --no-audit --no-fund --loglevel=error
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

run: install
	$(BIN)/idstitch ingest examples/walkthrough.ndjson
	$(BIN)/idstitch stats

test: install-test
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/pytest
