# hepml_dist: the two commands of the README, and the install they share.
#   make demo   install (if needed), then run the demo
#   make test   install (if needed), then run the test suite
# TORCH_SPEC picks the torch build, e.g. on a CUDA machine:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hepml-installed

.PHONY: install demo test lock clean

install: $(STAMP)

# torch goes in first, alone; everything else installs under a constraint that keeps that torch
# (otherwise pip may replace a CPU or ROCm torch with GBs of CUDA wheels).
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	PIP_CONSTRAINT=$(CURDIR)/$(VENV)/torch-constraint.txt $(BIN)/python -m pip install -q -c requirements.lock -e ".[dev,gen,export]"
	touch $@

demo: $(STAMP)
	$(BIN)/hepml validate jobs/*.yaml
	$(BIN)/hepml jobs jobs

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Re-pin every non-torch dependency from the current environment.
lock: $(STAMP)
	{ echo "# Pinned versions of everything hepml-dist installs besides torch (TORCH_SPEC in the Makefile)."; \
	  echo "# Shared by make, CI and both container images. Regenerate with: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^torch==' -e '^hepml-dist'; } > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
