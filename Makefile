# Offline-first entry points. `make repro` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# DVC stage commands call `python -m pipeline ...`: run them with the project's interpreter.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export YOLO_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup repro world-demo test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

# Reproducible mode: the same bytes as the committed dvc.lock on any x86-64 CPU
# (docs/reproducibility.md). `PMU_REPRODUCIBLE=0 make repro` uses the machine's fastest kernels.
repro: export PMU_REPRODUCIBLE ?= 1
repro: setup
	dvc repro

# The chain on a synthetic world with adapted models: 28 min on 2 CPU cores (docs/world.md).
world-demo: setup
	dvc repro world-demo/dvc.yaml

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check pmu pipeline trainer tests benchmarks
	$(VENV)/bin/ruff format --check pmu pipeline trainer tests benchmarks
	$(VENV)/bin/lint-imports
