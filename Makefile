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

.PHONY: demo test test-fast report setup clean slurm-packages cluster-resources

$(STAMP): requirements.txt requirements-test.txt requirements-test-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-test-nodeps.txt
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPU_TOKENS)
	$(BIN)/snakemake --cores 1 --report results/report.html
	@echo
	@echo "Summary table: results/summary.csv"
	@echo "HTML report:   results/report.html"
	@echo "Plots:         results/plots/"

report: $(STAMP)
	$(BIN)/snakemake --cores 1 --report results/report.html

test: $(STAMP) slurm-packages
	$(BIN)/python -m pytest

# The live-SLURM test needs Debian's slurm-wlm and munge; installed here when running as root with
# apt-get (as CI does). Elsewhere the test is skipped and says why.
slurm-packages:
	@if ! PATH="$$PATH:/usr/sbin" command -v slurmctld >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null 2>&1) \
		|| echo "slurm-wlm/munge not installable: the live-SLURM test will be skipped"; \
	fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Size profiles/slurm's per-rule memory and runtime from the benchmark files of a finished run.
cluster-resources: $(STAMP)
	PYTHONPATH=workflow_scripts $(BIN)/python -m wsiattack.cluster results/benchmarks profiles/slurm/config.yaml

clean:
	rm -rf results/* .snakemake
	touch results/.gitkeep
