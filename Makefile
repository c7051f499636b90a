# Two commands on a fresh machine:  make run   (set up + default pipeline)   make test   (set up + tests)
# Another experiment (configs/experiment/):  make run EXPERIMENT=toy_sentinel
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
CORES ?= 2
EXPERIMENT ?=

.PHONY: setup run test report clean slurm-profile slurm-deps

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, alone: the pin picks the CPU wheel on this kind of machine instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml $(BIN)/activate
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/snakemake --cores $(CORES)$(if $(EXPERIMENT), --config experiment=$(EXPERIMENT))

test: setup
	$(BIN)/python -m pytest -q

# Snakemake's HTML report of a finished experiment (make report EXPERIMENT=<name>): one self-contained file,
# results/<experiment>/report.html, with the rounds plot, the summary tables, the training curves, every round's
# eval files and the resolved config (captions: workflow/report/). The folder is the experiment's paths.experiment_dir.
report: setup
	dir=$$($(BIN)/python -c 'import sys; from halludpo.config import compose; \
	  print(compose(sys.argv[1:]).paths.experiment_dir)' $(if $(EXPERIMENT),experiment=$(EXPERIMENT))) && \
	$(BIN)/snakemake --cores $(CORES) --report "$$dir/report.html"$(if $(EXPERIMENT), --config experiment=$(EXPERIMENT))

clean:
	rm -rf results .snakemake

# SLURM: installs workflow/profiles/slurm as your Snakemake profile "slurm" (~/.config/snakemake/slurm), so that
# `snakemake --profile slurm` works from the checkout; the plugin comes with setup (pyproject.toml). A copy, yours to
# edit; running it again replaces it and keeps the previous one as config.yaml.bak.
SNAKEMAKE_PROFILES ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
slurm-profile: setup
	mkdir -p $(SNAKEMAKE_PROFILES)/slurm
	if [ -f $(SNAKEMAKE_PROFILES)/slurm/config.yaml ] && \
	   ! cmp -s workflow/profiles/slurm/config.yaml $(SNAKEMAKE_PROFILES)/slurm/config.yaml; then \
	  cp $(SNAKEMAKE_PROFILES)/slurm/config.yaml $(SNAKEMAKE_PROFILES)/slurm/config.yaml.bak; fi
	cp workflow/profiles/slurm/config.yaml $(SNAKEMAKE_PROFILES)/slurm/config.yaml
	@echo "installed $(SNAKEMAKE_PROFILES)/slurm/config.yaml: snakemake --profile slurm"

# Debian's SLURM and MUNGE for tests/test_slurm.py (a one-node cluster on localhost); as root. Does nothing when
# they are installed already.
slurm-deps:
	@if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && \
	    command -v sbatch >/dev/null; then echo "slurm-deps: slurm-wlm and munge are installed"; \
	else apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; fi
