"""carevl's FSDP strategy (configs/strategies/fsdp.yaml) over two CPU processes (gloo), with
torch's refusal of a CPU compute device lifted (tests/workers/cpu_fsdp.py): each process holds half of every
flat parameter, and training must do exactly what DDP does on the same data. The head runs in
chunks recomputed in the backward pass, which under FSDP meets the root unit's weights (kept whole
between forward and backward)."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from carevl.standins.world import write_preference_groups
from tests.helpers import carevl, metrics

FSDP = {
    "class_path": "tests.workers.cpu_fsdp.CPUFSDP",
    "init_args": {"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
}


def config(
    tmp_path: Path,
    name: str,
    strategy,
    model: dict,
    data: dict,
    steps: int,
    save_every: int | None = None,
    precision: str = "32-true",
    clip: float | None = None,
) -> Path:
    """A two-process CPU run, in float32 by default (DDP and FSDP then compute the same numbers),
    logging every step to tmp_path/logs/NAME, saving to tmp_path/NAME-ckpt every `save_every` steps
    and exporting to tmp_path/NAME-hf at the end; `clip`: the gradient norm clipped to."""
    callbacks = [
        {"class_path": "carevl.callbacks.Throughput", "init_args": {"window": 1, "peak_tflops": 1.0}},
        {"class_path": "carevl.callbacks.ExportHF", "init_args": {"dirpath": str(tmp_path / f"{name}-hf")}},
    ]
    if save_every:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(tmp_path / f"{name}-ckpt"),
                    "save_last": True,
                    "every_n_train_steps": save_every,
                    "save_top_k": -1,
                },
            }
        )
    run = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": strategy,
            "precision": precision,
            "gradient_clip_val": clip,
            "max_steps": steps,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "enable_checkpointing": bool(save_every),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": name},
            },
            "callbacks": callbacks,
        },
        "model": model,
        "data": {"class_path": "datamodules.JudgeDataModule", "init_args": {**data, "num_workers": 0}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def logged(tmp_path: Path, name: str, metric: str) -> dict[int, float]:
    """{step: value} of one logged metric of run NAME."""
    return {int(row["step"]): float(row[metric]) for row in metrics(tmp_path / "logs" / name) if row.get(metric)}


def flops_per_token(tmp_path: Path, name: str) -> float:
    flops, tokens = logged(tmp_path, name, "train/tflops_per_s"), logged(tmp_path, name, "train/tokens_per_s")
    return sum(flops[s] * 1e12 / tokens[s] for s in flops) / len(flops)


def test_fsdp_trains_as_ddp_does_resumes_from_its_sharded_checkpoint_and_exports(tiny_qwen, world, tmp_path):
    """FSDP's losses are DDP's; its sharded checkpoint resumes on two processes to the saved run's
    losses and on one process to what DDP's checkpoint of the same step gives there
    (torch.distributed.checkpoint re-shards); its exports are DDP's."""
    from transformers import AutoModelForImageTextToText

    from tests.helpers import load_tool

    backbone = {
        "class_path": "carevl.backbone.Backbone",
        "init_args": {"model": tiny_qwen, "gradient_checkpointing": True, "logit_chunk": 16},
    }
    model = {
        "class_path": "carevl.sft.SFTJudge",
        "init_args": {"backbone": backbone, "lr": 1e-3, "val_generate": False},
    }
    data = {"train": str(world / "train"), "kind": "sft", "batch_size": 2}
    # Clipped hard (as configs/strategies/fsdp.yaml clips, at 1.0): under FSDP the norm is taken
    # across both ranks' shards, so the steps stay DDP's.
    ddp = config(tmp_path, "ddp", "ddp", model, data, steps=4, save_every=2, clip=0.1)
    fsdp = config(tmp_path, "fsdp", FSDP, model, data, steps=4, save_every=2, clip=0.1)
    carevl("fit", ddp)
    carevl("fit", fsdp)
    unsaved = ("--trainer.enable_checkpointing=false", "--trainer.callbacks=[]")
    carevl(
        "fit",
        fsdp,
        f"--ckpt_path={tmp_path / 'fsdp-ckpt' / 'epoch=0-step=2.ckpt'}",
        "--trainer.logger.init_args.name=resumed",
        *unsaved,
    )
    for name, path in (("ddp", ddp), ("fsdp", fsdp)):  # on one process: another world size
        carevl(
            "fit",
            path,
            f"--ckpt_path={tmp_path / f'{name}-ckpt' / 'epoch=0-step=2.ckpt'}",
            "--trainer.devices=1",
            f"--trainer.logger.init_args.name={name}-alone",
            *unsaved,
        )

    losses = {
        name: logged(tmp_path, name, "train/loss") for name in ("ddp", "fsdp", "resumed", "ddp-alone", "fsdp-alone")
    }
    assert sorted(losses["ddp"]) == [0, 1, 2, 3] and len(set(losses["ddp"].values())) == 4
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5), "sharded training takes DDP's steps"
    assert sorted(losses["resumed"]) == [2, 3]
    assert losses["resumed"] == pytest.approx({s: losses["fsdp"][s] for s in (2, 3)}, rel=1e-5), (
        "the resumed run continues the saved one"
    )
    assert sorted(losses["fsdp-alone"]) == [2, 3] and losses["fsdp-alone"][3] != losses["fsdp"][3], (
        "one process reads other batches"
    )
    assert losses["fsdp-alone"] == pytest.approx(losses["ddp-alone"], rel=1e-5), (
        "the sharded checkpoint resumes on another world size"
    )
    assert flops_per_token(tmp_path, "fsdp") == pytest.approx(flops_per_token(tmp_path, "ddp"), rel=1e-6), (
        "FLOPs are counted on whole weights, not on a rank's shard"
    )

    export = load_tool("export_checkpoint").export
    exported = {
        name: AutoModelForImageTextToText.from_pretrained(
            export(str(path), str(tmp_path / f"{name}-ckpt" / "last.ckpt"), str(tmp_path / f"hf-{name}"))
        ).state_dict()
        for name, path in (("ddp", ddp), ("fsdp", fsdp))
    }
    start = AutoModelForImageTextToText.from_pretrained(tiny_qwen).state_dict()
    assert exported["fsdp"].keys() == exported["ddp"].keys() == start.keys()
    for key, weight in exported["fsdp"].items():
        assert torch.allclose(weight, exported["ddp"][key], atol=1e-5), key
    by_callback = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "fsdp-hf"
    ).state_dict()  # ExportHF gathered the shards
    assert by_callback.keys() == exported["fsdp"].keys()
    assert all(torch.equal(by_callback[k], exported["fsdp"][k]) for k in by_callback)
    language = [k for k in start if k.startswith("model.language_model.layers.") and k.endswith("proj.weight")]
    assert language and all(not torch.equal(exported["fsdp"][k], start[k]) for k in language), (
        "the language model trained"
    )
    assert all(
        torch.equal(exported["fsdp"][k], start[k])
        for k in start
        if k.startswith("model.visual.") and not k.startswith("model.visual.merger.")
    ), "the frozen vision tower did not"


