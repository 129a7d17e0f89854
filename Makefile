# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint typecheck pytest clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,openai,postgres,otel]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/rag_demo.py --db demo-traces.db

lint: $(STAMP)
	$(VENV)/bin/ruff check instrumentation tests benchmarks examples notebooks
	$(VENV)/bin/ruff format --check instrumentation

typecheck: $(STAMP)
	$(VENV)/bin/mypy instrumentation
	$(VENV)/bin/mypy --config-file tests/typing/mypy.ini tests/typing/user_code.py

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
