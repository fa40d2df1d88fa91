"""The real CLI trains the tiny judge: frozen vision stays bit-identical, trainable weights move,
bad samples are skipped and counted in the logs, and the loss falls on data with a known answer."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForImageTextToText

from tests.helpers import fit, metrics, write_bad_shards


def test_fit_keeps_vision_frozen_and_moves_trainable_weights(tiny_qwen, world, tmp_path):
    before = dict(AutoModelForImageTextToText.from_pretrained(tiny_qwen).named_parameters())
    cli = fit(
        tmp_path,
        tiny_qwen,
        world / "train",
        world / "heldout",
        trainer={"limit_train_batches": 3},
        module_args={"val_categories": ["coarse", "fine"]},
        limit_val_batches=1.0,  # all 16 held-out samples: both kinds
    )
    backbone = cli.model.backbone
    vision = backbone.vision_parameters()
    assert vision
    for name, param in vision.items():
        assert torch.equal(param, before[name]), f"frozen vision weight {name} changed"
    trainable = {n: p for n, p in backbone.hf.named_parameters() if p.requires_grad}
    assert trainable.keys() == {n for n in before if n not in vision}
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unchanged, f"trainable weights that did not change: {unchanged}"
    rows = metrics(tmp_path)
    assert any(r.get("val/verdict_accuracy") for r in rows)
    logged = [r for r in rows if r.get("val/verdict_accuracy") not in (None, "")]
    assert all(r.get(f"val/verdict_accuracy/{kind}") not in (None, "") for r in logged for kind in ("coarse", "fine"))
    # each held-out item's verdict, beside the metrics, for paired comparisons (tools/results_table.py)
    step = int(logged[-1]["step"]) + 1  # the CSV logs the step before; the file, the steps done
    written = next(Path(tmp_path).rglob("metrics.csv")).parent / f"verdicts-step{step}-rank0.jsonl"
    verdicts = [json.loads(line) for line in written.read_text().splitlines()]
    assert len({v["id"] for v in verdicts}) == len(verdicts) == 16
    assert {v["category"] for v in verdicts} == {"coarse", "fine"}
    right = sum(v["verdict"] == v["label"] for v in verdicts)
    assert right / 16 == pytest.approx(float(logged[-1]["val/verdict_accuracy"]))


def test_bf16_weights_train_at_a_small_learning_rate_and_export_in_bf16(tiny_qwen, world, tmp_path):
    """bf16-mixed without DeepSpeed, weights loaded in bfloat16: the trainable ones are held in
    float32. In bfloat16 an AdamW update at lr 1e-5 is below a weight's resolution: before, 86% of
    the trainable elements stayed bit-identical over two steps (13% in float32, whose gradients are
    zero: unused embedding rows)."""
    from safetensors.torch import load_file

    before = dict(AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.bfloat16).named_parameters())
    cli = fit(
        tmp_path,
        tiny_qwen,
        world / "train",
        trainer={"precision": "bf16-mixed"},
        backbone={"dtype": "bfloat16"},
        lr=1e-5,
        max_steps=2,
        limit_val_batches=0,
    )
    backbone = cli.model.backbone
    trainable = {n: p for n, p in backbone.hf.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in backbone.vision_parameters().values()} == {torch.bfloat16}, (
        "frozen weights keep the configured dtype"
    )
    changed = sum(int((p != before[n]).sum()) for n, p in trainable.items()) / sum(
        p.numel() for p in trainable.values()
    )
    assert changed > 0.8
    out = backbone.export(tmp_path / "hf")
    assert {t.dtype for f in out.glob("*.safetensors") for t in load_file(f).values()} == {torch.bfloat16}


def test_bf16_dpo_against_a_copy_starts_at_exactly_log_2(tiny_qwen, tmp_path):
    """The copy reference keeps the policy's dtypes (float32 where the policy trains): both compute
    the same, so the first loss is log 2 exactly. A copy cast back to bfloat16 gave 0.69338."""
    from carevl.standins.world import write_preference_groups

    write_preference_groups(str(tmp_path / "groups"), n=4, shard_size=4)
    fit(
        tmp_path,
        tiny_qwen,
        tmp_path / "groups",
        trainer={"precision": "bf16-mixed"},
        module="carevl.dpo.DPOJudge",
        module_args={"reference": "copy", "beta": 0.1, "val_generate": False},
        backbone={"dtype": "bfloat16", "freeze_projector": True},
        lr=1e-5,
        max_steps=1,
        limit_val_batches=0,
        kind="preference_group",
    )
    first = next(r for r in metrics(tmp_path) if r.get("train/loss"))
    assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-7)


def test_fit_completes_on_bad_shards_and_logs_skips(tiny_qwen, tmp_path):
    write_bad_shards(tmp_path / "bad")
    fit(tmp_path, tiny_qwen, tmp_path / "bad", max_steps=5)
    last = {}
    for row in metrics(tmp_path):
        last.update({k: v for k, v in row.items() if v})
    for reason in ("corrupt_image", "too_long", "bad_record"):
        assert float(last[f"skipped/{reason}"]) >= 1, reason


def test_loss_falls_on_the_shapes_world(tiny_qwen, world, tmp_path):
    cli = fit(tmp_path, tiny_qwen, world / "train", world / "heldout", max_steps=40, lr=3e-3, limit_val_batches=1.0)
    losses = [float(r["train/loss"]) for r in metrics(tmp_path) if r.get("train/loss")]
    assert losses[-1] < 0.5 * losses[0], losses
    assert cli.trainer.global_step == 40


def test_exact_match_rises_from_none_to_all_as_instruction_targets_are_learned(tiny_qwen, tmp_path):
    """Validation on instruction samples scores greedy outputs by exact match with their targets:
    nothing at the first check, everything once the reply (its end of turn included) is learned."""
    from carevl import schema
    from carevl.images import png_bytes
    from carevl.standins import shapes

    rng, target = random.Random(0), "The image has red, as Answer 2 says."
    for split, n in (("train", 40), ("val", 8)):
        with schema.ShardWriter(tmp_path / split, prefix=split, max_count=20, kind="instruct") as writer:
            for index in range(n):
                image = png_bytes(shapes.render(shapes.random_scene(rng), rng))
                writer.write(schema.InstructSample(f"{split}{index}", "Describe the image.", target, "test", image))
    fit(
        tmp_path,
        tiny_qwen,
        tmp_path / "train",
        tmp_path / "val",
        trainer={"val_check_interval": 1, "check_val_every_n_epoch": None, "limit_train_batches": 10},
        max_steps=20,
        lr=3e-3,
        module_args={"max_new_tokens": 16},
        kind="instruct",
    )
    scores = [float(r["val/exact_match"]) for r in metrics(tmp_path) if r.get("val/exact_match")]
    assert len(scores) == 20
    assert scores[0] == 0.0 and scores[-1] == 1.0, scores


class PoisonHead(Callback):
    """Sets one language-model head weight to infinity before step `at`; on the exception, writes the
    trainable weights that changed since then to `out`."""

    def __init__(self, at: int, out: str):
        self.at, self.out = at, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.backbone.hf.lm_head.weight[0, 0] = float("inf")
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_exception(self, trainer, pl_module, exception):
        changed = [
            n for n, p in pl_module.named_parameters() if n in self.before and not torch.equal(p, self.before[n])
        ]
        Path(self.out).write_text(json.dumps(changed))


def test_a_non_finite_loss_stops_training_before_the_optimizer_steps(tiny_qwen, world, tmp_path):
    poison = {
        "class_path": "tests.test_training.PoisonHead",
        "init_args": {"at": 2, "out": str(tmp_path / "changed.json")},
    }
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 2 .*samples: \['shapes"):
        fit(tmp_path, tiny_qwen, world / "train", trainer={"callbacks": [poison], "limit_val_batches": 0}, max_steps=4)
    assert json.loads((tmp_path / "changed.json").read_text()) == [], "no weight moved on the non-finite loss"


def test_tensorboard_logs_the_same_losses_as_csv(tiny_qwen, world, tmp_path):
    """TensorBoard is a documented logger option beside CSV: the same run's losses reach its event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path / "csv", tiny_qwen, world / "train", max_steps=3, limit_val_batches=0)
    board = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path / "tb"), "name": "run"},
    }
    fit(tmp_path / "tb", tiny_qwen, world / "train", trainer={"logger": board}, max_steps=3, limit_val_batches=0)
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = [event.value for event in events.Scalars("train/loss")]
    expected = [float(row["train/loss"]) for row in metrics(tmp_path / "csv") if row.get("train/loss")]
    assert len(logged) == 3 and logged == pytest.approx(expected, rel=1e-6)
