# Two commands on a fresh machine:  make run   (set up + default pipeline)   make test   (set up + tests)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
CORES ?= 2

.PHONY: setup run test clean

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
	$(BIN)/snakemake --cores $(CORES)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf results .snakemake
