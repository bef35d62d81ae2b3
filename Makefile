# The README's first two commands. Both build .venv from nothing when it is missing.
#   make quickstart   search + promote + serve the quickstart spec on built-in data
#   make test         the test suite (what CI runs via .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.oodlab-installed

# No telemetry, no network: these machines (and CI) are offline.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: quickstart test lint bench clean-work help

help:
	@echo "make quickstart | make test | make lint | make bench | make clean-work"

# torch is installed first and by exact version so nothing can pull a different build;
# everything else is pinned by constraints.txt (a lock of a set tested together).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	@touch $@

# a small search, its best trial promoted to @champion, then served and one image scored
# (KEEP=1 leaves the service running)
quickstart: $(STAMP)
	$(BIN)/oodlab tune jobs/quickstart.yaml --space search_spaces/quickstart.yaml \
	    --name quickstart-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/oodlab serve --spec jobs/quickstart.yaml --smoke $(if $(KEEP),--keep)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check platform tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py

clean-work:
	rm -rf .oodlab
