# Two commands on a fresh machine: `make run` and `make test` (and `make bench` for the benchmarks).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
# The image installs requirements.lock (hashed); the tests run the same versions, pinned by it (hashes dropped:
# pip checks them only for a whole closure, and an editable install has none).
PINS    = $(VENV)/pins.txt

.PHONY: run test coverage lint bench lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	sed -n '/^[A-Za-z0-9]/s/ \\$$//p' requirements.lock > $(PINS)
	$(PY) -m pip install --quiet -c $(PINS) setuptools
	$(PY) -m pip install --quiet -c $(PINS) -e '.[test]'
	touch $(STAMP)

## Start nats-server and all six services, run the restaurant-website example, keep serving (ONCE=1: exit after it;
## ARGS: more `openclaw up` options, e.g. ARGS="--nats-port 0 --gateway-port 0").
run: $(STAMP)
	$(VENV)/bin/openclaw up --example $(if $(ONCE),--once,) $(ARGS)

## The whole test suite against a real nats-server (NATS_URL=… to use your own; OPENCLAW_TEST_DOCKER=1 for testcontainers),
## in TEST_WORKERS processes (pytest-xdist), a test module each at a time (TEST_WORKERS=0: in this one process).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

## The same suite with line coverage of shared/, services/ and bench/, the services' own processes included.
coverage: export COVERAGE_FILE = $(CURDIR)/.coverage
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	$(VENV)/bin/coverage run -m pytest -q $(PYTEST_ARGS)
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report

lint: $(STAMP)
	$(VENV)/bin/ruff check shared services bench tests
	$(VENV)/bin/mypy shared services bench

BENCH_STAMP = $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c $(PINS) -e '.[test,bench]'
	touch $(BENCH_STAMP)

## Benchmarks of the real stack (a few minutes): bench/results.md, charts in bench/, the README's table.
## BENCH_ARGS="--runs 5 --time-factor 0.05" to change them (see `openclaw bench --help`).
bench: $(BENCH_STAMP)
	$(VENV)/bin/openclaw bench --readme README.md $(BENCH_ARGS)

## requirements.lock again from pyproject.toml: every package of the image and its build backend, pinned and hashed.
lock:
	rm -rf $(VENV)/lock && $(PYTHON) -m venv $(VENV)/lock && $(VENV)/lock/bin/pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/lock/bin/pip-compile --quiet --generate-hashes --strip-extras \
	    --no-emit-index-url --no-emit-find-links --build-deps-for wheel \
	    --allow-unsafe --output-file requirements.lock pyproject.toml
	rm -rf $(VENV)/lock

clean:
	rm -rf $(VENV) .openclaw .pytest_cache .coverage .coverage.*
