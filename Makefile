# Two commands on a fresh clone: `make demo` runs the embedded default, `make test` the tests.
# Both create .venv with the pinned dependencies when it is missing (Python >= 3.11 needed).
PYTHON ?= python3
CORES ?= 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The GPU rules declare resources: gpu=1 and profiles/default allows one at a time. Without a GPU
# they run on the CPU, where that token would only serialise them.
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
GPU_TOKENS := $(if $(filter 0,$(GPUS)),$(CORES),$(GPUS))

.PHONY: demo grid test lint test-fast report setup clean slurm-packages chromium-package cluster-resources plan-study

$(STAMP): requirements.txt requirements-test.txt requirements-test-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-test-nodeps.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --editable .  # the library, importable everywhere
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPU_TOKENS)
	$(BIN)/snakemake --cores 1 --report results/report.html
	@echo
	@echo "Summary table: results/summary.csv"
	@echo "HTML report:   results/report.html"
	@echo "Plots:         results/plots/"

# The README's factor grid (6 methods x 4 eps x 2 budgets) through the workflow, on top of the
# default run (re-uses its tiles, features and heads), then tabulated from results/summary.csv.
GRID := tests/configs/factor_grid.yaml
grid: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPU_TOKENS) --configfile config.yaml $(GRID)
	$(BIN)/python -m wsiattack.gridtable results/summary.csv --sweep $(GRID) --csv results/grid_cells.csv

# Job count, DAG build time and peak memory of a 10 000-slide x 10-encoder x 50-attack dry run;
# with a finished run in results/, its measured per-tile costs scaled to that study.
PLAN_ARGS ?= --slides 10000 --encoders 10 --attacks 50 --shards 100
plan-study: $(STAMP)
	$(BIN)/python -m wsiattack.planning $(PLAN_ARGS) $(if $(wildcard results/features/demo),--pilot results)

report: $(STAMP)
	$(BIN)/snakemake --cores 1 --report results/report.html

test: lint slurm-packages chromium-package
	$(BIN)/python -m pytest

# Style and workflow checks, part of `make test` (and so of CI): ruff (lint + format), snakefmt,
# and Snakemake's own linter, which exits non-zero on any finding.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check --line-length 120 Snakefile rules/
	$(BIN)/snakemake --lint --cores 1 >/dev/null

# The live-SLURM test needs Debian's slurm-wlm and munge; installed here when running as root with
# apt-get (as CI does). Elsewhere the test is skipped and says why.
slurm-packages:
	@if ! PATH="$$PATH:/usr/sbin" command -v slurmctld >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null 2>&1) \
		|| echo "slurm-wlm/munge not installable: the live-SLURM test will be skipped"; \
	fi

# The report test opens the built HTML report in headless Chromium (Debian's chromium), installed
# the same way; elsewhere that test is skipped and says why.
chromium-package:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium not installable: the report-rendering test will be skipped"; \
	fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Size profiles/slurm's per-rule memory and runtime from the benchmark files of a finished run.
cluster-resources: $(STAMP)
	$(BIN)/python -m wsiattack.cluster results/benchmarks profiles/slurm/config.yaml --configfile config.yaml

clean:
	rm -rf results/* .snakemake
	touch results/.gitkeep
