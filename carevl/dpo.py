"""DPO of a judge on preference groups (one chosen critique against one or more rejected ones),
against a frozen reference.

Each group's image is encoded once per step (Qwen2-VL family: the features are handed to every
sequence of the group and to the reference pass) and all critiques of a batch are scored in one
forward. The reference comes in three modes:

- ``copy``: a frozen copy of the starting model (eval mode, no gradients, never optimised; held
  outside the module's parameters, so it is neither trained nor saved in checkpoints). Under
  DeepSpeed ZeRO-3 the copy is the checkpoint loaded again, partitioned like the policy, with its
  own DeepSpeed inference engine to gather its weights for each forward (TRL's arrangement),
  started at the first fit or validation;
- ``lora_disabled``: the trained model itself with its LoRA adapters switched off (LoRA only);
- ``precomputed``: log-probs computed once by ``python tools/reference_logps.py`` and stored beside the
  shards; training loads no reference weights at all.
"""

from __future__ import annotations

import copy

import torch
from torchmetrics import MeanMetric

from carevl.backbone import Backbone
from carevl.encoding import IGNORE_INDEX
from carevl.judge import JudgeModule
from carevl.losses import dpo_group_loss
from carevl.strategies import deepspeed_config, sharded_strategy, zero_stage

REFERENCE_MODES = ("copy", "lora_disabled", "precomputed")
VALIDATION_STATS = ("loss", "reward_accuracy", "chosen_beats_all", "margin")


