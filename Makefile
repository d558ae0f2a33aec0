# Two commands do all the set-up on a fresh machine:
#   make demo   - the main job: an end-to-end run on the embedded tiny supernet
#   make test   - ruff + the whole test suite (what CI runs, through .ci/run)
# Both create .venv on first use. TORCH_SPEC picks the torch build (the default is the CPU wheel these
# machines carry; on a GPU machine use e.g. TORCH_SPEC=torch).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/gearshift demo --out demo-out

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
