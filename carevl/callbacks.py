"""Lightning callbacks of carevl."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections import deque
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from carevl.flops import ModelFlops, peak_flops
from carevl.strategies import whole_weights

log = logging.getLogger(__name__)
DEADLINE_ENV = "CAREVL_DEADLINE"
# Files a checkpoint directory gets once its save is through: DeepSpeed's tag file (written by rank
# 0 after its own files), torch.distributed.checkpoint's metadata (written after every rank's).
COMPLETE_MARKERS = ("latest", ".metadata")


class ExportHF(Callback):
    """Write the trained backbone as a Hugging Face checkpoint (model + processor) when fit ends.
    Skipped when `TimeLimit` stopped the run: the model is not finished, and the checkpoint resumes it.
    Under ZeRO-3 and FSDP the shards are gathered onto rank 0's CPU first, which then holds the
    weights twice (gathered, and in a CPU copy of the model that writes them).

    Args:
        dirpath: output directory; `AutoModelForImageTextToText.from_pretrained(dirpath)` loads it.
        merge_lora: fold LoRA adapters into the weights (otherwise only the adapters are written).
    """

    def __init__(self, dirpath: str, merge_lora: bool = True):
        self.dirpath = dirpath
        self.merge_lora = merge_lora

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if any(isinstance(callback, TimeLimit) and callback.stopped for callback in trainer.callbacks):
            log.info("not exporting to %s: the run stopped for its time limit and will resume", self.dirpath)
            return
        weights = whole_weights(trainer.strategy, pl_module.backbone.model)  # every rank takes part in gathering shards
        if trainer.is_global_zero:
            judge = trains_a_judge(trainer.datamodule)
            pl_module.backbone.export(self.dirpath, merge_lora=self.merge_lora, weights=weights, judge=judge)
        trainer.strategy.barrier("carevl-export")


def trains_a_judge(datamodule: object) -> bool:
    """Whether training on this datamodule makes a carevl judge: judge samples and preference groups
    do, instruction pretraining ("instruct") does not."""
    return getattr(datamodule, "kind", None) in ("sft", "preference_group")


class Checkpoints(ModelCheckpoint):
    """Checkpoints every N optimizer steps and at the last step of every epoch and of the run, each
    written once, that a run killed in the middle of a save cannot spoil.

    Lightning's `save_last=True` writes every checkpoint twice: under its step's name, then again
    over `last.ckpt`, in place. A DeepSpeed or FSDP checkpoint is a directory of files, so a run
    killed during that second write leaves `last.ckpt` holding two steps at once, and a resume from
    it goes on without an error (measured under ZeRO-2: the step's weights with the optimizer state
    of the checkpoint before, which trained the next step to a higher loss). Here each checkpoint
    is written once, as `epoch=E-step=S.ckpt`, and `last.ckpt` becomes a link to it only when it is
    complete; the `keep` newest are kept, so the one the link pointed at before outlives a save that
    never finishes. `--ckpt_path=last` always resumes from the newest complete checkpoint.

    Args:
        dirpath: directory of the checkpoints.
        every_n_train_steps: optimizer steps between checkpoints (each epoch's end saves too).
        keep: checkpoints kept on disk, at least 2 (the newest may be a save that a kill cut short).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int, keep: int = 2):
        if keep < 2:
            raise ValueError(
                f"keep must be at least 2 (the checkpoint `last.ckpt` links to must outlive the next save), got {keep}"
            )
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            monitor="step",
            mode="max",
            save_top_k=keep,
            save_last="link",
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the directories of saves a kill cut short (never loadable), so that the step saves
        again under its own name; keep linking `last.ckpt` after a resume (the state a checkpoint
        carries was taken before its own link was made, so it would not name the link)."""
        super().on_train_start(trainer, pl_module)
        self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        if trainer.is_global_zero:
            for path in Path(self.dirpath).glob("*.ckpt"):
                if (
                    path.is_dir()
                    and not path.is_symlink()
                    and not any((path / marker).is_file() for marker in COMPLETE_MARKERS)
                ):
                    log.warning("removing %s: its save was cut short", path)
                    shutil.rmtree(path)
        trainer.strategy.barrier("carevl-checkpoints")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        """The periodic saves, and the last step of every epoch and of the run (max_steps, or a
        callback's `should_stop`). Saved at its batch's end, as the periodic ones, a run stopped
        mid-epoch resumes inside it; saved at the epoch's end, Lightning would count the epoch done.
        (Lightning itself would only re-link `last.ckpt` to the last periodic save or, before any,
        write it in place: under DeepSpeed, into the directory the link points at.)"""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer):  # this step is saved already, among others
            return
        stops = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        if stops or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.save_now(trainer)

    def save_now(self, trainer: Trainer) -> str:
        """Checkpoint the current step as the periodic saves do (and link `last.ckpt` to it); its path."""
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        return self._last_checkpoint_saved


class TimeLimit(Callback):
    """Checkpoint and stop at an optimizer-step boundary before the job's deadline, so that a
    scheduler's kill at the time limit loses no steps. Under SLURM the job then requeues itself, and
    its next start resumes from the checkpoint (`--ckpt_path=last`, see tools/slurm.sbatch), on the
    batches an uninterrupted run would have trained on.

    The deadline is read from the environment variable CAREVL_DEADLINE (Unix seconds;
    tools/slurm.sbatch sets it to the job's end time). Without it the callback does nothing. The
    checkpoint is written by the run's `Checkpoints` callback, which must be there.

    Args:
        margin_minutes: stop this long before the deadline: time for the save, the step in flight and
            the scheduler's grace period.
        requeue: under SLURM (SLURM_JOB_ID set), run `scontrol requeue <job>` once the checkpoint is written.
    """

    def __init__(self, margin_minutes: float = 15.0, requeue: bool = True):
        self.margin_s, self.requeue = margin_minutes * 60, requeue
        self.deadline: float | None = None
        self.stopped = False
        self._step = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(trainer.checkpoint_callback, Checkpoints):
            raise ValueError("TimeLimit saves through carevl.callbacks.Checkpoints: add it to trainer.callbacks")
        value = os.environ.get(DEADLINE_ENV)
        self.deadline = float(value) if value else None
        self._step = trainer.global_step
        if self.deadline is not None:
            log.info(
                "time limit: stopping with a checkpoint %.0f min before %s",
                self.margin_s / 60,
                time.ctime(self.deadline),
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.deadline is None or self.stopped or trainer.global_step == self._step:
            return  # no deadline, already stopping, or inside a gradient-accumulation window
        self._step = trainer.global_step
        late = torch.tensor(float(time.time() > self.deadline - self.margin_s), device=pl_module.device)
        if not trainer.strategy.reduce(late, reduce_op="max"):  # every rank decides alike, whatever its clock
            return
        path = trainer.checkpoint_callback.save_now(trainer)
        self.stopped = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning(
                "time limit: stopped at step %d, %.0f min before the deadline; resume from %s",
                trainer.global_step,
                (self.deadline - time.time()) / 60,
                path,
            )
            job = os.environ.get("SLURM_JOB_ID")
            if self.requeue and job:
                try:
                    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                    failure = done.stderr.strip() if done.returncode else None
                except OSError as error:
                    failure = str(error)
                if failure is None:
                    log.info("requeued SLURM job %s", job)
                else:
                    log.warning("scontrol requeue %s failed (%s): resubmit the job to resume", job, failure)


class Throughput(Callback):
    """Log training speed at every optimizer step, over the last `window` steps: `train/tokens_per_s`
    (language-model tokens, padding left out), `train/samples_per_s` (samples or DPO groups),
    `train/tflops_per_s` (model FLOPs, `carevl.flops`: reference forwards and the vision tower
    counted, gradient-checkpointing recomputation not) and `train/mfu` (those over the device's dense
    peak, when it is known). Figures are per device, on rank 0. The work is counted on the host by
    the loaders: measuring adds no reduction and no copy from the GPU. The first step after the
    start and after each validation is left out (warm-up, and the pause).

    Args:
        window: optimizer steps averaged.
        peak_tflops: the device's dense peak at the run's precision, TFLOP/s. None looks the GPU up
            in `carevl.flops.PEAK_TFLOPS` (bf16/fp16 runs only); where it is unknown, MFU is not logged.
    """

    def __init__(self, window: int = 20, peak_tflops: float | None = None):
        if window < 1:
            raise ValueError(f"window counts optimizer steps, got {window}")
        self.peak_tflops = peak_tflops
        self.peak: float | None = None
        self.flops: ModelFlops | None = None
        self.steps: deque[tuple[float, float, float, float]] = deque(maxlen=window)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.flops = pl_module.backbone.model_flops
        device = trainer.strategy.root_device
        if self.peak_tflops:
            self.peak = self.peak_tflops * 1e12
        elif device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self.peak = peak_flops(name, trainer.precision)
            if self.peak is None:
                log.info(
                    "throughput: no known peak for %s at precision %s: MFU not logged (set peak_tflops)",
                    name,
                    trainer.precision,
                )
        self._restart(trainer)

    def _restart(self, trainer: Trainer) -> None:
        self._step, self._clock, self._warm = trainer.global_step, time.perf_counter(), False
        self._pending = [0.0, 0.0, 0.0]  # tokens, samples, FLOPs of the step in progress

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self.flops is not None:
            self._restart(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        work, reference_forward = pl_module.step_work(batch)
        for i, value in enumerate((work["tokens"], len(batch["ids"]), self.flops.step(work, reference_forward))):
            self._pending[i] += value
        if trainer.global_step == self._step:
            return  # inside a gradient-accumulation window
        now = time.perf_counter()
        if self._warm:
            self.steps.append((now - self._clock, *self._pending))
        self._step, self._clock, self._warm = trainer.global_step, now, True
        self._pending = [0.0, 0.0, 0.0]
        if not self.steps:
            return
        seconds, tokens, samples, flops = (sum(column) for column in zip(*self.steps))
        pl_module.log("train/tokens_per_s", tokens / seconds, on_step=True, rank_zero_only=True)
        pl_module.log("train/samples_per_s", samples / seconds, on_step=True, rank_zero_only=True)
        pl_module.log("train/tflops_per_s", flops / seconds / 1e12, on_step=True, rank_zero_only=True)
        if self.peak:
            pl_module.log("train/mfu", flops / seconds / self.peak, on_step=True, rank_zero_only=True, prog_bar=True)
