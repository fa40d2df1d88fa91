#!/usr/bin/env bash
# Create .venv and install carevl with its test dependencies at the versions in constraints.txt.
# Idempotent; offline-friendly on the project's CPU machines, where torch 2.14.1 and torchvision
# 0.29.1 install from local files.
set -euo pipefail
cd "$(dirname "$0")/.."
# Downloaded wheels are not kept in pip's cache: where torch comes from the registry rather than from
# local files, the cache would hold a second copy of several GB on a disk that has run out during CI.
export PIP_NO_CACHE_DIR=1
# The README's two commands may be started together: one set-up at a time, the other then finds it done.
exec 9>.setup-env.lock
flock 9
if [ ! -x .venv/bin/python ]; then
  # torch's build with its CUDA libraries makes .venv about 6 GB; say so before pip runs out of room.
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 8 ]; then
    echo "setup_env: $free_gb GB free here; .venv needs about 6 GB (torch with its CUDA libraries)" >&2
  fi
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
