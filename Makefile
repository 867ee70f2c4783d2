# mumic-batch: `make test` and `make demo` set up .venv on their own when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: setup test test-main test-slow test-fast demo bench ablation clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Two runs, each printing its slowest tests: the main suite, then the tests that start Spark drivers of
# their own for minutes (S3 with hadoop-aws and the DynamoDB LogStore, killed backfills).
test: test-main test-slow

test-main: setup
	$(PY) -m pytest -q -m "not slow" tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

test-fast: setup
	$(PY) -m pytest -q -m "not spark and not slow" tests

demo: setup
	$(PY) -m jobs.demo

bench: setup
	$(PY) bench/throughput.py

ablation: setup
	$(PY) bench/ablation.py

clean:
	rm -rf data spark-warehouse metastore_db derby.log .pytest_cache
