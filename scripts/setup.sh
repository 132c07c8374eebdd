#!/usr/bin/env bash
# Set up everything hydravit needs on a fresh machine: a Python 3.11 virtual environment in .venv with the
# package and its test extras, and the built-in Fashion-MNIST data set. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    echo "hydravit needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    python=$(find_python)
    echo "setup: creating .venv with $python"
    "$python" -m venv .venv
fi

stamp=".venv/.hydravit-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing hydravit and its dependencies into .venv (first time: a few minutes)"
    .venv/bin/python -m pip install --quiet -e '.[test]' 2>&1 | grep -v 'is ignored' || true
    .venv/bin/python -c 'import hydravit, torch, torchvision, timm' # fails loudly if the install did not work
    rm -f .venv/.hydravit-installed-*
    touch "$stamp"
fi

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "setup: installing the Fashion-MNIST data set (Debian package dataset-fashion-mnist)"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: cannot install dataset-fashion-mnist without root; run: apt-get install -y dataset-fashion-mnist" >&2
        exit 1
    fi
fi
echo "setup: ready (.venv, Fashion-MNIST in $FMNIST_DIR)"
