"""A callback for the two-process test: each rank writes how many training and validation batches it ran."""

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class CountBatches(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.counts = {"train": 0, "val": 0, "val_samples": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts["train"] += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.counts["val"] += 1
        self.counts["val_samples"] += len(batch["ids"])

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.counts, "world_size": trainer.world_size}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
