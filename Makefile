# Two commands do all the setup: `make demo` and `make test`. Both create .venv on first use and
# install the project from pyproject.toml; a second run reuses it (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench soak install clean seeds

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m batch_bridge.demo

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
	rm -rf $(VENV) .batch_bridge warehouse.duckdb dbt_project/target dbt_project/logs