class DPOJudge(JudgeModule):
    """DPO on Best-to-Worse groups. Paper defaults: beta 0.01, lr 1e-6, global batch 64 groups, 2 epochs.

    Args:
        backbone: the SFT judge to train.
        reference: "copy" (a frozen copy of the starting model; under ZeRO-3 loaded again and
            partitioned), "lora_disabled" (this model with
            its LoRA adapters off) or "precomputed" (log-probs written beside the shards by
            `python tools/reference_logps.py`; no reference weights are loaded).
        beta: DPO temperature.
        nll_weight: weight of an added token-mean NLL term on the chosen critiques (0 turns it off).
        lr: peak learning rate.
        pack_prompts: compute each group's image and prompt tokens once for all its critiques, in one
            row with a block attention mask (Qwen2-VL; other families score each critique in full).
        **kwargs: the other `JudgeModule` arguments (schedule, validation, evaluation).
    """

    def __init__(
        self,
        backbone: Backbone,
        reference: str = "copy",
        beta: float = 0.01,
        nll_weight: float = 0.0,
        lr: float = 1e-6,
        pack_prompts: bool = True,
        **kwargs,
    ):
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
        super().__init__(backbone, lr=lr, **kwargs)
        self.save_hyperparameters(ignore=["backbone"])
        object.__setattr__(self, "_reference", None)  # not a submodule: never optimised, never checkpointed
        self.val_groups = torch.nn.ModuleDict({name: MeanMetric() for name in VALIDATION_STATS})

    def configure_model(self) -> None:
        super().configure_model()
        mode = self.hparams.reference
        if mode == "lora_disabled" and self.backbone.lora is None:
            raise ValueError("reference 'lora_disabled' needs LoRA on the backbone (backbone.init_args.lora)")
        if mode == "copy" and self._reference is None:
            strategy = getattr(self._trainer, "strategy", None)
            if (
                zero_stage(deepspeed_config(strategy)) == 3
            ):  # partitioned as it loads; prepare_reference gives it an engine
                object.__setattr__(self, "_reference", self.backbone.load_frozen())
                return
            sharded = sharded_strategy(strategy)
            if sharded:
                raise ValueError(
                    f"reference 'copy' does not work under {sharded}: the copy would be taken from parameters that are "
                    "already sharded, and nothing would gather them for its forward (Lightning issue #17319). Use "
                    "reference 'precomputed' (python tools/reference_logps.py) or 'lora_disabled' instead."
                )
            # the policy's dtypes too (float32 where its weights train, `Backbone.build`): the same
            # computation, so the first loss is exactly log 2
            reference = copy.deepcopy(self.backbone.hf).eval()
            reference.requires_grad_(False)
            if self.backbone.compile_layers:
                # deepcopy drops the compiled forward: the copy's layers get their own
                self.backbone.compile_decoder_layers(reference)
            object.__setattr__(self, "_reference", reference)

    @property
    def reference_model(self) -> torch.nn.Module | None:
        return self._reference

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.prepare_reference()

    def on_validation_start(self) -> None:
        self.prepare_reference()  # `carevl validate` has no fit start

    def prepare_reference(self) -> None:
        """Put the copy reference where it runs: on the device, or under ZeRO-3 in its engine (once)."""
        if self._reference is None:
            return
        config = deepspeed_config(self.trainer.strategy)
        if zero_stage(config) != 3:
            self._reference.to(self.device)
        elif getattr(self, "_reference_engine", None) is None:
            self.start_reference_engine(config)

    def start_reference_engine(self, config: dict) -> None:
        """A DeepSpeed inference engine (no optimizer) around the partitioned reference: its hooks
        gather each module's weights for the forward and free them after, as for the policy."""
        import deepspeed

        settings = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
        settings.setdefault("train_micro_batch_size_per_gpu", 1)
        engine, *_ = deepspeed.initialize(model=self._reference, config=settings)
        engine.eval()
        object.__setattr__(self, "_reference_engine", engine)

    def step_work(self, batch: dict) -> tuple[dict[str, float], bool]:
        packed = self.hparams.pack_prompts and self.backbone.packs_group(batch)
        return batch["packed_work" if packed else "work"], self.hparams.reference in ("copy", "lora_disabled")

    # -- scoring --------------------------------------------------------------------------------

    def reference_logprobs(self, batch: dict, features: list[torch.Tensor] | None) -> torch.Tensor:
        mode = self.hparams.reference
        if mode == "precomputed":
            if "reference_logps" not in batch:
                raise ValueError(
                    "reference 'precomputed' needs reference-logps.json beside the shards: run python "
                    "tools/reference_logps.py"
                )
            return batch["reference_logps"].to(self.device)
        with torch.no_grad():
            if mode == "lora_disabled":
                with self.backbone.model.disable_adapter():
                    return self.backbone.group_logprobs(batch, features, pack=self.hparams.pack_prompts)
            # The copy's vision tower equals the policy's only while it is frozen, projector included.
            shared = features if not any(p.requires_grad for p in self.backbone.hf.model.visual.parameters()) else None
            if shared is None and features is not None:
                shared = self.backbone.image_features(batch["inputs"], model=self._reference)
            return self.backbone.group_logprobs(batch, shared, model=self._reference, pack=self.hparams.pack_prompts)

    def group_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.backbone.image_features(batch["inputs"])
        policy = self.backbone.group_logprobs(batch, features, pack=self.hparams.pack_prompts)
        reference = self.reference_logprobs(batch, features)
        chosen, rejected = batch["chosen_index"], batch["rejected_index"]
        loss, stats = dpo_group_loss(
            policy[chosen],
            policy[rejected],
            reference[chosen],
            reference[rejected],
            batch["rejected_group"],
            self.hparams.beta,
        )
        if self.hparams.nll_weight:
            tokens = (batch["inputs"]["labels"][chosen] != IGNORE_INDEX).sum(dim=1).clamp_min(1)
            nll = -(policy[chosen] / tokens).mean()
            stats["nll"] = nll.detach()
            loss = loss + self.hparams.nll_weight * nll
        return loss, stats

    # -- steps ----------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skips(batch)
        self.log_skips()
        loss, stats = self.group_step(batch)
        groups = len(batch["ids"])
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=groups)
        for name, value in stats.items():
            if name != "pair_losses":
                self.log(f"train/{name}", value, on_step=True, batch_size=groups, prog_bar=name == "reward_accuracy")
        return loss

    def validate_groups(self, batch: dict) -> None:
        """On held-out preference groups: the DPO loss, reward accuracy, chosen-beats-all and margin."""
        loss, stats = self.group_step(batch)
        pairs = len(batch["rejected_index"])
        for name in VALIDATION_STATS:
            self.val_groups[name].update(loss if name == "loss" else stats[name], weight=pairs)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_groups.items():
            if metric.update_called:
                self.log(f"val/groups_{name}", metric.compute(), prog_bar=name == "margin")
                metric.reset()
        super().on_validation_epoch_end()
