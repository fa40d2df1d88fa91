"""Two real processes (DDP over gloo on CPU) train on unevenly sized shards: every rank runs the
same number of batches, nothing hangs, and validation scores every held-out sample once. The
multi-node launch recipes (torchrun, tools/slurm.sbatch) make the same two ranks, and a run resumed on
another number of processes ends its epochs where it would have."""

import json
from pathlib import Path

import pytest
import yaml

from carevl import schema
from carevl.standins import shapes
from tests.helpers import carevl


def test_two_processes_uneven_shards(tiny_qwen, world, tmp_path):
    # Shards of 9, 9, 9 and 2 samples: dealt round-robin, rank 0 holds 11 samples and rank 1 holds 18.
    with schema.ShardWriter(tmp_path / "train", prefix="u", max_count=9, kind="sft") as writer:
        for item in shapes.judge_items(29, seed=6):
            writer.write(schema.SFTSample(**item.fields(), target=item.critique(), source="t"))
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_epochs": 2,
            "precision": "32-true",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "tests.workers.ddp.CountBatches", "init_args": {"out_dir": str(tmp_path / "counts")}},
                {"class_path": "carevl.callbacks.Throughput", "init_args": {"window": 2, "peak_tflops": 1.0}},
            ],  # rank-local: no collective to hang on
        },
        "model": {
            "class_path": "carevl.sft.SFTJudge",
            "init_args": {
                "backbone": {"class_path": "carevl.backbone.Backbone", "init_args": {"model": tiny_qwen}},
                "lr": 1e-3,
                "max_new_tokens": 4,
            },
        },
        "data": {
            "class_path": "datamodules.JudgeDataModule",
            "init_args": {
                "train": str(tmp_path / "train"),
                "val": str(world / "heldout"),
                "batch_size": 3,
                "val_batch_size": 5,
                "num_workers": 1,
            },
        },
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    carevl("fit", path)
    counts = [json.loads((tmp_path / "counts" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 29 samples // (2 ranks x 3) = 4 batches per rank per epoch, 2 epochs.
    assert [c["train"] for c in counts] == [8, 8] and all(c["world_size"] == 2 for c in counts)
    # The held-out set (16 samples) is split between ranks: 8 each per validation, 2 validations.
    assert [c["val_samples"] for c in counts] == [16, 16] and counts[0]["val"] == counts[1]["val"]


def probe_config(
    tmp_path: Path,
    name: str,
    tiny_qwen: str,
    train: Path,
    devices: int = 2,
    max_steps: int = 3,
    accumulate: int = 1,
    callbacks: list = (),
) -> Path:
    """A DDP SFT run of the tiny model (batches of 2, no validation, no logger) whose ranks write
    what they ran to tmp_path/NAME (`tests.workers.ddp.CountBatches`); checkpointing is on when
    `callbacks` hold a checkpoint callback."""
    run = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": "ddp",
            "max_steps": max_steps,
            "accumulate_grad_batches": accumulate,
            "precision": "32-true",
            "logger": False,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "default_root_dir": str(tmp_path / name),
            "enable_checkpointing": any("Checkpoint" in callback["class_path"] for callback in callbacks),
            "callbacks": [
                {"class_path": "tests.workers.ddp.CountBatches", "init_args": {"out_dir": str(tmp_path / name)}},
                *callbacks,
            ],
        },
        "model": {
            "class_path": "carevl.sft.SFTJudge",
            "init_args": {
                "backbone": {"class_path": "carevl.backbone.Backbone", "init_args": {"model": tiny_qwen}},
                "lr": 1e-3,
                "val_generate": False,
            },
        },
        "data": {
            "class_path": "datamodules.JudgeDataModule",
            "init_args": {"train": str(train), "batch_size": 2, "num_workers": 0},
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def ranks(tmp_path: Path, name: str, devices: int = 2) -> list[dict]:
    """What each rank of run NAME wrote (`probe_config`)."""
    return [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(devices)]


def test_the_torchrun_and_slurm_recipes_make_two_nodes_that_train_as_two_local_processes_do(tiny_qwen, world, tmp_path):
    """The README's torchrun recipe (two nodes of one process, each its own torchrun, meeting at a
    c10d rendezvous) and tools/slurm.sbatch run as written (a stand-in `srun` starts its tasks on
    this machine with the variables srun sets) train on the same batches, to the same losses, as
    Lightning's own launch of two processes on one node."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT, environment, free_port

    def config(name: str) -> Path:
        return probe_config(tmp_path, name, tiny_qwen, world / "train")

    carevl("fit", config("local"))

    # torchrun, as the README writes it, once per node
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "-m",
                "carevl.cli",
                "fit",
                "--config",
                str(config("torchrun")),
                "--trainer.num_nodes",
                "2",
                "--trainer.devices",
                "1",
            ],
            cwd=ROOT,
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        assert node.wait(timeout=600) == 0, node.stderr.read()[-3000:]

    # tools/slurm.sbatch under `sbatch --nodes=2 --ntasks-per-node=1`
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(
        "#!/bin/bash\n# stand-in srun: the job's tasks on this machine, with the variables srun gives each\n"
        "tasks=$((SLURM_NNODES * SLURM_NTASKS_PER_NODE)); pids=()\n"
        "for ((i = 0; i < tasks; i++)); do\n"
        "  SLURM_NTASKS=$tasks SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) SLURM_NODEID=$((i / "
        "SLURM_NTASKS_PER_NODE)) "
        'SLURM_NODELIST=localhost SLURM_JOB_NAME=carevl "$@" & pids+=($!)\n'
        'done\nstatus=0; for pid in "${pids[@]}"; do wait $pid || status=1; done; exit $status\n'
    )
    srun.chmod(0o755)
    # submitted from outside the repository, with the environment carevl is installed in on PATH
    # (wherever it lives), as sbatch passes the submitting shell's environment to the job
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    slurm = environment(
        PATH=path, SLURM_JOB_ID="4243", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", MASTER_PORT=free_port()
    )
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "slurm.sbatch"), str(config("slurm"))],
        cwd=tmp_path,
        env=slurm,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    local, torchrun, srun_ = (ranks(tmp_path, name) for name in ("local", "torchrun", "slurm"))
    assert [r["num_nodes"] for r in local] == [1, 1]
    assert [(r["num_nodes"], r["node_rank"], r["environment"]) for r in torchrun] == [
        (2, 0, "TorchElasticEnvironment"),
        (2, 1, "TorchElasticEnvironment"),
    ]
    assert [(r["num_nodes"], r["node_rank"], r["environment"]) for r in srun_] == [
        (2, 0, "SLURMEnvironment"),
        (2, 1, "SLURMEnvironment"),
    ]
    for launched in (torchrun, srun_):
        for rank, expected in zip(launched, local):
            assert rank["world_size"] == 2 and rank["train"] == 3
            assert rank["ids"] == expected["ids"], "each rank reads the batches it reads on one node"
            assert rank["losses"] == pytest.approx(expected["losses"], rel=1e-6)
    assert local[0]["ids"] != local[1]["ids"] and local[0]["losses"] != local[1]["losses"]


def test_a_run_resumed_on_another_number_of_processes_goes_on_from_as_many_samples_into_its_epoch(tiny_qwen, tmp_path):
    """24 samples, batches of 2, global batch 4: an epoch is 6 optimizer steps on one process
    (accumulating 2 batches) or on two (1 each). A run stopped at step 5 of one process (10 of its
    12 batches) goes on with two processes for the epoch's last step; stopped at step 7 of two (1 of
    their 6 batches into epoch 1), it goes on with one process for the 10 batches that are left. The
    epochs end where an uninterrupted run's do, whichever way the world size changed. Each run ends
    mid-epoch at max_steps and saves there."""
    with schema.ShardWriter(tmp_path / "train", prefix="u", max_count=6, kind="sft") as writer:
        for item in shapes.judge_items(24, seed=6):
            writer.write(schema.SFTSample(**item.fields(), target=item.critique(), source="t"))

    def run(name: str, devices: int, steps: int, resume: str | None = None) -> list[dict]:
        checkpoints = {
            "class_path": "carevl.callbacks.Checkpoints",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1000},
        }
        path = probe_config(
            tmp_path,
            name,
            tiny_qwen,
            tmp_path / "train",
            devices,
            steps,
            accumulate=2 // devices,
            callbacks=[checkpoints],
        )
        log = carevl("fit", path, *([f"--ckpt_path={tmp_path / 'ckpt' / resume}"] if resume else []))
        assert "not resumable" not in log, "Lightning's warning is false for this loader"
        return ranks(tmp_path, name, devices)

    first = run("first", devices=1, steps=5)
    assert first[0]["epochs"] == [0] * 10
    grown = run("grown", devices=2, steps=7, resume="epoch=0-step=5.ckpt")
    # 10 batches of 2 samples were 5 of 2 x 2: one batch a rank ends epoch 0, one starts epoch 1.
    # Counted in batches, the epoch had started over (10 batches are past the 6 of two processes).
    assert [r["epochs"] for r in grown] == [[0, 1], [0, 1]]
    shrunk = run("shrunk", devices=1, steps=13, resume="epoch=1-step=7.ckpt")
    # 1 batch of 2 x 2 is 2 of 2: 10 of epoch 1's 12 are left (5 steps), then epoch 2 begins.
    # Counted in batches, 11 would have been left: 2 samples more, and a step out of step.
    assert shrunk[0]["epochs"] == [1] * 10 + [2] * 2
