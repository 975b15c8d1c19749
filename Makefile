# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The enricher's hot path compiled with mypyc (from the dev dependencies) into build/mypyc/lib
# (deploy/mypyc/build.py lists the modules), rebuilt when an enricher source or a type it reads
# changes. The sources stay the truth: the enricher uses the build only when it was made from
# exactly the sources beside it, and logs at start which one runs; without a C compiler the
# build says so and the sources run.
MYPYC_INPUTS := deploy/mypyc/build.py $(wildcard services/enricher/*.py \
	services/enricher/pipelines/*.py libs/serde/*.py libs/state/*.py schemas/*.avsc)
MYPYC_MANIFEST := build/mypyc/lib/compiled.json

.PHONY: install demo test test-unit test-unit-compiled test-integration lint typecheck bench soak stack-up stack-down clean
.PHONY: image image-test image-tools

install: $(STAMP) $(MYPYC_MANIFEST)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

$(MYPYC_MANIFEST): $(STAMP) $(MYPYC_INPUTS)
	$(PY) deploy/mypyc/build.py

lint: install
	$(VENV)/bin/ruff check libs services tests deploy
	$(VENV)/bin/ruff format --check libs services tests deploy

typecheck: install
	$(VENV)/bin/mypy

# tests/image builds the image and runs it (the same as `make image image-test`); image-tools
# installs buildah for that where it can, or says why those tests will skip.
test: install lint typecheck image-tools
	$(PY) -m pytest tests -m "not perf and not soak"
	@# the unit suite again on the enricher's compiled modules, where this machine built them
	@if $(PY) -c 'import json, sys; sys.exit(not json.load(open("$(MYPYC_MANIFEST)"))["modules"])'; then \
		echo "TEST_COMPILED=1 $(PY) -m pytest tests/unit"; TEST_COMPILED=1 $(PY) -m pytest tests/unit; \
	else echo "no compiled modules here (see $(MYPYC_MANIFEST)): the unit suite ran on the sources only"; fi

# The main job on embedded defaults; Ctrl-C stops everything it started.
demo: install
	$(PY) deploy/local/demo.py $(DEMO_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit

# The unit suite against the compiled modules (fails when the build is missing or stale).
test-unit-compiled: install
	TEST_COMPILED=1 $(PY) -m pytest tests/unit

bench: install
	$(PY) -m pytest tests/perf -m perf -s --timeout=0

# The container image: Docker where it works, else buildah (a local Debian base when no
# registry is reachable); deploy/docker/image.sh --help says how to choose.
image:
	deploy/docker/image.sh build

# Each service run from the built image (non-root, read-only root filesystem, only the
# manifests' volumes) against the local stack: an alert from an event to its receipt.
image-test: install image
	IMAGE_TEST_BUILT=1 $(PY) -m pytest tests/image -m image $(IMAGE_TEST_ARGS)

image-tools:
	@deploy/docker/image.sh tools

# The fleet soak (not in `make test`): SOAK_EVENTS (100000), SOAK_KILLS per service (20),
# SOAK_BROKER_RESTARTS (3), SOAK_RATE events/s (150), SOAK_SEED; prints the e2e summary table.
soak: install
	$(PY) -m pytest tests/e2e/test_soak.py -m soak --timeout=0

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
