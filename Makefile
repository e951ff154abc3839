# hepml_dist: the two commands of the README, and the install they share.
#   make demo   install (if needed), then run the demo (docs/demo.md)
#   make test   install (if needed), then run the test suite
# TORCH_SPEC picks the torch build, e.g. on a CUDA machine:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
TORCH_PIN := $(VENV)/torch-constraint.txt
# What each target installs: the demo only what it runs (the package and the Pythia generator), the tests everything.
DEMO_STAMP := $(VENV)/.hepml-installed-demo
STAMP := $(VENV)/.hepml-installed

.PHONY: install demo test lock clean

install: $(STAMP)

# torch goes in first, alone; everything else installs under a constraint that keeps that torch
# (otherwise pip may replace a CPU or ROCm torch with GBs of CUDA wheels).
$(TORCH_PIN):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $@

$(STAMP): pyproject.toml requirements.lock $(TORCH_PIN)
	PIP_CONSTRAINT=$(CURDIR)/$(TORCH_PIN) $(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $@ $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml requirements.lock $(TORCH_PIN)
	PIP_CONSTRAINT=$(CURDIR)/$(TORCH_PIN) $(BIN)/python -m pip install -q -c requirements.lock -e ".[gen]"
	touch $@

# The demo, end to end on 2 CPU cores (~15 min): generate FCC-ee tau and quark jets with Pythia 8 (a complete
# dataset with the same events and seed is reused), train MultiParTau on 2 DDP workers of an embedded Ray,
# evaluate on the test split, write the HTML report (with a gradient-boosted baseline) and print its path.
# Smaller: make demo DEMO_EVENTS=20000 DEMO_DATA=data/fcc-tau-20k DEMO_RUN=runs/demo-20k DEMO_SET="--set ..."
DEMO_JOB ?= jobs/multipartau-quickstart.yaml
DEMO_DATA ?= data/fcc-tau
DEMO_EVENTS ?= 200000
DEMO_SEED ?= 0
DEMO_RUN ?= runs/multipartau-quickstart
DEMO_SET ?=
DEMO_SPLITS := --set data.train=$(DEMO_DATA)/train --set data.val=$(DEMO_DATA)/val --set data.test=$(DEMO_DATA)/test

demo: $(DEMO_STAMP)
	@set -e; start=$$(date +%s); \
	if $(BIN)/python -c "import json, sys; g = json.load(open('$(DEMO_DATA)/manifest.json'))['meta']['generator']; \
	    sys.exit((g['process'], g['events'], g['seed'], (g.get('options') or {}).get('detector')) \
	             != ('fcc-tau', $(DEMO_EVENTS), $(DEMO_SEED), 'realistic'))" 2>/dev/null; then \
	  echo "demo: reusing $(DEMO_DATA) (fcc-tau, $(DEMO_EVENTS) events, seed $(DEMO_SEED), realistic detector)"; \
	else \
	  if [ -f $(DEMO_DATA)/manifest.json ]; then overwrite=--overwrite; echo "demo: $(DEMO_DATA) holds another dataset: replacing it"; fi; \
	  $(BIN)/hepml data generate fcc-tau --events $(DEMO_EVENTS) --seed $(DEMO_SEED) --out $(DEMO_DATA) $$overwrite; \
	  rm -rf $(DEMO_RUN); \
	fi; \
	$(BIN)/hepml train $(DEMO_JOB) --run-dir $(DEMO_RUN) $(DEMO_SPLITS) $(DEMO_SET); \
	$(BIN)/hepml evaluate $(DEMO_RUN); \
	$(BIN)/hepml report $(DEMO_RUN); \
	echo "demo: finished in $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s; open $(abspath $(DEMO_RUN))/report.html"

# PATH as in an activated venv: tools the tests start (hepml, ray, Ray job entrypoints) resolve to this install.
# --durations: the 30 slowest tests close the log, to keep the whole CI run within its 30 minutes
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q --durations=30

# Re-pin every non-torch dependency from the current environment.
lock: $(STAMP)
	{ echo "# Pinned versions of everything hepml-dist installs besides torch (TORCH_SPEC in the Makefile)."; \
	  echo "# Shared by make, CI and both container images. Regenerate with: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^torch==' -e '^hepml-dist'; } > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
