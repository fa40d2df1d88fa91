#!/usr/bin/env bash
# Create .venv and install carevl with its test dependencies at the versions in constraints.txt.
# Idempotent; offline-friendly on the project's CPU machines, where torch 2.14.1 and torchvision
# 0.29.1 install from local files.
set -euo pipefail
cd "$(dirname "$0")/.."
# The README's two commands may be started together: one set-up at a time, the other then finds it done.
exec 9>.setup-env.lock
flock 9
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
source .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
if ! python -c "import carevl, datamodules, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.carevl-installed ] \
    || [ constraints.txt -nt .venv/.carevl-installed ]; then
  python -m pip install -q -e ".[dev]" -c constraints.txt
  touch .venv/.carevl-installed
fi
