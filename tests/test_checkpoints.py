"""Saving, resuming and exporting training checkpoints (the CPU half of the scale-out recipe)."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from tests.test_training import fit, metrics

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_continues_from_the_saved_step_and_export_matches(tiny_qwen, world, tmp_path):
    checkpoints = tmp_path / "ckpt"
    (tmp_path / "a").mkdir()
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(checkpoints), "save_last": True, "every_n_train_steps": 2}}]
    first = fit(tmp_path / "a", tiny_qwen, world / "train", trainer={"enable_checkpointing": True, "callbacks": callbacks, "limit_val_batches": 0}, max_steps=2)
    assert first.trainer.global_step == 2 and (checkpoints / "last.ckpt").exists()
    saved = {k: v.clone() for k, v in first.model.backbone.hf.state_dict().items()}

    # export the step-2 checkpoint and compare with the weights in memory at step 2
    config = tmp_path / "a" / "config.yaml"
    out = load_tool("export_checkpoint").export(str(config), str(checkpoints / "last.ckpt"), str(tmp_path / "hf"))
    exported = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    assert all(torch.equal(exported[k], saved[k]) for k in saved if k in exported) and len(exported) > 10

    # resume to step 4: two more optimizer steps, logged at steps 2 and 3
    from carevl.cli import run

    resumed = run(["fit", "--config", str(config), "--trainer.max_steps=4", f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}", f"--ckpt_path={checkpoints / 'last.ckpt'}"])
    assert resumed.trainer.global_step == 4
    steps = sorted({int(row["step"]) for row in metrics(tmp_path / "b") if row.get("train/loss")})
    assert steps == [2, 3]
    moved = [k for k, v in resumed.model.backbone.hf.state_dict().items() if not torch.equal(v, saved[k])]
    assert moved  # training went on from the saved weights
