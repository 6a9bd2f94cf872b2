# Claw: `make up` installs and starts the embedded platform with a demo;
# `make test` installs the dev tools and runs lint + the whole test suite.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: up test lint format bench bench-swarm clean browser

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Claw needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

up: $(VENV)/.installed
	$(BIN)/claw up --demo --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev-installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The browser tests (tests/test_browser.py) drive Debian's Chromium through Playwright, which
# never downloads a browser of its own. Installed once via apt (sudo when not root); a machine
# without apt gets a note, and the tests skip (or fail under CLAW_TEST_SERVICES=require).
browser:
	@[ -x /usr/bin/chromium ] || { \
	  if command -v apt-get >/dev/null; then \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "installing Debian's chromium for the browser tests"; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium >/dev/null || echo "warning: could not install chromium" >&2; \
	  else \
	    echo "warning: no /usr/bin/chromium and no apt-get: the browser tests skip" >&2; \
	  fi; \
	}

test: lint browser
	CLAW_TEST_SERVICES=off DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(VENV)/.dev-installed
	$(BIN)/python -m tests.bench.concurrency

# Services mode for real (PostgreSQL, its own redis-server, 2 web processes behind a
# round-robin front, 2 workers, beat) driven by AGENTS protocol agents over a TASKS-task DAG,
# with faults mid-run; a table on stdout, a JSON report and a PNG plot in var/bench/.
AGENTS ?= 300
TASKS ?= 4000
SWARM_ARGS ?=
bench-swarm: $(VENV)/.dev-installed
	$(BIN)/python -m tests.bench.swarm --agents $(AGENTS) --tasks $(TASKS) $(SWARM_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
