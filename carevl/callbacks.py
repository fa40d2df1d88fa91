"""Lightning callbacks of carevl."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer


class ExportHF(Callback):
    """Write the trained backbone as a Hugging Face checkpoint (model + processor) when fit ends.

    Args:
        dirpath: output directory; `AutoModelForImageTextToText.from_pretrained(dirpath)` loads it.
        merge_lora: fold LoRA adapters into the weights (otherwise only the adapters are written).
    """

    def __init__(self, dirpath: str, merge_lora: bool = True):
        self.dirpath = dirpath
        self.merge_lora = merge_lora

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.backbone.export(self.dirpath, merge_lora=self.merge_lora)
        trainer.strategy.barrier("carevl-export")
