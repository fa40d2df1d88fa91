#!/usr/bin/env bash
# Set up .venv if needed and run the default test suite (slow and GPU tests deselected); then set up
# .venv-vllm (vLLM's own environment), run the tests of the vLLM backends in it, and the tests that
# start `vllm serve` from it (`carevl test` through the server, in .venv). Arguments go to the main
# suite; CAREVL_SKIP_VLLM=1 leaves the vLLM part out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
deactivate
if [ "${CAREVL_SKIP_VLLM:-0}" != 1 ]; then
  bash tools/setup_vllm_env.sh
  .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm_backend.py
  .venv/bin/python -m pytest -q -m vllm_serve tests/test_evaluation.py
fi
