VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2

.PHONY: setup train test diffs

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) test
	touch $@

setup: $(VENV)/.installed

## The main job.
train: setup
	$(PY) -m veomni_omni.train

## The test suite (what CI runs).
test: setup
	$(PY) -m pytest -q tests

## Regenerate patches/*.diff from the code.
diffs: setup
	$(PY) -m veomni_omni.patching --write
