"""The README's main job: the whole pipeline on the shapes world (slow: ~9 minutes on 2 cores)."""

import json
from pathlib import Path

import pytest

from tests.helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]

# Measured with `bash tools/demo.sh` (seed 0) on 2 CPU cores (docs/results.md): the SFT judge on
# the high-confidence pairs 92.3% of 400 held-out items (97.9% coarse, 77.7% fine), 3.3 points above
# SFT on every judge label, its last two validations 2.1 points apart (after a rise of 6.7);
# Best-to-Worse 92.5% (78.6% fine), first among the DPO strategies, 1.2 points above the next
# (91.3%). The test holds the default seed to those with room for a few items: SFT at 90% or more
# and above the no-experts ablation, a flat end to its curve (the last two validations within 3
# points), Best-to-Worse no more than a point below SFT and no other strategy more than a point
# above it, no DPO run more than 5 points below SFT, parseable critiques from every judge and none
# from the base model. Best-to-Worse's gain on fine questions is not asserted: at this seed it is
# 0.9 points (docs/results.md).


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
    sft, best_to_worse = table["sft"], table["dpo"]
    assert sft["accuracy"] >= 0.90, sft
    assert sft["accuracy"] > table["sft-judge"]["accuracy"], (sft, table["sft-judge"])
    (_, before), (_, last) = sft["curve"][-2:]
    assert abs(last - before) <= 0.03, sft["curve"]  # a plateau, not mid-climb
    assert best_to_worse["accuracy"] >= sft["accuracy"] - 0.01, (best_to_worse, sft)
    for run in dpo_runs:
        assert table[run]["accuracy"] >= sft["accuracy"] - 0.05, (table[run], sft)
        assert table[run]["accuracy"] <= best_to_worse["accuracy"] + 0.01, (table[run], best_to_worse)
        # item by item against SFT: the pairs account for the accuracy difference exactly
        paired = table[run]["paired"]["overall"]
        assert paired["fixed"] - paired["broken"] == round(held_out * (table[run]["accuracy"] - sft["accuracy"]))
