# Quick start: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

# torch is pinned to the local CPU build first so that no later requirement pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[hf,dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/plan examples/models/gpt2_small.py --inspect
	$(VENV)/bin/plan examples/specs/llama3_70b.yaml --gpus 1024 --profile h100_ib --global-batch 1024

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

lint: install
	$(VENV)/bin/ruff check autoshard planner cost_models transforms tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
