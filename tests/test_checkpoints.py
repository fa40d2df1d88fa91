"""Saving, resuming and exporting training checkpoints (the CPU half of the scale-out recipe)."""

import json
import os
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForImageTextToText

from carevl.callbacks import trains_a_judge
from carevl.cli import run
from carevl.prompts import TRAINED_PROMPT_FILE
from tests.helpers import fit, load_tool, metrics, write_bad_shards

ROOT = Path(__file__).resolve().parents[1]


def test_resume_continues_from_the_saved_step_and_export_matches(tiny_qwen, world, tmp_path):
    checkpoints = tmp_path / "ckpt"
    (tmp_path / "a").mkdir()
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(checkpoints), "save_last": True, "every_n_train_steps": 2},
        }
    ]
    first = fit(
        tmp_path / "a",
        tiny_qwen,
        world / "train",
        trainer={"enable_checkpointing": True, "callbacks": callbacks, "limit_val_batches": 0},
        max_steps=2,
    )
    assert first.trainer.global_step == 2 and (checkpoints / "last.ckpt").exists()
    saved = {k: v.clone() for k, v in first.model.backbone.hf.state_dict().items()}

    # export the step-2 checkpoint and compare with the weights in memory at step 2
    config = tmp_path / "a" / "config.yaml"
    out = load_tool("export_checkpoint").export(str(config), str(checkpoints / "last.ckpt"), str(tmp_path / "hf"))
    exported = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    assert all(torch.equal(exported[k], saved[k]) for k in saved if k in exported) and len(exported) > 10
    assert (out / TRAINED_PROMPT_FILE).exists()  # an SFT judge's export says so

    # resume to step 4: two more optimizer steps, logged at steps 2 and 3
    resumed = run(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=4",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}",
            f"--ckpt_path={checkpoints / 'last.ckpt'}",
        ]
    )
    assert resumed.trainer.global_step == 4
    steps = sorted({int(row["step"]) for row in metrics(tmp_path / "b") if row.get("train/loss")})
    assert steps == [2, 3]
    moved = [k for k, v in resumed.model.backbone.hf.state_dict().items() if not torch.equal(v, saved[k])]
    assert moved  # training went on from the saved weights


class BatchRecorder(Callback):
    """Appends [global step, sample ids] of every training batch to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step, batch["ids"]]) + "\n")


def last_skip_totals(log_dir) -> dict:
    totals = {}
    for row in metrics(log_dir):
        totals.update({k: v for k, v in row.items() if k.startswith("skipped/") and v})
    return totals


def test_a_resumed_run_trains_on_the_batches_of_the_uninterrupted_one(tiny_qwen, tmp_path):
    write_bad_shards(tmp_path / "shards")  # 20 usable samples: epochs of 5 batches of 4
    checkpoints = tmp_path / "ckpt"

    def train(name, max_steps, every=None):
        (tmp_path / name).mkdir()
        callbacks = [
            {
                "class_path": "tests.test_checkpoints.BatchRecorder",
                "init_args": {"path": str(tmp_path / f"{name}.jsonl")},
            }
        ]
        if every:
            callbacks.append(
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(checkpoints),
                        "filename": "{step}",
                        "every_n_train_steps": every,
                        "save_top_k": -1,
                    },
                }
            )
        trainer = {"enable_checkpointing": bool(every), "callbacks": callbacks, "limit_val_batches": 0}
        fit(
            tmp_path / name,
            tiny_qwen,
            tmp_path / "shards",
            trainer=trainer,
            max_steps=max_steps,
            num_workers=2,
            shuffle_buffer=8,
        )

    def batches(name):
        return [tuple(json.loads(line)) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    train("whole", 8)
    train("killed", 5, every=1)
    expected = batches("whole")
    assert [step for step, _ in expected] == list(range(8))
    assert batches("killed") == expected[:5]
    for step in (3, 5):  # mid-epoch, and at the end of the first epoch
        resumed = tmp_path / f"resumed{step}"
        config = yaml.safe_load((tmp_path / "killed" / "config.yaml").read_text())
        config["trainer"].update(
            max_steps=8,
            enable_checkpointing=False,
            callbacks=[
                {"class_path": "tests.test_checkpoints.BatchRecorder", "init_args": {"path": f"{resumed}.jsonl"}}
            ],
        )
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(resumed)
        (tmp_path / f"{resumed}.yaml").write_text(yaml.safe_dump(config))
        run(["fit", "--config", f"{resumed}.yaml", f"--ckpt_path={checkpoints / f'step={step}.ckpt'}"])
        assert batches(resumed.name) == expected[step:], f"resumed from step {step}"
        assert last_skip_totals(resumed) == last_skip_totals(tmp_path / "whole"), (
            "skip totals go on from the checkpoint's"
        )


def test_time_limit_checkpoints_at_a_step_boundary_requeues_and_the_job_resumes(
    tiny_qwen, world, tmp_path, monkeypatch
):
    scontrol = tmp_path / "bin" / "scontrol"  # records how it was called
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CAREVL_DEADLINE", str(time.time() + 60))  # inside the 15-minute margin already
    checkpoints, export = tmp_path / "ckpt", tmp_path / "hf"
    callbacks = [
        {
            "class_path": "carevl.callbacks.Checkpoints",
            "init_args": {"dirpath": str(checkpoints), "every_n_train_steps": 1000},
        },
        {"class_path": "carevl.callbacks.TimeLimit"},
        {"class_path": "carevl.callbacks.ExportHF", "init_args": {"dirpath": str(export)}},
    ]
    (tmp_path / "a").mkdir()
    trainer = {
        "enable_checkpointing": True,
        "callbacks": callbacks,
        "accumulate_grad_batches": 2,
        "limit_val_batches": 0,
    }
    first = fit(tmp_path / "a", tiny_qwen, world / "train", trainer=trainer, max_steps=5)
    assert first.trainer.global_step == 1, (
        "stopped at the first optimizer step (after two batches), not inside its window"
    )
    assert (checkpoints / "last.ckpt").resolve() == checkpoints / "epoch=0-step=1.ckpt", (
        "written once, under its step's name"
    )
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 1
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not export.exists(), "an unfinished model is not exported"

    monkeypatch.setenv("CAREVL_DEADLINE", str(time.time() + 86400))  # the requeued job starts with a fresh allocation
    resumed = run(["fit", "--config", str(tmp_path / "a" / "config.yaml"), "--ckpt_path=last"])
    assert resumed.trainer.global_step == 5 and export.exists()
    # no periodic save in the resumed run: its last step is saved as one, inside epoch 0 where
    # max_steps stopped it (not after Lightning closes the epoch), and last.ckpt moves to it
    assert (checkpoints / "last.ckpt").resolve() == checkpoints / "epoch=0-step=5.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]


def test_only_judge_training_marks_its_export_as_a_carevl_judge():
    from types import SimpleNamespace

    assert trains_a_judge(SimpleNamespace(kind="sft")) and trains_a_judge(SimpleNamespace(kind="preference_group"))
    assert not trains_a_judge(SimpleNamespace(kind="instruct"))  # the demo's pretraining of a base model
    assert not trains_a_judge(None)
