# The two commands of README.md: `make run` (the main job) and `make test`.
# Set-up is part of both: if this machine's python3 already imports torch, triton, numpy, gguf,
# rich, matplotlib, pytest and hypothesis (a GPU box, say), that interpreter is used with src/ on the
# path; otherwise a virtual environment .venv is made and the package installed into it. torch==2.13.0
# is tried first: where pip's index serves a CPU build of it (CI's machines) no multi-GB CUDA build is
# pulled; elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (README.md).

PYTHON ?= python3
VENV := .venv
HAVE_DEPS := $(shell $(PYTHON) -c "import torch, triton, numpy, gguf, rich, matplotlib, pytest, hypothesis" >/dev/null 2>&1 && echo yes)

ifeq ($(HAVE_DEPS),yes)
PY := PYTHONPATH=$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
endif

.PHONY: run test lint mutation clean
run: $(SETUP)
	$(PY) -m moetile.cli.main run

test: $(SETUP)
	$(PY) -m pytest -q

lint: $(SETUP)
	$(PY) -m ruff check src tests tools

# plant kernel bugs in a copy of the project and check the tests catch each one (a few minutes)
mutation: $(SETUP)
	$(PY) tools/mutation_check.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || \
	  $(VENV)/bin/python -m pip install -q "torch==2.13.0" || \
	  $(VENV)/bin/python -m pip install -q torch
	$(VENV)/bin/python -m pip install -q -e ".[dev,plots,transformers]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
