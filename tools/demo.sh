#!/usr/bin/env bash
# The embedded default, end to end on CPU and offline: a tiny Qwen2-VL and the shapes world built
# locally, base-model pretraining, SFT of the judge, and held-out verdict accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
out=runs/demo
rm -rf "$out"
start=$(date +%s)

python -m carevl.tiny --out $out/tiny                                    # random weights, local tokenizer
python tools/shapes_world.py --out $out/world --captions 3000             # judge train/held-out, benchmarks, base pretraining
python -m carevl.vision_pretrain --model $out/tiny --out $out/tiny-vision # stand-in for a pretrained encoder
carevl fit --config configs/demo/pretrain.yaml                            # captions + quoting -> runs/demo/base
carevl validate --config configs/demo/sft.yaml \
  --model.init_args.backbone.init_args.model=$out/base --trainer.logger.init_args.name=base
carevl fit --config configs/demo/sft.yaml                                 # SFT judge -> runs/demo/sft

python tools/demo_report.py $out/logs "$(( $(date +%s) - start ))"
# The demo judge on the shapes world in both benchmarks' formats (tables and per-record predictions).
carevl test --config configs/demo/eval.yaml
carevl test --config configs/demo/eval.yaml --data.init_args.test=$out/world/bench/mllm_judge \
  --data.init_args.order=as_stored --model.init_args.results_dir=$out/eval/mllm_judge
