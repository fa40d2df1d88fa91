"""The README's main job: the whole pipeline on the shapes world (slow: ~14 minutes on 2 cores)."""

import json
from pathlib import Path

import pytest

from tests.helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]

# Measured with `bash tools/demo.sh` (seed 0) on 2 CPU cores at a01e3c0 (docs/results.md): the SFT
# judge on the high-confidence pairs 89.7% of 400 held-out items (98.6% coarse, 67.0% fine), 22.7
# points above SFT on every judge label, its last two validations 2.2 points apart (after a rise of
# 20.5); the DPO runs 0.0-2.4 points below it (Best-to-Worse 89.7%). The test holds the default seed
# to those with room for a few items: SFT at 87% or more and 10 points above the no-experts
# ablation, a flat end to its curve (the last two validations within 3 points), no DPO run more
# than 5 points below SFT, parseable critiques from every judge and none from the base model.
# Best-to-Worse's gain on fine questions is not asserted: at this seed it has none (66.1% against
# SFT's 67.0%; docs/results.md).


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
    assert sft["accuracy"] >= 0.87, sft
    assert sft["accuracy"] - table["sft-judge"]["accuracy"] >= 0.10, (sft, table["sft-judge"])
    (_, before), (_, last) = sft["curve"][-2:]
    assert abs(last - before) <= 0.03, sft["curve"]  # a plateau, not mid-climb
    for run in dpo_runs:
        assert table[run]["accuracy"] >= sft["accuracy"] - 0.05, (table[run], sft)
