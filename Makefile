# The README's first two commands. Both build .venv from nothing when it is missing, and
# install the Debian packages they need when those are missing (as root; otherwise they print
# the `sudo apt-get install ...` line to run and stop).
#   make quickstart   search + promote + serve the quickstart spec on built-in data
#   make test         the test suite (what CI runs via .ci/run)
#   make packages     every Debian package below (sudo make packages)
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

.PHONY: results-fmnist results-fmnist-full-cpu results-resnet18-cpu quickstart test packages test-packages quickstart-packages lint bench results clean-work help

help:
	@echo "make quickstart | make test | make packages | make lint | make bench | make results" \
	    "| make clean-work"

# Debian packages, each with the shell test that finds it:
#   chromium               headless browser for the HTML report test (tests/test_report.py)
#   dataset-fashion-mnist  Fashion-MNIST idx files in /usr/share/datasets/fashion-mnist/
#   postgresql             a PostgreSQL server (pg_ctl), for PostgreSQL-backed stores
SYSTEM_PACKAGES := chromium dataset-fashion-mnist postgresql
TEST_PACKAGES := chromium dataset-fashion-mnist postgresql
QUICKSTART_PACKAGES := dataset-fashion-mnist
CHECK.chromium := command -v chromium || command -v chromium-browser
CHECK.dataset-fashion-mnist := test -d /usr/share/datasets/fashion-mnist
CHECK.postgresql := command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl

# $(call need-packages,PKG...,TARGET): a recipe line that finds the missing ones; as root it
# installs them with apt-get, otherwise it prints them and the exact sudo command and fails
# before apt-get is ever run. Checked before .venv is built, so a missing package fails fast.
define need-packages
@missing=""; \
$(foreach p,$(1),{ $(CHECK.$(p)); } >/dev/null 2>&1 || missing="$$missing $(p)";) \
if [ -z "$$missing" ]; then exit 0; fi; \
if [ "$$(id -u)" != 0 ]; then \
    echo "make $(2): missing Debian package(s):$$missing" >&2; \
    echo "installing them needs root (you are uid $$(id -u)); run:" >&2; \
    echo "    sudo apt-get update && sudo apt-get install -y$$missing" >&2; \
    echo "then run make $(2) again." >&2; \
    exit 1; \
fi; \
echo "installing Debian package(s):$$missing"; \
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing
endef

packages:
	$(call need-packages,$(SYSTEM_PACKAGES),packages)
test-packages:
	$(call need-packages,$(TEST_PACKAGES),test)
quickstart-packages:
	$(call need-packages,$(QUICKSTART_PACKAGES),quickstart)

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
quickstart: quickstart-packages $(STAMP)
	$(BIN)/oodlab tune jobs/quickstart.yaml --space search_spaces/quickstart.yaml \
	    --name quickstart-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/oodlab serve --spec jobs/quickstart.yaml --smoke $(if $(KEEP),--keep)

# the system packages, the architecture (import-linter contracts in pyproject.toml), the suite
# on TEST_WORKERS pytest-xdist processes, whole modules each (a module's fixtures are built
# once), taken in tests/conftest.py's order, longest first (xdist's own reorder, by test
# count, would leave the one-test cluster module for last); the tests mostly wait on process
# start-up and servers, so 2 workers on 2 cores cut the wall time by about 40 % (32 -> 18 min)
# (TEST_WORKERS=0: one process)
TEST_WORKERS ?= 2
test: test-packages $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile \
	    --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check platform tests bench
	$(BIN)/lint-imports

# every benchmark, then one table of their ratios (docs/results/benchmarks.md)
bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py --epochs 4
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/replica_http.py
	$(BIN)/python bench/core_sharing.py
	$(BIN)/python bench/search_efficiency.py
	$(BIN)/python bench/lmd_cost.py
	$(BIN)/python bench/lmd_gpu.py report bench/results/lmd_gpu/run1 bench/results/lmd_gpu/run2
	$(BIN)/python bench/data_path.py
	$(BIN)/python bench/posthoc_cache.py
	$(BIN)/python bench/summary.py

