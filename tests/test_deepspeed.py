"""DeepSpeed ZeRO on CPU (DeepSpeed's CPU accelerator, one gloo process): the judge is built
inside Lightning's `zero.Init` context the way `carevl fit` builds it under
configs/strategies/zero3.yaml; the modules' training steps run through DeepSpeed's engine under
ZeRO-2 and ZeRO-3; ZeRO checkpoints resume and export; and `carevl fit` runs through Lightning's
DeepSpeed strategy with its CUDA checks lifted (tests/workers/cpu_deepspeed.py)."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.helpers import ROOT, carevl, environment, free_port, metrics, python_module


def test_zero3_loads_the_checkpoint_into_partitioned_weights_and_starts_lora_at_zero(tiny_qwen):
    env = environment(DS_ACCELERATOR="cpu")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "workers" / "zero3.py"), tiny_qwen, free_port()],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Every weight is a ZeRO-3 partition, and every checkpoint weight arrived intact.
    assert report["partitioned"] == report["parameters"]
    assert report["compared"] > 0 and report["equal"] == report["compared"]
    # Adapters start as a no-op (B = 0), so the policy starts at the reference.
    assert report["lora_b"] > 0 and report["lora_b_max"] == 0.0
    # One dtype for DeepSpeed's flat buffer: the adapters are bf16 like the model, not peft's float32.
    assert report["trainable_dtypes"] == [str(torch.bfloat16)]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_steps_train_what_is_trainable_against_their_references(tiny_qwen, world, tmp_path, stage):
    """DPO and SFT steps through DeepSpeed's engine (bf16, gradient checkpointing, the head in
    chunks of 7 under ZeRO-2 and whole under ZeRO-3, whose released head weight a recomputed chunk
    would find empty: with chunks there, the first backward fails)."""
    from carevl.standins.world import write_preference_groups

    write_preference_groups(str(tmp_path / "groups"), n=4, shard_size=4)
    env = environment(DS_ACCELERATOR="cpu")
    command = [
        sys.executable,
        str(ROOT / "tests" / "workers" / "zero_steps.py"),
        tiny_qwen,
        str(tmp_path / "groups"),
        str(world / "train"),
        str(stage),
        free_port(),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("dpo", "sft", "dpo_full", "dpo_copy"):
        run = report[name]
        assert run["finite"], run["losses"]
        assert run["head_chunk"] == (7 if stage == 2 else None)
        assert run["losses"][-1] < run["losses"][0]
        assert not run["moved_frozen"], "frozen weights (vision; the base under LoRA) stay put"
    for name in ("dpo", "sft"):
        assert report[name]["moved"] == report[name]["lora"] > 0 and not report[name]["moved_outside_lora"], (
            "the adapters train"
        )
    for name in ("dpo_full", "dpo_copy"):
        assert report[name]["moved"] == report[name]["trainable"] > 0, "every language-model weight trains"
    # The frozen copy: partitioned under ZeRO-3 (loaded again, with its own engine), never moved.
    assert report["dpo_copy"]["reference_partitioned"] == (stage == 3)
    assert not report["dpo_copy"]["reference_moved"]
    # The policy starts at its reference (adapters at zero; the precomputed log-probs of the same
    # weights in the same dtype), so the first DPO loss is log 2.
    assert report["dpo"]["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert report["dpo_full"]["losses"][0] == pytest.approx(math.log(2), abs=1e-3)
    assert report["dpo_copy"]["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    # Throughput's FLOP counts see whole weights, partitioned or not.
    from carevl.backbone import Backbone
    from carevl.flops import ModelFlops

    plain = Backbone(tiny_qwen, freeze_projector=True)
    plain.build()
    assert report["dpo_full"]["model_flops"] == dataclasses.asdict(ModelFlops.of(plain.hf))


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_resumes_exactly_and_exports_its_weights(tiny_qwen, world, tmp_path, stage):
    """A ZeRO checkpoint saved as Lightning saves one: a fresh engine loading it trains the next
    steps to the uninterrupted run's losses, and tools/export_checkpoint.py consolidates its shards
    into a Hugging Face checkpoint with the saved weights."""
    from transformers import AutoModelForImageTextToText

    from tests.helpers import load_tool

    env = environment(DS_ACCELERATOR="cpu")
    command = [
        sys.executable,
        str(ROOT / "tests" / "workers" / "zero_steps.py"),
        "checkpoint",
        tiny_qwen,
        str(world / "train"),
        str(stage),
        str(tmp_path),
        free_port(),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["client_step"] == 2
    assert report["resumed"] == report["uninterrupted"], "weights and optimizer state come back whole"
    assert report["uninterrupted"] != report["first"]

    config = sft_config(tiny_qwen, world, tmp_path, "export", f"zero{stage}", max_steps=2)  # the worker's model
    out = load_tool("export_checkpoint").export(str(config), str(tmp_path / "last.ckpt"), str(tmp_path / "hf"))
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    saved = torch.load(tmp_path / "step2.pt")  # the step-2 weights, gathered from the engine
    assert saved.keys() <= exported.keys() and len(saved) > 10
    different = [k for k in saved if not torch.equal(exported[k], saved[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("stage", [2, 3])
def test_carevl_fit_under_lightnings_deepspeed_trains_resumes_stops_in_time_and_exports(tiny_qwen, tmp_path, stage):
    """`carevl fit` through Lightning's DeepSpeed strategy (tests/workers/cpu_deepspeed.py lifts its CUDA
    checks) under ZeRO-2 and ZeRO-3 over two processes (under ZeRO-3 each holds half of every
    weight): full DPO against a frozen copy (under ZeRO-3 given its own engine in on_fit_start),
    Throughput logging MFU, ZeRO checkpoints saved and exported (by the tool, and by ExportHF from
    the gathered shards: the same weights), and a resume with TimeLimit past its deadline stopping
    at the next step with a checkpoint of it."""
    import time

    import yaml
    from transformers import AutoModelForImageTextToText

    from carevl.standins.world import write_preference_groups
    from tests.helpers import load_tool

    write_preference_groups(str(tmp_path / "groups"), n=8, shard_size=4)  # a shard per process
    checkpoints = tmp_path / "ckpt"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "precision": "bf16-mixed",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "strategy": {
                "class_path": "tests.workers.cpu_deepspeed.CPUDeepSpeed",
                "init_args": {"config": str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json")},
            },
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "run"},
            },
            "callbacks": [
                {"class_path": "carevl.callbacks.Throughput", "init_args": {"window": 1, "peak_tflops": 1.0}},
                {
                    "class_path": "carevl.callbacks.Checkpoints",
                    "init_args": {"dirpath": str(checkpoints), "every_n_train_steps": 2},
                },
                {"class_path": "carevl.callbacks.TimeLimit", "init_args": {"margin_minutes": 0}},
                {"class_path": "carevl.callbacks.ExportHF", "init_args": {"dirpath": str(tmp_path / "hf-callback")}},
            ],
        },
        "model": {
            "class_path": "carevl.dpo.DPOJudge",
            "init_args": {
                "backbone": {
                    "class_path": "carevl.backbone.Backbone",
                    "init_args": {
                        "model": tiny_qwen,
                        "dtype": "bfloat16",
                        "freeze_projector": True,
                        "gradient_checkpointing": True,
                    },
                },
                "reference": "copy",
                "beta": 0.1,
                "lr": 1e-3,
                "val_generate": False,
            },
        },
        "data": {
            "class_path": "datamodules.JudgeDataModule",
            "init_args": {
                "train": str(tmp_path / "groups"),
                "kind": "preference_group",
                "batch_size": 1,
                "num_workers": 0,
            },
        },
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))

    def fit(*arguments, **env):
        carevl("fit", path, *arguments, DS_ACCELERATOR="cpu", **env)

    # `carevl validate` (DeepSpeed's inference engine in Lightning; the copy prepared without a fit)
    carevl(
        "validate",
        path,
        f"--data.init_args.val={tmp_path / 'groups'}",
        "--trainer.limit_val_batches=1",
        "--trainer.logger.init_args.name=validate",
        DS_ACCELERATOR="cpu",
    )
    assert float(
        next(r for r in metrics(tmp_path / "logs" / "validate") if r.get("val/groups_loss"))["val/groups_loss"]
    ) == pytest.approx(math.log(2), abs=1e-4)

    def saved_step(checkpoint) -> int:
        assert len(list(checkpoint.glob("checkpoint/*optim_states.pt"))) == 2, "one optimizer partition per process"
        states = sorted(checkpoint.glob("checkpoint/*model_states.pt"))
        assert len(states) == (2 if stage == 3 else 1), "under ZeRO-3 the weights are partitioned too"
        return torch.load(states[0], map_location="cpu", weights_only=False)["global_step"]

    fit()
    assert saved_step(checkpoints / "last.ckpt") == 2
    rows = metrics(tmp_path / "logs" / "run")
    first = next(r for r in rows if r.get("train/loss"))
    assert int(first["step"]) == 0 and float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-4), (
        "the copy equals the starting policy"
    )
    assert any(r.get("train/mfu") for r in rows)

    # ExportHF gathered the shards: what it wrote equals the export of the step-2 checkpoint
    out = load_tool("export_checkpoint").export(str(path), str(checkpoints / "last.ckpt"), str(tmp_path / "hf"))
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    by_callback = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "hf-callback", dtype=torch.bfloat16
    ).state_dict()
    assert by_callback.keys() == exported.keys()
    assert all(torch.equal(by_callback[k], exported[k]) for k in exported), [
        k for k in exported if not torch.equal(by_callback[k], exported[k])
    ][:5]
    start = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.bfloat16).state_dict()
    language = [k for k in start if k.startswith("model.language_model.layers.")]
    vision = [k for k in start if k.startswith("model.visual.")]
    assert all(not torch.equal(exported[k], start[k]) for k in language if k.endswith("proj.weight")), (
        "the policy trained"
    )
    assert all(torch.equal(exported[k], start[k]) for k in vision), "the frozen vision tower did not"

    # resumed with its deadline already past: one more step, a checkpoint of it, and a stop (no export)
    (tmp_path / "hf-callback" / "config.json").unlink()
    fit(f"--ckpt_path={checkpoints / 'last.ckpt'}", "--trainer.max_steps=6", CAREVL_DEADLINE=str(time.time() - 1))
    assert saved_step(checkpoints / "last.ckpt") == 3
    assert not (tmp_path / "hf-callback" / "config.json").exists(), "a run stopped for its time limit is not exported"


def sft_config(
    tiny_qwen: str, world, tmp_path, name: str, deepspeed: str, max_steps: int, callbacks: list = (), devices: int = 2
):
    """An SFT run of bf16 weights under configs/deepspeed/DEEPSPEED.json on `devices` processes,
    logging every step to tmp_path/logs/NAME, with `callbacks` (checkpointing is on when they hold
    a checkpoint callback)."""
    import yaml

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "precision": "bf16-mixed",
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "strategy": {
                "class_path": "tests.workers.cpu_deepspeed.CPUDeepSpeed",
                "init_args": {"config": str(ROOT / "configs" / "deepspeed" / f"{deepspeed}.json")},
            },
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "callbacks": list(callbacks),
            "enable_checkpointing": any("Checkpoint" in callback["class_path"] for callback in callbacks),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": name},
            },
        },
        "model": {
            "class_path": "carevl.sft.SFTJudge",
            "init_args": {
                "backbone": {
                    "class_path": "carevl.backbone.Backbone",
                    "init_args": {"model": tiny_qwen, "dtype": "bfloat16", "gradient_checkpointing": True},
                },
                "lr": 1e-3,
                "weight_decay": 0.01,
                "val_generate": False,
            },
        },
        "data": {
            "class_path": "datamodules.JudgeDataModule",
            "init_args": {"train": str(world / "train"), "kind": "sft", "batch_size": 2, "num_workers": 0},
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses(tmp_path, name: str) -> dict[int, float]:
    """{step: train/loss} of run NAME."""
    return {
        int(row["step"]): float(row["train/loss"]) for row in metrics(tmp_path / "logs" / name) if row.get("train/loss")
    }


def test_an_offload_config_trains_as_its_stage_does(tiny_qwen, world, tmp_path):
    """configs/deepspeed/zero2_offload.json keeps the optimizer on the CPU, where DeepSpeed refuses a
    torch optimizer, so the judge steps with DeepSpeed's CPU Adam in AdamW mode (built on first
    use). Three SFT steps of bf16 weights then give ZeRO-2's own losses: the first exactly (no
    optimizer step yet), the later ones as closely as bf16 weights allow. The two Adams agree to
    float32 rounding, but the float32 master weights are cast to bf16 for the forward, and an
    update that lands near a rounding boundary moves a weight by one bf16 step (2^-8 relative) in
    one run and not in the other: seen as a 1.8e-5 relative loss difference on one machine, less
    on another. The tolerance, 1e-3, is a quarter of one bf16 step, and a tenth of what each step
    moves the loss. (zero3_offload runs stacked on configs/sft.yaml in tests/test_shipped_configs.py.)"""
    for name in ("zero2", "zero2_offload"):
        carevl("fit", sft_config(tiny_qwen, world, tmp_path, name, name, max_steps=3), DS_ACCELERATOR="cpu")
    plain, offloaded = losses(tmp_path, "zero2"), losses(tmp_path, "zero2_offload")
    assert sorted(plain) == sorted(offloaded) == [0, 1, 2]
    assert offloaded[0] == plain[0]
    for step in (1, 2):
        assert abs(plain[step] - plain[step - 1]) > 1e-2 * plain[step - 1], (
            "each step must move the loss past the tolerance"
        )
        assert offloaded[step] == pytest.approx(plain[step], rel=1e-3)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_resumes_on_another_number_of_processes_as_a_universal_checkpoint(
    tiny_qwen, world, tmp_path, stage
):
    """Two processes train four steps, keeping ZeRO checkpoints of steps 2 and 4. One process
    refuses the step-2 checkpoint, naming the conversion (DeepSpeed's own failure: under ZeRO-2 a
    refusal, under ZeRO-3 a tensor size mismatch). DeepSpeed's ds_to_universal converts it as the
    message says; two processes resuming from the universal checkpoint take the uninterrupted
    run's steps 2 and 3 exactly (weights and Adam moments come back whole), and one process resumes
    from it at step 2."""
    checkpoints = tmp_path / "ckpt"
    every_second = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(checkpoints), "every_n_train_steps": 2, "save_top_k": -1},
    }
    path = sft_config(tiny_qwen, world, tmp_path, "run", f"zero{stage}", max_steps=4, callbacks=[every_second])
    carevl("fit", path, DS_ACCELERATOR="cpu")
    uninterrupted = losses(tmp_path, "run")
    assert sorted(uninterrupted) == [0, 1, 2, 3]

    step2 = checkpoints / "epoch=0-step=2.ckpt"
    refused = carevl(
        "fit",
        path,
        f"--ckpt_path={step2}",
        "--trainer.devices=1",
        "--trainer.logger.init_args.name=refused",
        DS_ACCELERATOR="cpu",
        fails=True,
    )
    message = refused[refused.index("was saved by 2 processes") :]
    command = message[message.index("python -m ") :].splitlines()[0].split()
    assert command[:3] == ["python", "-m", "deepspeed.checkpoint.ds_to_universal"]
    universal = message.split("--ckpt_path ")[1].split()[0]

    python_module(*command[2:], DS_ACCELERATOR="cpu")
    carevl(
        "fit",
        path,
        f"--ckpt_path={universal}",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger.init_args.name=universal",
        DS_ACCELERATOR="cpu",
    )
    assert losses(tmp_path, "universal") == {2: uninterrupted[2], 3: uninterrupted[3]}

    carevl(
        "fit",
        path,
        f"--ckpt_path={universal}",
        "--trainer.devices=1",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger.init_args.name=one",
        DS_ACCELERATOR="cpu",
    )
    one = losses(tmp_path, "one")
    assert sorted(one) == [2, 3] and all(math.isfinite(v) for v in one.values())


def test_a_run_killed_while_saving_resumes_from_the_complete_checkpoint_before(tiny_qwen, world, tmp_path):
    """carevl.callbacks.Checkpoints under ZeRO-2, where a checkpoint is a directory of files: the
    process dies right after the first file of its step-4 checkpoint (tests/workers/kill.py).
    `last.ckpt` still links to step 2, complete, and `--ckpt_path=last` trains steps 2 to 5 to the
    uninterrupted run's losses, removing the cut-short directory first. (Lightning's
    save_last=True killed the same way, during its second write over last.ckpt, resumed at step 4
    with step 2's optimizer state, without an error.)"""
    checkpoints = tmp_path / "ckpt"
    periodic = {
        "class_path": "carevl.callbacks.Checkpoints",
        "init_args": {"dirpath": str(checkpoints), "every_n_train_steps": 2},
    }
    carevl(
        "fit",
        sft_config(tiny_qwen, world, tmp_path, "whole", "zero2", max_steps=6, callbacks=[periodic], devices=1),
        DS_ACCELERATOR="cpu",
    )
    whole = losses(tmp_path, "whole")
    assert sorted(whole) == [0, 1, 2, 3, 4, 5]
    assert (checkpoints / "last.ckpt").resolve().name == "epoch=0-step=6.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=0-step=4.ckpt",
        "epoch=0-step=6.ckpt",
        "last.ckpt",
    ], "the two newest are kept"

    shutil.rmtree(checkpoints)
    dies = {"class_path": "tests.workers.kill.DieWhileSaving", "init_args": {"after_files": 3}}  # step 2 writes 2 files
    carevl(
        "fit",
        sft_config(tiny_qwen, world, tmp_path, "killed", "zero2", max_steps=6, callbacks=[periodic, dies], devices=1),
        DS_ACCELERATOR="cpu",
        fails=True,
    )
    assert (checkpoints / "epoch=0-step=4.ckpt").is_dir(), "the save was cut short"
    assert (checkpoints / "last.ckpt").resolve().name == "epoch=0-step=2.ckpt"

    carevl(
        "fit",
        sft_config(tiny_qwen, world, tmp_path, "resumed", "zero2", max_steps=6, callbacks=[periodic], devices=1),
        "--ckpt_path=last",
        DS_ACCELERATOR="cpu",
    )
    assert losses(tmp_path, "resumed") == {step: whole[step] for step in (2, 3, 4, 5)}
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=0-step=4.ckpt",
        "epoch=0-step=6.ckpt",
        "last.ckpt",
    ], "the cut-short save was removed and made again"
