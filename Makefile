# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration lint typecheck bench stack-up stack-down clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check libs services tests deploy
	$(VENV)/bin/ruff format --check libs services tests deploy

typecheck: install
	$(VENV)/bin/mypy

test: install lint typecheck
	$(PY) -m pytest tests -m "not perf"

# The main job on embedded defaults; Ctrl-C stops everything it started.
demo: install
	$(PY) deploy/local/demo.py $(DEMO_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit

bench: install
	$(PY) -m pytest tests/perf -m perf -s --timeout=0

stack-up:
	deploy/local/stack.sh up

stack-down:
	deploy/local/stack.sh down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# deploy/observability/dashboard.png: the on-call dashboard drawn from a real run (needs
# Debian's prometheus and chromium packages; see deploy/observability/screenshot.py).
.PHONY: dashboard-screenshot
dashboard-screenshot: install
	$(PY) deploy/observability/screenshot.py $(SCREENSHOT_ARGS)
