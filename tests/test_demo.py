"""The README's main job, stage by stage, with the shipped demo configs (slow: about 15 minutes on 2 cores)."""

import csv

import pytest

from carevl.cli import main
from carevl.shapes import write_world
from carevl.tiny import build_tiny_model
from carevl.vision_pretrain import pretrain_vision


def last(metrics_csv, column):
    value = None
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            value = row.get(column) or value
    return float(value)


@pytest.mark.slow
def test_demo_judge_learns_the_shapes_world(tmp_path, monkeypatch):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs" / "demo"
    monkeypatch.chdir(tmp_path)  # the demo configs name paths under runs/demo
    build_tiny_model("runs/demo/tiny")
    write_world("runs/demo/world", captions=3000)
    pretrain_vision("runs/demo/tiny", "runs/demo/tiny-vision")
    main(["fit", "--config", str(configs / "pretrain.yaml"), "--trainer.enable_progress_bar=false"])
    main(["validate", "--config", str(configs / "sft.yaml"), "--model.init_args.backbone.init_args.model=runs/demo/base",
          "--trainer.logger.init_args.name=base", "--trainer.enable_progress_bar=false"])
    main(["fit", "--config", str(configs / "sft.yaml"), "--trainer.enable_progress_bar=false"])
    base = last(next(Path("runs/demo/logs/base").rglob("metrics.csv")), "val/verdict_accuracy")
    sft = last(next(Path("runs/demo/logs/sft").rglob("metrics.csv")), "val/verdict_accuracy")
    assert base < 0.6 and sft >= 0.9, (base, sft)
