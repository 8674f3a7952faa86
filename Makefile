# Centinela developer commands. Two matter for a new user:
#   make run    start the service on embedded defaults (SQLite, embedded Rego, dev PKI)
#   make test   lint, type-check and run the whole test suite
# Both create their own virtual environment (.venv) and tools on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= .centinela

.PHONY: setup run test lint typecheck pytest protos bench-quick clean

setup: $(VENV)/.installed node_modules/.bin/buf

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[edge,dev]'
	touch $@

node_modules/.bin/buf: package.json
	npm install --silent --no-package-lock
	touch $@

run: setup
	$(VENV)/bin/centinela serve --data-dir $(DATA)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	node_modules/.bin/buf lint

typecheck: setup
	$(PY) scripts/typecheck.py

pytest: setup
	$(PY) -m pytest

test: lint typecheck pytest

protos: setup
	$(PY) scripts/gen_protos.py

bench-quick: setup
	@for b in benchmarks/*.py; do case $$b in */__init__.py) ;; *) echo "== $$b"; $(PY) $$b --quick || exit 1;; esac; done

clean:
	rm -rf $(VENV) node_modules .typecheck .mypy_cache .ruff_cache .pytest_cache
