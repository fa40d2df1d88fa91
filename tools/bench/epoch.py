"""What the training benchmarks share: one timed epoch of a carevl module under Lightning, the
samples of a shard set, and the process's peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_samples(shards: Path, kind: str) -> Iterator:
    """Every sample of a shard set, decoded (`carevl.schema`), in shard order."""
    import webdataset as wds

    from carevl import schema

    for url in schema.read_manifest(shards)["urls"]:
        for raw in wds.WebDataset(url, shardshuffle=False):
            yield schema.decode(raw, kind)


def timed_epoch(module, data, callbacks: list | None = None) -> float:
    """Seconds of one epoch of `module` on `data`, from `on_train_start` to `on_train_end` (its
    loaders and steps; the model is built before), fp32 on CPU, bf16 on a GPU."""
    import torch
    from lightning import Callback, Trainer

    class EpochTimer(Callback):
        def on_train_start(self, trainer, module) -> None:
            self.start = time.perf_counter()

        def on_train_end(self, trainer, module) -> None:
            self.seconds = time.perf_counter() - self.start

    timer = EpochTimer()
    gpu = torch.cuda.is_available()
    trainer = Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        max_epochs=1,
        precision="bf16-mixed" if gpu else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, *(callbacks or [])],
    )
    trainer.fit(module, data)
    return timer.seconds
