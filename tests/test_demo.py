"""The README's main job: the whole pipeline on the shapes world (slow: ~14 minutes on 2 cores)."""

import json
from pathlib import Path

import pytest

from tests.helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]

# Measured with `bash tools/demo.sh` (seed 0) on 2 CPU cores (docs/results.md): the SFT judge on the
# high-confidence pairs 85.5% of 400 held-out items (95.5% coarse, 59.8% fine), 12.7 points above SFT
# on every judge label, its last two validations 1.3 points apart; Best-to-Worse DPO 87.5% overall
# and 66.1% on fine questions (+6.3); every DPO run above the SFT judge. The test holds the default
# seed to those with room for a few items: SFT at 83% or more and 10 points above the no-experts
# ablation, a flat end to its curve (the last two validations within 2 points), Best-to-Worse 3
# points above SFT on fine questions and not below it overall, no DPO run more than 5 points below
# SFT, parseable critiques from every judge and none from the base model. Other seeds do not yet
# reach these figures (seed 1: SFT 84.2%, 2.2 points above all labels; seed 2: 73.3%).


@pytest.mark.slow
def test_pipeline_on_the_shapes_world(tmp_path, monkeypatch):
    pipeline = load_tool("pipeline")
    for name in ("configs", "tools"):  # the pipeline's commands name paths relative to the repository
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    pipeline.main(["--config", "configs/pipeline/shapes.yaml"])

    table = {row["run"]: row for row in json.loads(Path("runs/demo/results.json").read_text())}
    held_out = table["base"]["unparseable"]
    assert table["base"]["accuracy"] == 0.0 and held_out == 400, table["base"]
    assert all(row["accuracy"] is not None for row in table.values()), table
    dpo_runs = ("dpo", "dpo-lowest_incorrect", "dpo-highest_incorrect", "dpo-all_incorrect", "dpo-random_incorrect")
    for run in ("sft-judge", "sft", *dpo_runs):
        assert table[run]["unparseable"] <= 10, table[run]
    sft = table["sft"]
    assert sft["accuracy"] >= 0.83, sft
    assert sft["accuracy"] - table["sft-judge"]["accuracy"] >= 0.10, (sft, table["sft-judge"])
    (_, before), (_, last) = sft["curve"][-2:]
    assert abs(last - before) <= 0.02, sft["curve"]  # a plateau, not mid-climb
    best_to_worse = table["dpo"]
    assert best_to_worse["fine"] - sft["fine"] >= 0.03, (best_to_worse, sft)
    assert best_to_worse["accuracy"] >= sft["accuracy"], (best_to_worse, sft)
    for run in dpo_runs:
        assert table[run]["accuracy"] >= sft["accuracy"] - 0.05, (table[run], sft)
