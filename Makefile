# Two commands do all the setup: `make demo` and `make test`. Both create .venv on first use and
# install the project from pyproject.toml; a second run reuses it (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The emulator's tokenizer: `anthropic/tokenizer.json` from the anthropic 0.25.0 wheel (an older Claude BPE),
# fetched from the package registry into the virtualenv, never committed (docs/emulator.md, "Token counts").
TOKENIZER := $(VENV)/share/batch_bridge/claude-tokenizer.json

.PHONY: demo test bench soak install clean seeds

# The package is byte-compiled at install, as pip does when it installs a wheel: an editable install
# leaves that to the first import, and where PYTHONDONTWRITEBYTECODE is set, to every command.

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m compileall -q batch_bridge
	test -s $(TOKENIZER) || { tmp=$$(mktemp -d) && \
	  $(PY) -m pip download --quiet --disable-pip-version-check --no-deps anthropic==0.25.0 -d $$tmp && \
	  mkdir -p $(dir $(TOKENIZER)) && \
	  $(PY) -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('anthropic/tokenizer.json'))" \
	    $$tmp/anthropic-0.25.0-py3-none-any.whl $(TOKENIZER).part && mv $(TOKENIZER).part $(TOKENIZER); \
	  rc=$$?; rm -rf $$tmp; exit $$rc; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m batch_bridge.demo

# The same project with `dbt build` alone: the bridge runs inside dbt as a dbt-duckdb plugin.
.PHONY: demo-plugin
demo-plugin: $(STAMP)
	$(PY) -m batch_bridge.demo_plugin

# Test files run in parallel, one process per core (pytest-xdist); a file's tests stay in one process.
# The 15 slowest tests are listed at the end, to keep the suite's time in sight.
# `make test PYTEST_ARGS=...` replaces this (e.g. PYTEST_ARGS='tests/test_cli.py -x').
PYTEST_ARGS ?= -n auto --dist loadfile --durations=15

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py

# 30 cycles of `batch-bridge pipeline` under random faults and kills (about 10 minutes); see bench/soak.py.
soak: $(STAMP)
	$(PY) bench/soak.py --cycles 30

seeds: $(STAMP)
	$(PY) scripts/make_seeds.py

clean:
	rm -rf $(VENV) .batch_bridge warehouse.duckdb .batch_bridge_plugin warehouse_plugin.duckdb dbt_project/target dbt_project/logs
