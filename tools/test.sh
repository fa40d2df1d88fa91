#!/usr/bin/env bash
# Set up .venv if needed and run the default test suite (slow and GPU tests deselected).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
