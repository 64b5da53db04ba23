#!/usr/bin/env bash
# System-level offline assets from Debian: dataset-fashion-mnist (images for the modularity stage) and fortunes
# (the topic subsets and reference set of the evidence run's text pruning experiment).
# Installs what is missing when root; otherwise says what to run. Never fails the setup: only the stages that
# read these files need them, and those name the missing path clearly.
set -u
declare -A PROBE=(
  [dataset-fashion-mnist]=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
  [fortunes]=/usr/share/games/fortunes/computers
)
missing=()
for package in dataset-fashion-mnist fortunes; do
  [ -e "${PROBE[$package]}" ] || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages ${missing[*]} ..."
  (apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1)) \
    && echo "${missing[*]} installed" \
    || echo "WARNING: could not install ${missing[*]}; the stages that read them will report them missing"
else
  echo "NOTE: missing Debian packages ${missing[*]}; as root run: apt-get install ${missing[*]}"
fi
