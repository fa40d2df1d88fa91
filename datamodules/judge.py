"""`JudgeDataModule`: every kind of shard a judge trains or is evaluated on, read into batches.

Training reads SFT samples, instruction samples or DPO preference groups; validation reads judge
samples, benchmark records or preference groups, by each shard set's manifest; `carevl test`
reads benchmark records. What a batch of each kind holds is built in `datamodules.sft`,
`datamodules.preference` and `datamodules.benchmark`; the reading (ranks, workers, resuming) in
`datamodules.stream`.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Any

from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from carevl import benchmarks, schema
from carevl.encoding import Encoder
from datamodules.benchmark import build_views, collate_views
from datamodules.preference import collate_groups, encode_group
from datamodules.sft import build_item, collate_items
from datamodules.stream import EpochLoader, SamplePreparer, TrainStream, ValStream

log = logging.getLogger(__name__)
TRAIN_KINDS = ("sft", "instruct", "preference_group")
# Lightning warns at every mid-epoch resume that the training loader cannot go on from where it
# stopped; this one's does (datamodules/stream.py, and `EpochPosition`).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def moved_position(loops: dict[str, Any], saved: dict[str, int], now: dict[str, int]) -> tuple[int, int]:
    """Move a checkpoint's training position within its epoch (`loops`: its fit-loop state) from
    batches of the `saved` layout to batches of the layout `now` holding as many samples (rounded
    down: at most one batch of samples comes twice). Returns (batches before, batches after)."""
    progress = loops["epoch_loop.batch_progress"]
    before = progress["current"]["processed"]
    after = before * saved["processes"] * saved["batch_size"] // (now["processes"] * now["batch_size"])
    for counters in (progress["current"], progress["total"]):
        for name in counters:
            counters[name] += after - before
    return before, after


class JudgeDataModule(LightningDataModule):
    """Batches of judge samples, instruction samples, preference groups or benchmark records read
    from WebDataset shards.

    Decoding, prompt rendering and the processor run in loader workers. Corrupt images, records
    that break the shard contract and samples longer than `max_length` are skipped, logged and
    counted (the counts travel with the batches and are logged as ``skipped/<reason>``).

    Args:
        processor: name or path of the model's processor. `carevl` sets it to the backbone's model.
        train: directory of training shards (with the manifest written by `carevl.schema.ShardWriter`).
        val: directory (or list of directories) of validation shards: judge samples (e.g. the
            shapes world's held-out set, scored by verdict accuracy), benchmark samples (scored by
            the benchmark's metrics) or preference groups (DPO loss, reward accuracy and margin).
        test: directory of benchmark shards for `carevl test`.
        kind: training sample kind: "sft" (judge samples), "instruct" (prompt -> target), or
            "preference_group" (DPO groups; batch_size then counts groups, and reference log-probs
            written by `python tools/reference_logps.py` beside the shards travel with the batches).
        order: how benchmark answers are ordered for the judge: "odd_length" (swap when the summed
            length of both is odd, as VLMEvalKit and lmms-eval), "random" (a coin fixed by id and
            `seed`), "both" (each record in both orders: position consistency is reported), or
            "as_stored" (VL-RewardBench then lists the preferred answer first 1,245 times in 1,250).
        prompt: how benchmark records are asked: "carevl" (the judge's training prompt), "benchmark"
            (VL-RewardBench's official prompt; MLLM-as-a-Judge's [[A]]/[[B]]/[[C]] format, ties
            allowed) or "auto": carevl's while training and for checkpoints carevl exported (they
            hold `carevl_prompt.json`), the benchmark's for any other model. Results state which.
        batch_size: samples per device per step (the micro batch).
        val_batch_size: samples per validation batch; defaults to `batch_size`.
        num_workers: loader worker processes per rank.
        shuffle_buffer: samples held for shuffling within a worker.
        group_by_length: 0 cuts batches in shuffled order. N > 0 gathers N batches' worth of shuffled
            samples, sorts them by token count, cuts them into batches and shuffles those: each batch
            holds samples of similar length, so less of it is padding. At VL-RewardBench's lengths
            (with 256 image tokens a sample) shuffled batches of 4 are ~36% padding, grouped over
            16 batches ~5% (`tools/bench/padding.py`).
        max_length: samples with more tokens, image tokens included, are dropped (never truncated).
        seed: base seed of shard and sample shuffling.
        trust_remote_code: allow code shipped with the processor (`carevl` sets it as the backbone's).
        verdict_candidates: benchmark batches also carry one input per candidate verdict line, for
            verdicts by likelihood (`carevl` sets it when the model's `eval_mode` is "score").
    """

    def __init__(
        self,
        processor: str | None = None,
        train: str | None = None,
        val: str | list[str] | None = None,
        test: str | None = None,
        kind: str = "sft",
        order: str = "odd_length",
        prompt: str = "auto",
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        group_by_length: int = 0,
        max_length: int = 4096,
        seed: int = 0,
        trust_remote_code: bool = False,
        verdict_candidates: bool = False,
    ):
        super().__init__()
        if kind not in TRAIN_KINDS:
            raise ValueError(f"kind must be one of {TRAIN_KINDS}, got {kind!r}")
        if group_by_length < 0:
            raise ValueError(f"group_by_length counts batches (0: no grouping), got {group_by_length}")
        val_batch_size = batch_size if val_batch_size is None else val_batch_size
        sizes = {"batch_size": batch_size, "val_batch_size": val_batch_size, "max_length": max_length}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(
                f"num_workers and shuffle_buffer cannot be negative, got {num_workers} and {shuffle_buffer}"
            )
        benchmarks.views("", ["", ""], order)  # validates the order name
        benchmarks.resolve_prompt(prompt, None, training=False)  # and the prompt's
        self.prompt = prompt
        self.processor_name = processor
        self.train_dir, self.val_dir, self.test_dir, self.kind, self.order = train, val, test, kind, order
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers, self.shuffle_buffer, self.group_by_length = num_workers, shuffle_buffer, group_by_length
        self.max_length, self.seed, self.trust_remote_code = max_length, seed, trust_remote_code
        self.verdict_candidates = verdict_candidates
        self.encoder: Encoder | None = None
        self._manifests: dict[str, dict[str, Any]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Check the shard sets `stage` reads against their manifests (and the training set's kind),
        then load the processor: a missing or damaged set fails here, before any model loads."""
        if stage in (None, "fit") and self.train_dir is not None:
            manifest = self.manifest(self.train_dir)
            if manifest["kind"] != self.kind:
                raise ValueError(f"{self.train_dir} holds {manifest['kind']!r} samples and data.kind is {self.kind!r}")
        for directory in self._eval_dirs(stage):
            self.manifest(directory)
        training = [self.train_dir] if stage in (None, "fit") and self.train_dir is not None else []
        for directory in [*training, *self._eval_dirs(stage)]:
            reference = schema.read_reference(directory)
            if reference is not None:  # computed for this model over these groups, or refused
                schema.check_reference(reference, directory, self.processor_name)
        self.resolved_prompt = benchmarks.resolve_prompt(self.prompt, self.processor_name, training=stage == "fit")
        if self.encoder is not None:
            return
        from transformers import AutoProcessor

        if self.processor_name is None:
            raise ValueError("JudgeDataModule needs `processor` (the `carevl` command sets it to the backbone's model)")
        processor = AutoProcessor.from_pretrained(self.processor_name, trust_remote_code=self.trust_remote_code)
        self.encoder = Encoder(processor, max_length=self.max_length)

    def _eval_dirs(self, stage: str | None) -> list[str]:
        val = list(self.val_dir) if isinstance(self.val_dir, (list, tuple)) else [self.val_dir]
        dirs = {"fit": val, "validate": val, "test": [self.test_dir]}.get(stage, [*val, self.test_dir])
        return [d for d in dirs if d is not None]

    def manifest(self, directory: str) -> dict[str, Any]:
        """A shard set's manifest, its shards checked against it once (`carevl.schema.read_manifest`)."""
        if directory not in self._manifests:
            self._manifests[directory] = schema.read_manifest(directory)
        return self._manifests[directory]

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _pieces(self, kind: str, directory: str, evaluation: bool) -> tuple[SamplePreparer, Any]:
        """The preparer and collate function of one shard kind (benchmark records only in evaluation)."""
        pad = self.encoder.pad_token_id
        if kind in ("sft", "instruct"):
            return SamplePreparer(kind, partial(build_item, self.encoder)), partial(
                collate_items, pad_token_id=pad, with_prompts=evaluation
            )
        if kind == "preference_group":
            build = partial(encode_group, self.encoder, schema.read_reference(directory))
            return SamplePreparer(kind, build), partial(collate_groups, pad_token_id=pad)
        if kind == "benchmark" and evaluation:
            order, prompt = self.order, self.resolved_prompt
            build = partial(build_views, self.encoder, order, self.seed, self.verdict_candidates, prompt)
            return SamplePreparer(kind, build), partial(collate_views, pad_token_id=pad, order=order, prompt=prompt)
        raise ValueError(
            f"{directory} holds {kind!r} samples, which {'evaluation' if evaluation else 'training'} does not read"
        )

    def train_dataloader(self) -> EpochLoader:
        if self.train_dir is None:
            raise ValueError("no training shards: set data.train")
        manifest = self.manifest(self.train_dir)
        rank, world = self._rank()
        urls = manifest["urls"]
        if len(urls) < world:
            raise ValueError(f"{len(urls)} training shards for {world} processes: write at least one shard per process")
        batches = manifest["samples"] // (world * self.batch_size)
        if batches == 0:
            raise ValueError(
                f"{manifest['samples']} samples cannot fill one batch of {self.batch_size} on each of {world} processes"
            )
        preparer, collate_fn = self._pieces(self.kind, self.train_dir, evaluation=False)
        stream = TrainStream(
            urls[rank::world],
            preparer,
            collate_fn,
            self.batch_size,
            self.shuffle_buffer,
            self.seed,
            rank,
            self.group_by_length,
        )
        return EpochLoader(
            stream, batches, self.num_workers, position=self._position if self.trainer is not None else None
        )

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on), where the trainer stands; after a resume, where
        the checkpoint left it."""
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _stream_layout(self) -> dict[str, int]:
        """What fixes the training batches besides the shards: a resumed run must match it to continue
        an epoch's order."""
        _, world = self._rank()
        return {
            "processes": world,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "group_by_length": self.group_by_length,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_stream": self._stream_layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("train_stream"), self._stream_layout()
        if saved is not None and saved != now:
            rank_zero_warn(
                f"the checkpoint's run read its training shards with {saved}, this run with {now}: the interrupted "
                "epoch's order cannot be continued, so until it ends some of its samples may repeat and others be "
                "missed"
            )

    def carry_position(self, checkpoint: dict[str, Any]) -> None:
        """When the checkpoint's processes x batch size differ from this run's, move its place in the
        interrupted epoch to as many samples as it had trained on, not as many batches: the epoch
        then ends after the samples it holds, at the step the learning-rate schedule counts on.
        `EpochPosition` calls it with the whole checkpoint, before Lightning restores its loops."""
        saved = checkpoint.get(type(self).__qualname__, {}).get("train_stream")
        loops = checkpoint.get("loops", {}).get("fit_loop")
        if saved is None or loops is None:
            return
        now = self._stream_layout()
        before, after = moved_position(loops, saved, now)
        if before != after:
            rank_zero_info(
                f"resuming epoch {checkpoint.get('epoch', '?')} after {before} batches of {saved['processes']} x "
                f"{saved['batch_size']} "
                f"samples: {after} batches of {now['processes']} x {now['batch_size']} hold as many"
            )

    def val_dataloader(self) -> DataLoader | list:
        if isinstance(self.val_dir, (list, tuple)):
            return [self._eval_loader(directory) for directory in self.val_dir]
        return self._eval_loader(self.val_dir)

    def test_dataloader(self) -> DataLoader | list:
        if self.test_dir is None:
            raise ValueError("no test shards: set data.test to a benchmark shard directory")
        return self._eval_loader(self.test_dir)

    def _eval_loader(self, directory: str | None) -> DataLoader | list:
        """Judge samples (verdict accuracy), benchmark records (benchmark metrics) or preference groups
        (DPO statistics), by the manifest's kind."""
        if directory is None:
            return []
        manifest = self.manifest(directory)
        rank, world = self._rank()
        preparer, collate_fn = self._pieces(manifest["kind"], directory, evaluation=True)
        stream = ValStream(manifest["urls"], preparer, collate_fn, self.val_batch_size, rank, world)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)


class EpochPosition(Callback):
    """Hands a resumed fit's checkpoint to `JudgeDataModule.carry_position` before Lightning restores
    its loops (Lightning 2 gives a datamodule its own state alone, and a callback the whole
    checkpoint). The `carevl` command adds it to every trainer."""

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if isinstance(trainer.datamodule, JudgeDataModule):
            trainer.datamodule.carry_position(checkpoint)
