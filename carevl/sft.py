"""SFT of a judge: response-only cross-entropy on critiques that end in the verdict line."""

from __future__ import annotations

import torch

from carevl.judge import JudgeModule
from carevl.losses import sft_loss


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

    def validation_loss(self, batch: dict) -> None:
        logps, rows = self.backbone.response_logprobs(batch["inputs"])
        self.val_loss.update(sft_loss(logps, batch.get("weights"), rows), weight=logps.numel())
