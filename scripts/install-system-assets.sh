#!/usr/bin/env bash
# System-level offline assets: Debian's dataset-fashion-mnist (images for the modularity stage).
# Installs it when root and missing; otherwise says what to run. Never fails the setup:
# only the vision part of the demo needs it, and that part names the missing path clearly.
set -u
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -e "$FMNIST" ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian package dataset-fashion-mnist ..."
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
    && echo "dataset-fashion-mnist installed" \
    || echo "WARNING: could not install dataset-fashion-mnist; the vision stage will report it missing"
else
  echo "NOTE: Fashion-MNIST not found at $FMNIST; as root run: apt-get install dataset-fashion-mnist"
fi
