"""Two real processes (DDP over gloo on CPU) train on unevenly sized shards: every rank runs the
same number of batches, nothing hangs, and validation scores every held-out sample once."""

import json

import yaml

from carevl import schema, shapes
from tests.launch import carevl


def test_two_processes_uneven_shards(tiny_qwen, world, tmp_path):
    # Shards of 9, 9, 9 and 2 samples: dealt round-robin, rank 0 holds 11 samples and rank 1 holds 18.
    with schema.ShardWriter(tmp_path / "train", prefix="u", max_count=9, kind="sft") as writer:
        for item in shapes.judge_items(29, seed=6):
            writer.write(schema.SFTSample(**item.fields(), target=item.critique(), source="t"))
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 2, "precision": "32-true", "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "tests.ddp_probe.CountBatches", "init_args": {"out_dir": str(tmp_path / "counts")}},
                          {"class_path": "carevl.callbacks.Throughput", "init_args": {"window": 2, "peak_tflops": 1.0}}],  # rank-local: no collective to hang on
        },
        "model": {
            "class_path": "carevl.sft.SFTJudge",
            "init_args": {"backbone": {"class_path": "carevl.backbone.Backbone", "init_args": {"model": tiny_qwen}},
                          "lr": 1e-3, "global_batch_size": None, "max_new_tokens": 4},
        },
        "data": {"class_path": "datamodules.JudgeDataModule",
                 "init_args": {"train": str(tmp_path / "train"), "val": str(world / "heldout"), "batch_size": 3, "val_batch_size": 5, "num_workers": 1}},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    carevl("fit", path)
    counts = [json.loads((tmp_path / "counts" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 29 samples // (2 ranks x 3) = 4 batches per rank per epoch, 2 epochs.
    assert [c["train"] for c in counts] == [8, 8] and all(c["world_size"] == 2 for c in counts)
    # The held-out set (16 samples) is split between ranks: 8 each per validation, 2 validations.
    assert [c["val_samples"] for c in counts] == [16, 16] and counts[0]["val"] == counts[1]["val"]
