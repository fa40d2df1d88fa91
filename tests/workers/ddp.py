"""A callback for the multi-process tests: each rank writes what it ran (batch counts, the sample
ids, loss and epoch of every training batch) and how it was launched (world size, nodes, environment)."""

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class CountBatches(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.counts = {"train": 0, "val": 0, "val_samples": 0}
        self.ids, self.losses, self.epochs = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts["train"] += 1
        self.ids.append(list(batch["ids"]))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.epochs.append(trainer.current_epoch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.counts["val"] += 1
        self.counts["val_samples"] += len(batch["ids"])

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        launch = {
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "node_rank": trainer.node_rank,
            "environment": type(trainer.strategy.cluster_environment).__name__,
        }
        record = {**self.counts, **launch, "ids": self.ids, "losses": self.losses, "epochs": self.epochs}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