def test_fsdp_dpo_against_the_adapters_off_reference_takes_ddps_steps_and_trains_bf16_weights(tiny_qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    write_preference_groups(str(tmp_path / "groups"), n=12, shard_size=6)  # a shard per process
    backbone = {
        "class_path": "carevl.backbone.Backbone",
        "init_args": {
            "model": tiny_qwen,
            "freeze_projector": True,
            "gradient_checkpointing": True,
            "logit_chunk": 16,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        },
    }
    model = {
        "class_path": "carevl.dpo.DPOJudge",
        "init_args": {
            "backbone": backbone,
            "reference": "lora_disabled",
            "beta": 0.1,
            "lr": 1e-2,
            "val_generate": False,
        },
    }
    data = {"train": str(tmp_path / "groups"), "kind": "preference_group", "batch_size": 1}
    for name, strategy in (("ddp", "ddp"), ("fsdp", FSDP)):
        carevl("fit", config(tmp_path, name, strategy, model, data, steps=3))
    ddp, fsdp = (logged(tmp_path, name, "train/loss") for name in ("ddp", "fsdp"))
    assert sorted(fsdp) == [0, 1, 2]
    assert fsdp[0] == pytest.approx(math.log(2), abs=1e-6), "LoRA starts at the reference"
    assert fsdp[2] != pytest.approx(fsdp[0], abs=1e-4), "the adapters trained"
    assert fsdp == pytest.approx(ddp, rel=1e-5)

    # The configs' setting: weights loaded in bfloat16, bf16-mixed. FSDP holds them all in float32
    # (a shard unit flattens one dtype: LoRA's float32 adapters beside a bf16 base failed to wrap).
    half = {**backbone, "init_args": {**backbone["init_args"], "dtype": "bfloat16"}}
    carevl(
        "fit",
        config(
            tmp_path,
            "bf16",
            FSDP,
            {**model, "init_args": {**model["init_args"], "backbone": half}},
            data,
            steps=3,
            precision="bf16-mixed",
        ),
    )
    losses = logged(tmp_path, "bf16", "train/loss")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[2] != pytest.approx(losses[0], abs=1e-4)
    exported = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "bf16-hf"
    )  # ExportHF: adapters merged, in the configured dtype
    start = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.bfloat16).state_dict()
    weights = exported.state_dict()
    assert exported.dtype == torch.bfloat16 and weights.keys() == start.keys()
    assert any(not torch.equal(weights[k], start[k]) for k in start if k.startswith("model.language_model.layers.")), (
        "the merged adapters trained"
    )
