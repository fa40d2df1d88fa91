"""The README's main job, stage by stage, with the shipped demo configs (slow: about 20 minutes on 2 cores)."""

import csv
import json
from pathlib import Path

import pytest

from carevl.cli import main
from carevl.shapes import write_benchmarks, write_world
from carevl.tiny import build_tiny_model
from carevl.vision_pretrain import pretrain_vision

# Measured with `bash tools/demo.sh` on 2 CPU cores: see the README's recipe section.
SFT_ACCURACY_FLOOR = 0.85  # measured 0.885 (bash tools/demo.sh); the aim of 0.9 is not reached yet


def last(metrics_csv, column):
    value = None
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            value = row.get(column) or value
    return float(value)


@pytest.mark.slow
def test_demo_judge_learns_the_shapes_world(tmp_path, monkeypatch):
    configs = Path(__file__).resolve().parents[1] / "configs" / "demo"
    monkeypatch.chdir(tmp_path)  # the demo configs name paths under runs/demo
    quiet = "--trainer.enable_progress_bar=false"
    build_tiny_model("runs/demo/tiny")
    write_world("runs/demo/world", captions=3000)
    write_benchmarks("runs/demo/world/bench", 120, seed=7)
    pretrain_vision("runs/demo/tiny", "runs/demo/tiny-vision")
    main(["fit", "--config", str(configs / "pretrain.yaml"), quiet])
    main(["validate", "--config", str(configs / "sft.yaml"), "--model.init_args.backbone.init_args.model=runs/demo/base",
          "--trainer.logger.init_args.name=base", quiet])
    main(["fit", "--config", str(configs / "sft.yaml"), quiet])
    base = last(next(Path("runs/demo/logs/base").rglob("metrics.csv")), "val/verdict_accuracy")
    sft = last(next(Path("runs/demo/logs/sft").rglob("metrics.csv")), "val/verdict_accuracy")
    assert base < 0.6 and sft >= SFT_ACCURACY_FLOOR, (base, sft)

    main(["test", "--config", str(configs / "eval.yaml")])
    results = json.loads(Path("runs/demo/eval/vlrewardbench/test/results.json").read_text())["results"]["vlrewardbench"]
    # The benchmark-format records are fresh shapes-world items: the judge scores as on the held-out set.
    assert results["overall"] >= 100 * SFT_ACCURACY_FLOOR - 10, results
