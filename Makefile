# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The suite again on the oldest releases pyproject.toml accepts (without the peer,
# whose releases need a newer pydantic).
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
TEST_TOOLS := pytest pytest-asyncio pytest-timeout hypothesis mypy nbclient nbformat ipykernel

.PHONY: demo test test-oldest oldest-pytest bench lint typecheck pytest clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,openai,postgres,otel]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/rag_demo.py --db demo-traces.db

lint: $(STAMP)
	$(VENV)/bin/ruff check instrumentation instrumentation_pytest.py tests benchmarks examples notebooks
	$(VENV)/bin/ruff format --check instrumentation instrumentation_pytest.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy instrumentation instrumentation_pytest.py
	$(VENV)/bin/mypy --config-file tests/typing/mypy.ini tests/typing/user_code.py

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck pytest

$(OLDEST_STAMP): pyproject.toml .ci/oldest-constraints.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet -c .ci/oldest-constraints.txt \
		-e ".[openai,postgres,otel]" $(TEST_TOOLS)
	touch $(OLDEST_STAMP)

# The oldest releases have wheels for Python 3.10 and 3.11 only.
test-oldest:
	@if $(PYTHON) -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then \
		$(MAKE) --no-print-directory oldest-pytest; \
	else \
		echo "test-oldest: skipped, the oldest releases need Python 3.10 or 3.11" \
			"(make test-oldest PYTHON=python3.11)"; \
	fi

oldest-pytest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -m pytest -q

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info .mypy_cache .ruff_cache
