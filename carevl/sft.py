"""SFT of a judge: response-only cross-entropy on critiques that end in the verdict line."""

from __future__ import annotations

import math
import time

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from carevl.backbone import Backbone
from carevl.losses import sft_loss
from carevl.metrics import VerdictAccuracy
from carevl.prompts import parse_verdict


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class JudgeModule(LightningModule):
    """What SFT and DPO share: the backbone, AdamW with warmup + cosine, throughput and skip logging,
    and validation by generation (the judge writes its critique; the verdict is parsed from it).

    Args:
        backbone: the vision-language model to train.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of optimizer steps spent warming up.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        global_batch_size: the intended samples per optimizer step; a warning names the mismatch when
            batch size x devices x nodes x accumulate_grad_batches differs. None skips the check.
        val_generate: generate critiques on validation batches and log verdict accuracy.
        max_new_tokens: generation budget of a critique.
    """

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        global_batch_size: int | None = 64,
        val_generate: bool = True,
        max_new_tokens: int = 256,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.val_loss = MeanMetric()
        self.val_accuracy = VerdictAccuracy()
        self.skipped: dict[str, int] = {}
        self._last_batch_end: float | None = None

    def configure_model(self) -> None:
        self.backbone.build()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        want = self.hparams.global_batch_size
        datamodule = getattr(self.trainer, "datamodule", None)
        micro = getattr(datamodule, "batch_size", None)
        if want and micro:
            have = micro * self.trainer.world_size * self.trainer.accumulate_grad_batches
            if have != want:
                rank_zero_warn(
                    f"global batch is {have} (batch_size {micro} x {self.trainer.world_size} processes x "
                    f"accumulate_grad_batches {self.trainer.accumulate_grad_batches}), not global_batch_size {want}"
                )

    # -- logging shared by training steps ---------------------------------------------------------

    def count_skips(self, batch: dict) -> None:
        """Add the loader's skip counts carried by `batch` to the running totals (logged as skipped/<reason>)."""
        for reason, count in batch.pop("skipped", {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def log_skips(self) -> None:
        for reason, count in self.skipped.items():
            self.log(f"skipped/{reason}", float(count), rank_zero_only=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = float(batch["inputs"]["attention_mask"].sum())
            self.log("train/tokens_per_s", tokens / (now - self._last_batch_end), on_step=True)
        self._last_batch_end = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=True)

    # -- validation by generation ---------------------------------------------------------------

    def validate_verdicts(self, batch: dict) -> None:
        if not self.hparams.val_generate or "prompt_inputs" not in batch:
            return
        texts = self.backbone.generate(batch["prompt_inputs"], max_new_tokens=self.hparams.max_new_tokens, do_sample=False)
        self.val_accuracy.update([parse_verdict(t) for t in texts], batch["verdict_labels"])

    def on_validation_epoch_end(self) -> None:
        self.log_skips()
        if self.val_loss.update_called:
            self.log("val/loss", self.val_loss.compute(), prog_bar=True)
            self.val_loss.reset()
        if self.val_accuracy.update_called:
            self.log("val/verdict_accuracy", self.val_accuracy.compute(), prog_bar=True)
            self.log("val/unparseable", self.val_accuracy.unparseable.float())
            self.val_accuracy.reset()


class SFTJudge(JudgeModule):
    """Supervised fine-tuning on (image, question, two answers) -> critique + verdict.

    The loss is the token-mean cross-entropy of response tokens (per-sample `weight` honoured);
    prompt, image and padding tokens are masked out. Paper defaults: lr 1e-5, global batch 64,
    3 epochs, vision encoder frozen.
    """

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skips(batch)
        self.log_skips()
        logps, rows = self.backbone.response_logprobs(batch["inputs"])
        loss = sft_loss(logps, batch.get("weights"), rows)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.count_skips(batch)
        logps, rows = self.backbone.response_logprobs(batch["inputs"])
        self.val_loss.update(sft_loss(logps, batch.get("weights"), rows), weight=logps.numel())
        self.validate_verdicts(batch)
