# neuronatlas — the two quick-start commands are `make demo` and `make test`.
# Each one sets everything up on a fresh machine (idempotent) and then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.neuronatlas-setup
CORES ?= 2
# memory budget (MB) of concurrent local demo jobs (each job declares its mem_mb)
MEM_MB ?= 20000

.PHONY: setup demo test bench lint clean-results help

help:
	@echo "make demo   set up .venv + offline assets, run the offline demo DAG, build the report"
	@echo "make test   set up .venv + offline assets, run the test suite"
	@echo "make bench  run every benchmark (JSON on stdout)"
	@echo "make lint   ruff, snakefmt and snakemake --lint"

# Re-runs only when the pins change; `rm -r .venv` forces a clean install.
$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@bash scripts/install-system-assets.sh
	@touch $(STAMP)

setup: $(STAMP)

# One shell, so the closing line can say how long the demo took and how much it wrote.
demo: setup
	@start=$$(date +%s); \
	$(BIN)/snakemake --profile profiles/default --cores $(CORES) --resources mem_mb=$(MEM_MB) && \
	$(BIN)/snakemake --profile profiles/default --cores $(CORES) --report results/report.html && \
	$(BIN)/python -m neuronatlas.cli summary && \
	echo "report: $(CURDIR)/results/report.html" && \
	echo "neuron atlas: $(CURDIR)/results/atlas/index.html (open it in a browser from disk)" && \
	seconds=$$(( $$(date +%s) - start )) && \
	echo "make demo: $$(( seconds / 60 )) min $$(( seconds % 60 )) s wall on $(CORES) cores; results/ holds $$(du -sh results | cut -f1)"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m neuronatlas.bench all

# House style: ruff (lint + format) on Python, snakefmt on the Snakefile and rule files, snakemake --lint
# on the demo and the full config.
lint: setup
	$(BIN)/ruff check src tests workflow/scripts
	$(BIN)/ruff format --check src tests workflow/scripts
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --configfile config/demo.yaml
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean-results:
	rm -rf results .snakemake