# every method's specs over 3 seeds on the built-in benchmarks (about 1 h on 2 CPU cores; one
# GPU per worker when torch sees a CUDA GPU), each table to docs/results/, then the
# cross-method report
HAS_GPU = $(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))")
RESULTS = $(BIN)/oodlab results $(if $(filter 1,$(HAS_GPU)),--set resources.use_gpu=true)
SEEDS := --seeds 0 1 2
# the Fashion-MNIST baselines, 5 seeds (FMNIST_SET=--set data.limit=N caps every split at N
# for a CPU-sized run; the table then says so)
FMNIST_SEEDS := --seeds 0 1 2 3 4
FMNIST_SET ?=
results-fmnist: $(STAMP) quickstart-packages
	$(RESULTS) jobs/fmnist_supervised.yaml jobs/fmnist_oe.yaml jobs/fmnist_energy_oe.yaml \
	    jobs/fmnist_supervised_ft.yaml jobs/fmnist_resnet18.yaml --name fmnist-baselines \
	    $(FMNIST_SET) --scores msp max_logit energy odin knn mahalanobis --per-set auroc fpr95 \
	    --baseline fmnist_supervised --out docs/results/fmnist_baselines.md $(FMNIST_SEEDS)
	# the OE rows against their CE-only fine-tune control (trained above; nothing reruns)
	$(RESULTS) jobs/fmnist_supervised.yaml jobs/fmnist_oe.yaml jobs/fmnist_energy_oe.yaml \
	    jobs/fmnist_supervised_ft.yaml --name fmnist-baselines $(FMNIST_SET) --resume \
	    --scores msp max_logit energy odin knn mahalanobis --baseline fmnist_supervised_ft \
	    --out docs/results/fmnist_oe_control.md $(FMNIST_SEEDS)

# the same four specs at full size (55,000 training images) on CPU, resumable: every finished
# (spec, seed) stays in MLflow and is kept, so an interrupted run continues where it stopped
# (about 12 min a SmallCNN run on 2 CPU cores, 20 runs): docs/results/fmnist_baselines_full.md
results-fmnist-full-cpu: $(STAMP) quickstart-packages
	$(RESULTS) jobs/fmnist_supervised.yaml jobs/fmnist_oe.yaml jobs/fmnist_energy_oe.yaml \
	    jobs/fmnist_supervised_ft.yaml --name fmnist-baselines-full --resume \
	    --scores msp max_logit energy odin knn mahalanobis --per-set auroc fpr95 \
	    --baseline fmnist_supervised --out docs/results/fmnist_baselines_full.md $(FMNIST_SEEDS) \
	    --curves train/loss val/id_acc val/auroc
	# Mahalanobis of those checkpoints against covariance shrinkage (feature caches, no training)
	.venv/bin/python bench/mahalanobis_shrinkage.py --table fmnist-baselines-full \
	    jobs/fmnist_supervised.yaml jobs/fmnist_oe.yaml jobs/fmnist_energy_oe.yaml \
	    jobs/fmnist_supervised_ft.yaml

# ResNet-18 against the SmallCNN at CPU size (10,000 training images, 5 seeds, same steps;
# about 2 h on 2 CPU cores): docs/results/fmnist_resnet18.md
results-resnet18-cpu: $(STAMP) quickstart-packages
	$(RESULTS) jobs/fmnist_supervised.yaml jobs/fmnist_resnet18.yaml --name fmnist-resnet18-cpu \
	    --set data.limit=10000 --scores msp max_logit energy odin knn mahalanobis \
	    --per-set auroc fpr95 --baseline fmnist_supervised --out docs/results/fmnist_resnet18.md \
	    $(FMNIST_SEEDS) --curves val/auroc train/loss

# post-hoc search (docs/posthoc.md) on the 5 supervised checkpoints of results-fmnist, 20 TPE
# trials per score (about 35 min on 2 CPU cores, most of it ODIN's network trials)
POSTHOC_WORKDIR ?= .oodlab
posthoc: $(STAMP)
	.venv/bin/oodlab tune-posthoc --results-of jobs/fmnist_supervised.yaml \
	    --table fmnist-baselines --trials 20 --no-register --set workdir=$(POSTHOC_WORKDIR) \
	    --set tracking.experiment=posthoc-fmnist --out docs/results/posthoc_fmnist.md

