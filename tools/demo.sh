#!/usr/bin/env bash
# The embedded default: the whole CAREVL pipeline on the shapes world, CPU, offline (a tiny Qwen2-VL
# and simulated curation models built locally), ending with the held-out verdict accuracy table.
# A rerun resumes where a killed run stopped; `rm -rf runs/demo` starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
python tools/pipeline.py --config configs/pipeline/shapes.yaml "$@"
