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

.PHONY: quickstart test lint bench results clean-work help

help:
	@echo "make quickstart | make test | make lint | make bench | make results | make clean-work"

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

# the report test opens the HTML report in headless Chromium (Debian's package; needs root
# or an existing chromium on PATH)
BROWSER_STAMP := $(VENV)/.browser-installed
$(BROWSER_STAMP): | $(STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@touch $@

test: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check platform tests bench

# every benchmark, then one table of their ratios (docs/results/benchmarks.md)
bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py --epochs 4
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/search_efficiency.py
	$(BIN)/python bench/lmd_cost.py
	$(BIN)/python bench/summary.py

# every method's specs over 3 seeds on the built-in benchmarks (about 1 h on 2 CPU cores; one
# GPU per worker when torch sees a CUDA GPU), each table to docs/results/, then the
# cross-method report
HAS_GPU = $(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))")
RESULTS = $(BIN)/oodlab results $(if $(filter 1,$(HAS_GPU)),--set resources.use_gpu=true)
SEEDS := --seeds 0 1 2
results: $(STAMP)
	$(RESULTS) jobs/edge_bce.yaml jobs/edge_bce_oe.yaml jobs/edge_energy_oe_ml.yaml jobs/edge.yaml \
	    --name edge-mosaic --out docs/results/edge_mosaic.md $(SEEDS)
	for d in smallest largest; do $(RESULTS) jobs/edge_oe_select.yaml \
	    --name edge-oe-direction-$$d --set data.oe_select.direction=$$d \
	    --set data.oe_select.threshold=0.0 --out docs/results/edge_oe_direction_$$d.md $(SEEDS); done
	$(RESULTS) jobs/um_pretrain.yaml jobs/um.yaml jobs/umap.yaml jobs/um_oe_baseline.yaml \
	    jobs/um_oe.yaml --name unleashing-mask --scores msp energy odin \
	    --out docs/results/unleashing_mask.md $(SEEDS)
	$(RESULTS) jobs/lmd.yaml --name lmd --scores lmd diffusion_recon --per-set auroc \
	    --out docs/results/lmd.md $(SEEDS)
	$(RESULTS) jobs/simclr.yaml jobs/ccl.yaml --name ccl \
	    --scores knn cluster_cosine cluster_mahalanobis --per-set auroc fpr95 \
	    --out docs/results/ccl.md $(SEEDS)
	$(BIN)/oodlab report --out docs/results/report

clean-work:
	rm -rf .oodlab
