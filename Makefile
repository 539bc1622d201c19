# Two commands a user needs: `make run` (set up + quickstart) and `make test` (set up + checks + tests).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOPOLOGY ?= topologies/quickstart.yaml
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run test quick lint ui clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,flower]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/testbed run $(TOPOLOGY)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

# The inner loop of development: the unit tests that start no Ray cluster and are not marked slow.
quick: setup
	$(PY) -m pytest -q -m "not ray and not slow" tests/unit

ui: setup
	$(VENV)/bin/testbed ui

clean:
	rm -rf mlruns.db mlartifacts checkpoints reports .pytest_cache .mypy_cache .ruff_cache
