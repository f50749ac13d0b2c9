# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Start nats-server and all six services, run the restaurant-website example, keep serving (ONCE=1: exit after it).
run: $(STAMP)
	$(VENV)/bin/openclaw up --example $(if $(ONCE),--once,)

## The whole test suite against a real nats-server (NATS_URL=… to use your own; OPENCLAW_TEST_DOCKER=1 for testcontainers).
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check shared services tests
	$(VENV)/bin/mypy shared services

clean:
	rm -rf $(VENV) .openclaw .pytest_cache
