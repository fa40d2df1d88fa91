"""The judge LightningModule that SFT, DPO and evaluation share (`carevl.sft`, `carevl.dpo`).

A judge reads an image, a question and two answers and writes a critique ending in the verdict
line. What every judge module does the same way lives here: the backbone, AdamW with warmup and a
cosine decay, the loader's skip counts, the stop at a non-finite loss, validation by generation
(the critique is written, its verdict parsed) and benchmark evaluation (VL-RewardBench,
MLLM-as-a-Judge) in validation and in `carevl test`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning import LightningModule
from torchmetrics import MeanMetric

from carevl import benchmarks
from carevl.backbone import Backbone
from carevl.backends.interface import ChatModel, Sampling
from carevl.evaluation import (
    MODES,
    BenchmarkEvaluation,
    markdown_table,
    score_verdicts,
    write_predictions,
    write_results,
)
from carevl.metrics import CategoryVerdictAccuracy, ExactMatch, VerdictAccuracy
from carevl.prompts import parse_verdict
from carevl.strategies import deepspeed_config, float32_weights, is_fsdp, offloads_optimizer, sharded_strategy

# The module arguments that decide benchmark verdicts, recorded in results.json.
RESULT_SETTINGS = (
    "eval_mode",
    "eval_runs",
    "eval_sample",
    "eval_temperature",
    "eval_top_p",
    "unparseable",
    "max_new_tokens",
)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class JudgeModule(LightningModule):
    """What SFT and DPO share: the backbone, AdamW with warmup + cosine, skip logging, the non-finite loss guard,
    validation by generation (the judge writes its critique; the verdict is parsed from it) on judge
    samples, and benchmark evaluation (VL-RewardBench, MLLM-as-a-Judge) on benchmark shards, in
    validation during training and in `carevl test`.

    Args:
        backbone: the vision-language model to train.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of optimizer steps spent warming up.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        val_generate: generate on validation batches: critiques of judge samples, scored by their
            parsed verdicts (`val/verdict_accuracy`), and outputs of instruction samples, scored by
            exact match with the target (`val/exact_match`: e.g. whether pretraining has taught
            the shapes world's quoting task).
        max_new_tokens: generation budget of a critique.
        val_categories: categories of held-out judge samples (their `meta.category`, e.g. the shapes
            world's "coarse" and "fine" questions) whose verdict accuracy is also logged apart, as
            `val/verdict_accuracy/<category>`; a sample of another category is an error.
        eval_mode: how benchmark batches (validation or `carevl test`) get verdicts: "generate"
            (the critique is written, then parsed: the reference) or "score" (the verdict line most
            likely right after the prompt: a fast proxy).
        eval_runs: generation runs whose benchmark metrics are averaged (the paper uses 5, sampled).
        eval_sample: sample critiques (temperature, top_p) instead of greedy decoding.
        eval_temperature: sampling temperature.
        eval_top_p: nucleus sampling mass.
        unparseable: benchmark policy for outputs without a verdict: "wrong", "exclude" or "random".
        results_dir: where benchmark results (results.md, results.json) and per-record predictions
            (JSONL) are written; defaults to the logger's directory.
    """

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        val_generate: bool = True,
        max_new_tokens: int = 256,
        val_categories: list[str] | None = None,
        eval_mode: str = "generate",
        eval_runs: int = 1,
        eval_sample: bool = False,
        eval_temperature: float = 1.0,
        eval_top_p: float = 1.0,
        unparseable: str = "wrong",
        results_dir: str | None = None,
    ):
        super().__init__()
        if eval_mode not in MODES:
            raise ValueError(f"eval_mode must be one of {MODES}, got {eval_mode!r}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.val_loss = MeanMetric()
        self.val_accuracy = VerdictAccuracy()
        self.val_by_category = CategoryVerdictAccuracy(val_categories) if val_categories else None
        self.val_exact = ExactMatch()
        self.val_verdicts: list[dict] = []  # per held-out item, for paired comparisons of judges
        self.benchmark_eval = BenchmarkEvaluation(eval_runs, unparseable)
        self.skipped: dict[str, int] = {}
        self.benchmark_order: str | None = None  # how benchmark answers were shown (read from the batches)

    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer else None
        sharded = sharded_strategy(strategy)
        if self.backbone.compile_layers and sharded:
            raise ValueError(
                f"compile_layers does not work under {sharded}: parameters are gathered by hooks around every "
                "submodule, which split the compiled layers apart. Use DDP or DeepSpeed ZeRO-2, or set "
                "compile_layers: false."
            )
        fitting = (
            getattr(getattr(self._trainer, "state", None), "fn", None) == "fit"
        )  # evaluation and export keep the configured dtype
        self.backbone.build(
            deepspeed_config=deepspeed_config(strategy),
            float32_weights=float32_weights(strategy) if fitting else "none",
        )

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if offloads_optimizer(deepspeed_config(self.trainer.strategy)):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # AdamW on the CPU (built on first use)

            optimizer = DeepSpeedCPUAdam(
                params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP the gradient norm must be taken across every rank's shards, which only the
        root FSDP module can do (Lightning's FSDP precision plugin refuses to clip by norm)."""
        if gradient_clip_val and is_fsdp(self.trainer.strategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"under FSDP gradients are clipped by their norm, not by {gradient_clip_algorithm!r}")
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )

    # -- logging shared by training steps ---------------------------------------------------------

    def count_skips(self, batch: dict) -> None:
        """Add the loader's skip counts carried by `batch` to the running totals (logged as skipped/<reason>)."""
        for reason, count in batch.pop("skipped", {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def log_skips(self) -> None:
        for reason, count in self.skipped.items():
            self.log(f"skipped/{reason}", float(count), rank_zero_only=True)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._batch_ids = batch.get("ids", [])

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss, on every rank at once, before its backward pass: the
        optimizer never steps on it, so no NaN reaches the weights or a later checkpoint."""
        nonfinite = self.trainer.strategy.reduce((~torch.isfinite(loss.detach())).float(), reduce_op="sum")
        if nonfinite > 0:
            here = (
                f"this rank's samples: {self._batch_ids}"
                if not torch.isfinite(loss)
                else "the loss was non-finite on another rank"
            )
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} (epoch {self.current_epoch}); {here}. The "
                "optimizer "
                "did not step on it: the last checkpoint is finite. A resumed run (--ckpt_path) meets the same "
                "batches in the "
                "same order: look at those samples, or lower the learning rate, first."
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped"] = dict(self.skipped)  # a resumed run's totals go on from these

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped = dict(checkpoint.get("skipped", {}))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=True)

    def step_work(self, batch: dict) -> tuple[dict[str, float], bool]:
        """What a training batch asks of the model (`carevl.flops`, counted by the loader) and whether
        a reference forward runs on the same tokens; read by `carevl.callbacks.Throughput`."""
        return batch["work"], False

    # -- validation and test -----------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.count_skips(batch)
        if "benchmarks" in batch:
            self.evaluate_benchmark(batch)
        elif "chosen_index" in batch:
            self.validate_groups(batch)
        else:
            self.validation_loss(batch)
            self.validate_generations(batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.count_skips(batch)
        if "benchmarks" not in batch:
            raise ValueError("carevl test evaluates benchmark shards (kind 'benchmark'); see tools/convert_*.py")
        self.evaluate_benchmark(batch)

    def validation_loss(self, batch: dict) -> None:
        """The training objective on a validation batch of judge samples (each method its own)."""

    def validate_groups(self, batch: dict) -> None:
        """Statistics of held-out preference groups (DPO logs its loss, reward accuracy and margin)."""

    def validate_generations(self, batch: dict) -> None:
        if not self.hparams.val_generate or "prompt_inputs" not in batch:
            return
        texts = self.backbone.generate(
            batch["prompt_inputs"], max_new_tokens=self.hparams.max_new_tokens, do_sample=False
        )
        if "targets" in batch:
            self.val_exact.update(texts, batch["targets"])
            return
        verdicts = [parse_verdict(t) for t in texts]
        self.val_accuracy.update(verdicts, batch["verdict_labels"])
        if self.val_by_category is not None:
            self.val_by_category.update(verdicts, batch["verdict_labels"], batch["verdict_categories"])
        categories = batch.get("verdict_categories") or [None] * len(verdicts)
        for item, verdict, label, category in zip(batch["ids"], verdicts, batch["verdict_labels"], categories):
            self.val_verdicts.append({"id": item, "category": category, "label": int(label), "verdict": verdict})

    def evaluate_benchmark(self, batch: dict) -> None:
        hp = self.hparams
        self.benchmark_order, self.benchmark_prompt = batch["order"], batch["prompt"]
        if hp.eval_mode == "score":
            verdicts, logps = score_verdicts(self.backbone, batch)
            self.benchmark_eval.update(0, batch, verdicts, logps.tolist())
            return
        for run in range(hp.eval_runs):
            texts = self.write_critiques(batch, run)
            verdicts = [benchmarks.parse(name, text) for name, text in zip(batch["benchmarks"], texts)]
            self.benchmark_eval.update(run, batch, verdicts, texts)

    def write_critiques(self, batch: dict, run: int) -> list[str]:
        """The judge's critique of every view in a benchmark batch, in generation run `run`."""
        hp = self.hparams
        sampling = (
            {"do_sample": True, "temperature": hp.eval_temperature, "top_p": hp.eval_top_p}
            if hp.eval_sample
            else {"do_sample": False}
        )
        return self.backbone.generate(batch["prompt_inputs"], max_new_tokens=hp.max_new_tokens, **sampling)

    def on_validation_epoch_end(self) -> None:
        self.log_skips()
        if self.val_loss.update_called:
            self.log("val/loss", self.val_loss.compute(), prog_bar=True)
            self.val_loss.reset()
        if self.val_accuracy.update_called:
            self.log("val/verdict_accuracy", self.val_accuracy.compute(), prog_bar=True)
            self.log("val/unparseable", self.val_accuracy.unparseable.float())
            self.val_accuracy.reset()
            self.write_verdicts()
        if self.val_exact.update_called:
            self.log("val/exact_match", self.val_exact.compute(), prog_bar=True)
            self.val_exact.reset()
        if self.val_by_category is not None and self.val_by_category.update_called:
            for name, value in self.val_by_category.compute().items():
                self.log(f"val/verdict_accuracy/{name}", value)
            self.val_by_category.reset()
        self.report_benchmarks("val")

    def write_verdicts(self) -> None:
        """Each held-out item's verdict beside the logged metrics (`verdicts-step<N>-rank<R>.jsonl` in
        the logger's directory, N the optimizer steps done), so two judges can be compared item by
        item (`tools/results_table.py --paired`); none without a logger."""
        verdicts, self.val_verdicts = self.val_verdicts, []
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        if log_dir is None or self.trainer.sanity_checking:
            return
        write_predictions(Path(log_dir) / f"verdicts-step{self.global_step}-rank{self.global_rank}.jsonl", verdicts)

    def on_test_epoch_end(self) -> None:
        self.log_skips()
        self.report_benchmarks("test")

    def report_benchmarks(self, stage: str) -> None:
        """Log the benchmark metrics, write predictions (per rank) and the results tables (rank 0)."""
        if not any(group[0].update_called for group in self.benchmark_eval.metrics.values()):
            return
        results = self.benchmark_eval.compute()  # synchronised across processes
        for name, values in results.items():
            for key, value in values.items():
                self.log(f"{stage}/{name}/{key}", value, rank_zero_only=True)
        out = Path(self.hparams.results_dir or self.trainer.log_dir or "runs/eval")
        step = f"{stage}-step{self.global_step}" if stage == "val" else stage
        write_predictions(out / f"predictions-{step}-rank{self.global_rank}.jsonl", self.benchmark_eval.predictions)
        skipped = all_ranks_sum(self.skipped) if stage == "test" else None  # training's skips join them in fit
        if self.trainer.is_global_zero:
            write_results(out / step, results, self.backbone.name, self.evaluation_settings(), skipped)
            for name, values in results.items():
                print(markdown_table(name, values, self.backbone.name))
        self.benchmark_eval.reset()

    def evaluation_settings(self) -> dict:
        """How the benchmark verdicts were produced, written beside the results."""
        return {
            **{k: self.hparams[k] for k in RESULT_SETTINGS},
            "order": self.benchmark_order,
            "prompt": self.benchmark_prompt,
        }


def all_ranks_sum(counts: dict[str, int]) -> dict[str, int]:
    """Counts by reason summed over every process (each process's own when there is one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(counts)
    gathered: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for reason, count in part.items():
            total[reason] = total.get(reason, 0) + count
    return total


class JudgeEvaluator(JudgeModule):
    """A judge checkpoint evaluated, never trained: `carevl test --config configs/eval/<benchmark>.yaml`.

    Takes the evaluation arguments of `JudgeModule` (eval_mode, eval_runs, eval_sample, ...); the
    optimisation arguments are unused.

    Args:
        engine: write the benchmark critiques with this chat backend instead of loading the
            checkpoint here: `carevl.backends.openai_api.OpenAIChat` against `vllm serve` of the same
            checkpoint (`configs/engines/vllm.yaml`). The backbone then only names the checkpoint
            and its processor (the prompts are built by the same code either way); its weights are
            never loaded. Greedy critiques match transformers' (`tests/test_evaluation.py`); sampled
            runs are seeded by run index. A view the engine fails on (after the backend's retries)
            stops the evaluation, since a benchmark score over the views that happened to work is
            not the benchmark's score.
    """

    def __init__(self, backbone: Backbone, engine: ChatModel | None = None, **kwargs):
        super().__init__(backbone, **kwargs)
        self.save_hyperparameters(ignore=["backbone", "engine"])
        mode = self.hparams.eval_mode
        if engine is not None and mode != "generate":
            raise ValueError(f"an engine writes critiques: eval_mode must be 'generate', not {mode!r}")
        self.engine = engine

    def configure_model(self) -> None:
        if self.engine is None:
            super().configure_model()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        raise RuntimeError("JudgeEvaluator does not train: use `carevl test` or `carevl validate`")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.engine is not None and "benchmarks" not in batch:
            raise ValueError("with an engine, JudgeEvaluator evaluates benchmark shards (kind 'benchmark') only")
        super().validation_step(batch, batch_idx, dataloader_idx)

    def write_critiques(self, batch: dict, run: int) -> list[str]:
        if self.engine is None:
            return super().write_critiques(batch, run)
        hp = self.hparams
        sampling = Sampling(
            temperature=hp.eval_temperature if hp.eval_sample else 0.0,
            top_p=hp.eval_top_p if hp.eval_sample else 1.0,
            seed=run,
            max_tokens=hp.max_new_tokens,
        )
        replies = self.engine.generate(batch["chats"], sampling)
        failed = [(view, reply.error) for view, reply in zip(batch["ids"], replies) if not reply.ok]
        if failed:
            view, reason = failed[0]
            raise RuntimeError(
                f"{self.engine.name} failed on {len(failed)} of {len(replies)} views of a batch, e.g. {view}: {reason}"
            )
        return [reply.texts[0] for reply in replies]

    def evaluation_settings(self) -> dict:
        engine = "transformers" if self.engine is None else f"{type(self.engine).__name__}({self.engine.name})"
        return {**super().evaluation_settings(), "engine": engine}
