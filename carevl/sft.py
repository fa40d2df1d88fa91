"""SFT of a judge: response-only cross-entropy on critiques that end in the verdict line."""

from __future__ import annotations

import torch

from carevl.backbone import Backbone
from carevl.judge import JudgeModule
from carevl.losses import sft_loss
from carevl.packing import use_varlen_attention


class SFTJudge(JudgeModule):
    """Supervised fine-tuning on (image, question, two answers) -> critique + verdict.

    The loss is the token-mean cross-entropy of response tokens (per-sample `weight` honoured);
    prompt, image and padding tokens are masked out. Paper defaults: lr 1e-5, global batch 64,
    3 epochs, vision encoder frozen.

    Args:
        backbone: the vision-language model to train.
        pack_samples: padding-free steps: each batch's samples run end to end in one row, each
            with its own positions and no attention across samples (`carevl.packing`; Qwen2-VL
            family). The loss is the padded one; the compute is the samples' tokens, not the
            batch size times the longest. Attention stays within each sample: FlashAttention's
            variable-length kernels, or one SDPA call per sample (`carevl.packing.varlen_sdpa`,
            switched on here for a language model on SDPA); eager attention masks the whole row.
        **kwargs: the other `JudgeModule` arguments (schedule, validation, evaluation).
    """

    def __init__(self, backbone: Backbone, pack_samples: bool = False, **kwargs):
        super().__init__(backbone, **kwargs)
        self.save_hyperparameters(ignore=["backbone"])
        self.pack_samples = pack_samples

    def configure_model(self) -> None:
        super().configure_model()
        if self.pack_samples:
            use_varlen_attention(self.backbone.hf)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skips(batch)
        self.log_skips()
        logps, rows = self.backbone.response_logprobs(batch["inputs"], packed=self.pack_samples)
        loss = sft_loss(logps, batch.get("weights"), rows)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["ids"]))
        return loss

    def validation_loss(self, batch: dict) -> None:
        logps, rows = self.backbone.response_logprobs(batch["inputs"], packed=self.pack_samples)
        self.val_loss.update(sft_loss(logps, batch.get("weights"), rows), weight=logps.numel())
