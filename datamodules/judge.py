"""The SFT datamodule: judge (or plain instruction) samples from WebDataset shards."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from carevl import schema
from carevl.encoding import Encoder, collate, prompt_only
from carevl.prompts import judge_prompt, user_turn
from datamodules.stream import EpochLoader, SamplePreparer, TrainStream, ValStream

log = logging.getLogger(__name__)


def render_sample(sample: schema.SFTSample | schema.InstructSample) -> tuple[list[dict], str, dict[str, Any]]:
    """Chat messages, target and extras of a decoded sample. Prompts come from `carevl.prompts` only."""
    if isinstance(sample, schema.SFTSample):
        return user_turn(judge_prompt(sample.question, sample.responses)), sample.target, {"verdict_label": sample.label}
    return user_turn(sample.prompt), sample.target, {"verdict_label": None}


def collate_items(items: list[dict[str, Any]], skipped: dict[str, int], pad_token_id: int, with_prompts: bool) -> dict[str, Any]:
    """A batch: padded model inputs, ids, weights, verdict labels, skip counts since the last batch,
    and (validation) left-padded prompt-only inputs for generation."""
    features = [item["features"] for item in items]
    inputs = collate([{k: v for k, v in f.items() if k != "prompt_length"} for f in features], pad_token_id)
    batch = {
        "inputs": inputs,
        "ids": [item["id"] for item in items],
        "weights": torch.tensor([item["weight"] for item in items]),
        "skipped": skipped,
    }
    labels = [item["verdict_label"] for item in items]
    if with_prompts and all(label is not None for label in labels):
        batch["prompt_inputs"] = collate([prompt_only(f) for f in features], pad_token_id, padding_side="left")
        batch["verdict_labels"] = labels
    return batch


class JudgeDataModule(LightningDataModule):
    """Batches of judge SFT samples (or plain instruction samples) read from WebDataset shards.

    Decoding, prompt rendering and the processor run in loader workers. Corrupt images, records
    that break the shard contract and samples longer than `max_length` are skipped, logged and
    counted (the counts travel with the batches and are logged as ``skipped/<reason>``).

    Args:
        processor: name or path of the model's processor; defaults to the backbone's model.
        train: directory of training shards (with the manifest written by `carevl.schema.ShardWriter`).
        val: directory of validation shards (e.g. the shapes world's held-out set).
        kind: sample kind in the shards: "sft" (judge samples) or "instruct" (prompt -> target).
        batch_size: samples per device per step (the micro batch).
        val_batch_size: samples per validation batch; defaults to `batch_size`.
        num_workers: loader worker processes per rank.
        shuffle_buffer: samples held for shuffling within a worker.
        max_length: samples with more tokens, image tokens included, are dropped (never truncated).
        seed: base seed of shard and sample shuffling.
        trust_remote_code: allow code shipped with the processor.
    """

    def __init__(
        self,
        processor: str | None = None,
        train: str | None = None,
        val: str | None = None,
        kind: str = "sft",
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        max_length: int = 4096,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if kind not in schema.SAMPLE_TYPES:
            raise ValueError(f"kind must be one of {sorted(schema.SAMPLE_TYPES)}, got {kind!r}")
        self.processor_name = processor
        self.train_dir, self.val_dir, self.kind = train, val, kind
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.max_length, self.seed, self.trust_remote_code = max_length, seed, trust_remote_code
        self.encoder: Encoder | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.encoder is not None:
            return
        from transformers import AutoProcessor

        name = self.processor_name
        if name is None and self.trainer is not None:
            name = self.trainer.lightning_module.backbone.name
        if name is None:
            raise ValueError("JudgeDataModule needs `processor` (or a trainer whose model has a backbone)")
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=self.trust_remote_code)
        self.encoder = Encoder(processor, max_length=self.max_length)

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _preparer(self) -> SamplePreparer:
        return SamplePreparer(self.kind, render_sample, self.encoder.encode)

    def train_dataloader(self) -> EpochLoader:
        if self.train_dir is None:
            raise ValueError("no training shards: set data.train")
        manifest = schema.read_manifest(self.train_dir)
        rank, world = self._rank()
        urls = manifest["urls"]
        if len(urls) < world:
            raise ValueError(f"{len(urls)} training shards for {world} processes: write at least one shard per process")
        batches = manifest["samples"] // (world * self.batch_size)
        if batches == 0:
            raise ValueError(f"{manifest['samples']} samples cannot fill one batch of {self.batch_size} on each of {world} processes")
        collate_fn = partial(collate_items, pad_token_id=self.encoder.pad_token_id, with_prompts=False)
        stream = TrainStream(urls[rank::world], self._preparer(), collate_fn, self.batch_size, self.shuffle_buffer, self.seed, rank)
        return EpochLoader(stream, batches, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dir is None:
            return []
        manifest = schema.read_manifest(self.val_dir)
        rank, world = self._rank()
        collate_fn = partial(collate_items, pad_token_id=self.encoder.pad_token_id, with_prompts=True)
        stream = ValStream(manifest["urls"], self._preparer(), collate_fn, self.val_batch_size, rank, world)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)
