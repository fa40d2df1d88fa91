"""The README's main job: the whole pipeline on the shapes world (slow: about 27 minutes on 2 cores)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Measured with `bash tools/demo.sh` on 2 CPU cores (README): every judge at 49-54%, i.e. at chance;
# the tiny judge does not yet learn from the curated pairs within the step budget (issue 6 is open).
# What the test holds the pipeline to: every stage runs, every row of the table is measured, every
# judge writes parseable critiques, and the base model (never trained to judge) writes none.


@pytest.mark.slow
def test_pipeline_on_the_shapes_world(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "tools" / "pipeline.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    for name in ("configs", "tools"):  # the pipeline's commands name paths relative to the repository
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    pipeline.main(["--config", "configs/pipeline/shapes.yaml"])

    table = {row["run"]: row for row in json.loads(Path("runs/demo/logs/accuracy_table.json").read_text())}
    assert table["base"]["accuracy"] == 0.0 and table["base"]["unparseable"] == 200, table["base"]
    assert all(row["accuracy"] is not None for row in table.values()), table
    for run in ("sft-judge", "sft", "dpo", "dpo-lowest_incorrect", "dpo-highest_incorrect", "dpo-all_incorrect"):
        assert table[run]["unparseable"] <= 10, table[run]