results: $(STAMP) results-fmnist posthoc
	$(RESULTS) jobs/edge_bce.yaml jobs/edge_bce_oe.yaml jobs/edge_energy_oe_ml.yaml jobs/edge.yaml \
	    --name edge-mosaic --out docs/results/edge_mosaic.md $(SEEDS)
	for d in smallest largest; do $(RESULTS) jobs/edge_oe_select.yaml \
	    --name edge-oe-direction-$$d --set data.oe_select.direction=$$d \
	    --set data.oe_select.threshold=0.0 --out docs/results/edge_oe_direction_$$d.md $(SEEDS); done
	# OE-selection direction on the Fashion-MNIST mosaics: EDGE trained with each candidate alone
	for c in symbols digits8x8 textures noise; do $(RESULTS) jobs/edge_fmnist.yaml \
	    --name edge-oe-alone --set "data.oe=[mosaic_oe_$$c]" --set name=edge_alone_$$c \
	    --out docs/results/edge_oe_alone_$$c.md $(FMNIST_SEEDS); done
	for r in 50 100; do $(RESULTS) jobs/edge_fmnist_bce.yaml jobs/edge_fmnist_bce_oe.yaml \
	    jobs/edge_fmnist_energy_oe_ml.yaml jobs/edge_fmnist.yaml --name edge-fmnist-rho$$r \
	    --set data.imbalance_ratio=$$r --baseline edge_fmnist_bce_oe \
	    --out docs/results/edge_fmnist_rho$$r.md $(FMNIST_SEEDS); \
	    $(RESULTS) jobs/edge_fmnist_bce.yaml jobs/edge_fmnist_bce_oe.yaml \
	    jobs/edge_fmnist_energy_oe_ml.yaml jobs/edge_fmnist.yaml --name edge-fmnist-rho$$r \
	    --set data.imbalance_ratio=$$r --baseline edge_fmnist_bce --table-only \
	    --out docs/results/edge_fmnist_rho$${r}_vs_bce.md $(FMNIST_SEEDS); done
	$(RESULTS) jobs/um_fmnist_pretrain.yaml jobs/um_fmnist_pretrain_best.yaml jobs/um_fmnist_ce.yaml \
	    jobs/um_fmnist.yaml jobs/umap_fmnist.yaml jobs/um_fmnist_short.yaml jobs/um_fmnist_oe_baseline.yaml \
	    jobs/um_fmnist_oe.yaml --name unleashing-mask-fmnist --scores energy msp odin \
	    --per-set auroc fpr95 --baseline um_fmnist_ce --out docs/results/unleashing_mask.md $(FMNIST_SEEDS) \
	    --curves val/auroc um/train_ce um/loss_constraint um/ascent_fraction
	$(RESULTS) jobs/lmd.yaml --name lmd --scores lmd diffusion_recon --per-set auroc \
	    --out docs/results/lmd.md $(SEEDS)
	$(RESULTS) jobs/fmnist_simclr.yaml jobs/fmnist_ccl.yaml --name ccl $(FMNIST_SET) \
	    --scores knn cluster_cosine cluster_mahalanobis --per-set auroc fpr95 \
	    --baseline fmnist_simclr --out docs/results/ccl.md $(FMNIST_SEEDS)
	# the views chosen on validation (search_spaces/ccl_views.yaml) against SSD's recipe
	$(RESULTS) jobs/fmnist_simclr.yaml jobs/fmnist_simclr_views.yaml --name ccl-views $(FMNIST_SET) \
	    --scores knn cluster_cosine cluster_mahalanobis --per-set auroc \
	    --baseline fmnist_simclr --out docs/results/ccl_views.md $(FMNIST_SEEDS)
	$(BIN)/oodlab report --out docs/results/report

clean-work:
	rm -rf .oodlab
