# flowlab — every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flowlab-installed
FMNIST := /usr/share/datasets/fashion-mnist
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install train test test-all bench sweep fashion-mnist clean

install: $(STAMP)

# torch and torchvision are pinned to the builds on this disk (PyPI's torchvision does not
# import beside other torch builds); everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Debian ships the real Fashion-MNIST files; install them where apt-get exists and they are missing.
fashion-mnist:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	      echo "could not install dataset-fashion-mnist; set FLOWLAB_DATA to a folder holding Fashion-MNIST IDX files"; \
	  else echo "apt-get not found: set FLOWLAB_DATA to a folder holding Fashion-MNIST IDX files"; fi; \
	fi

train: install fashion-mnist
	$(BIN)/flowlab-train experiment=quickstart $(ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/flowlab-bench --preset cpu $(ARGS)

sweep: install fashion-mnist
	$(BIN)/flowlab-train -m experiment=ablation_permutation $(ARGS)

clean:
	rm -rf outputs multirun wandb .pytest_cache
