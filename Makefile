# flowlab — every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flowlab-installed
FMNIST := /usr/share/datasets/fashion-mnist
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install train test test-all test-cluster lint bench sweep fashion-mnist clean

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

# The quick start: ~6-7 minutes on two CPU cores, ends with `test/bpd=<value>`. One torch thread:
# on cores shared with other work two threads stall each other (measured 5-15x slower).
train: install fashion-mnist
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/flowlab-train experiment=quickstart $(ARGS)

# The quick suite (a few minutes on two cores): everything but the slow and multi-process tests.
test: install
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not cluster" $(ARGS)

# Everything but the cluster tests: adds the slow tests (soak, signals, real-data training) and the multi-process DDP ones.
test-all: install fashion-mnist
	$(BIN)/python -m pytest -q -m "not cluster" $(ARGS)

# Real SLURM jobs on a one-node cluster started here (as root; tests/cluster/README.md), stopped even on failure.
test-cluster: install
	bash tests/cluster/slurm.sh start
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m cluster tests/cluster $(ARGS); \
	  rc=$$?; bash tests/cluster/slurm.sh stop; exit $$rc

lint: install
	$(BIN)/ruff check src tests experiments

bench: install
	$(BIN)/flowlab-bench --preset cpu $(ARGS)

# The CPU-scale permutation ablation (7 models x 3 seeds, ~40 min on two cores; one torch thread per
# run is much faster than two on shared cores), then its table and plots in <sweep dir>/aggregate/.
ifndef SWEEP_NAME
SWEEP_NAME := ablation_permutation_$(shell date +%Y-%m-%d_%H-%M-%S)
endif
sweep: install fashion-mnist
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/flowlab-train -m experiment=ablation_permutation run_name=$(SWEEP_NAME) $(ARGS)
	$(BIN)/python experiments/ablation_permutation/aggregate.py $${FLOWLAB_OUTPUT:-outputs}/multirun/$(SWEEP_NAME) \
	  --out $${FLOWLAB_OUTPUT:-outputs}/multirun/$(SWEEP_NAME)/aggregate

clean:
	rm -rf outputs multirun wandb .pytest_cache
