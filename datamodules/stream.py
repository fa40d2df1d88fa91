"""Reading shards into batches inside DataLoader workers.

Training: shards are dealt round-robin to ranks. The workers of a rank read the rank's shards in
the same (per-pass shuffled) order and each decodes only its share of the samples (index modulo
the number of workers), so every sample of the rank is decoded once per pass whatever the shard
sizes. Workers stream endlessly and `EpochLoader` cuts exactly `batches` batches per epoch, the
same number on every rank, so no collective ever waits on a rank that ran out of data.

Resuming: a rank's batches are a function of the seed, the epoch and the worker count alone, so a
run resumed from a checkpoint mid-epoch regenerates the epoch's batches that were already trained on
and drops them: it trains on exactly the batches the uninterrupted run would have.

Validation: every rank reads every shard and keeps sample i when i % world_size == rank (and
splits further by worker), so each sample is seen exactly once across the job.
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from carevl import schema
from carevl.encoding import TooLong

log = logging.getLogger(__name__)


class SamplePreparer:
    """Decodes one raw WebDataset sample into model-ready items; bad samples are logged, counted and skipped.

    Args:
        kind: shard sample kind (see `carevl.schema.SAMPLE_TYPES`).
        build: maps (decoded sample, RGB image) to a list of items (usually one; an evaluation
            showing both answer orders makes two); raises `TooLong` for an over-length sample.
    """

    def __init__(self, kind: str, build: Callable):
        self.kind = kind
        self.build = build
        self.skipped: Counter[str] = Counter()

    def __call__(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        key = raw.get("__key__", "?")
        try:
            sample = schema.decode(raw, self.kind)
        except schema.SchemaError as error:
            return self._skip("bad_record", key, error)
        try:
            image = Image.open(io.BytesIO(sample.image))
            image.load()
            image = image.convert("RGB")
        except Exception as error:  # PIL raises many types for broken files
            return self._skip("corrupt_image", key, error)
        try:
            return self.build(sample, image)
        except TooLong as error:
            return self._skip("too_long", key, error)

    def _skip(self, reason: str, key: str, error: Exception) -> list:
        self.skipped[reason] += 1
        log.warning("skipping sample %s (%s): %s", key, reason, error)
        return []

    def unreadable(self, error: Exception) -> bool:
        """webdataset handler for tar-level errors: count, log, continue."""
        self.skipped["unreadable_shard_member"] += 1
        log.warning("skipping unreadable shard data: %r", error)
        return True

    def take_skipped(self) -> dict[str, int]:
        counts = dict(self.skipped)
        self.skipped.clear()
        return counts


def read_samples(
    urls: list[str], preparer: SamplePreparer, share: int = 0, shares: int = 1
) -> Iterator[dict[str, Any]]:
    """Prepared samples of the shards, in order; only every `shares`-th sample from `share` on is decoded."""
    raw = wds.tarfile_to_samples(handler=preparer.unreadable)({"url": url} for url in urls)
    for sample in islice(raw, share, None, shares):
        yield from preparer(sample)


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle through a buffer of `buffer` items."""
    if buffer <= 1:
        yield from items
        return
    pool = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        index = rng.randrange(len(pool))
        yield pool[index]
        pool[index] = item
    rng.shuffle(pool)
    yield from pool


def cut_batches(
    pool: list[dict[str, Any]], batch_size: int, group_by_length: int, rng: random.Random
) -> list[list[dict[str, Any]]]:
    """A pool of shuffled items cut into batches: in order, or (grouping by length) sorted by each
    item's `length` first, the batches then shuffled."""
    if group_by_length:
        pool = sorted(pool, key=lambda item: item["length"])
    batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """Endless batches from this rank's shards, split by sample between workers, reshuffled every pass.

    `epoch` (numbered from 1) seeds the order; `done` batches of it, already trained on, are
    regenerated and dropped. With `group_by_length` N, batches are cut from pools of N batches'
    worth of samples sorted by token count, and each pool's batches come in random order."""

    def __init__(
        self,
        urls: list[str],
        preparer: SamplePreparer,
        collate: Callable,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        group_by_length: int = 0,
    ):
        self.urls, self.preparer, self.collate = urls, preparer, collate
        self.batch_size, self.shuffle_buffer, self.seed, self.rank = batch_size, shuffle_buffer, seed, rank
        self.group_by_length = group_by_length
        self.epoch, self.done = 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        # The DataLoader takes the workers' batches in turn, so batch j of an epoch is batch j // workers
        # of share j % workers. After `done` batches the turn is share done % workers's: shares rotate
        # over the workers to match, and each drops its batches among the first `done`.
        share = (worker + self.done) % workers
        batches = self._batches(share, workers)
        for _ in islice(batches, (self.done - share + workers - 1) // workers):
            pass
        yield from batches

    def _batches(self, share: int, shares: int) -> Iterator[dict[str, Any]]:
        order_rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}")  # the same in every worker
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{share}")
        pending: list[dict[str, Any]] = []
        pool = self.batch_size * max(1, self.group_by_length)
        while True:
            order = list(self.urls)
            order_rng.shuffle(order)
            usable = 0
            for item in shuffled(read_samples(order, self.preparer, share, shares), self.shuffle_buffer, rng):
                usable += 1
                pending.append(item)
                if len(pending) == pool:
                    for batch in cut_batches(pending, self.batch_size, self.group_by_length, rng):
                        yield self.collate(batch, self.preparer.take_skipped())
                    pending = []
            if usable == 0:
                raise RuntimeError(
                    f"no usable sample in share {share} of {shares} of shards {order}: every sample was skipped"
                )


class ValStream(IterableDataset):
    """One pass over every shard; this rank and worker keep their share of samples."""

    def __init__(
        self, urls: list[str], preparer: SamplePreparer, collate: Callable, batch_size: int, rank: int, world_size: int
    ):
        self.urls, self.preparer, self.collate = urls, preparer, collate
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        share = self.rank + self.world_size * worker
        pending = []
        for prepared in read_samples(self.urls, self.preparer, share, self.world_size * workers):
            pending.append(prepared)
            if len(pending) == self.batch_size:
                yield self.collate(pending, self.preparer.take_skipped())
                pending = []
        if pending:
            yield self.collate(pending, self.preparer.take_skipped())


class EpochLoader:
    """Exactly `batches` batches per epoch from an endless `TrainStream`, decoded in `num_workers` workers.

    `position` says where training stands when an epoch's iteration begins: (epoch from 0, batches
    of it already trained on); Lightning restores both from a checkpoint before it iterates. Without
    it, each iteration is a new epoch from its start.
    """

    def __init__(
        self, stream: TrainStream, batches: int, num_workers: int, position: Callable[[], tuple[int, int]] | None = None
    ):
        self.stream, self.batches, self.num_workers, self.position = stream, batches, num_workers, position
        self.iterations = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, done = self.position() if self.position is not None else (self.iterations, 0)
        self.iterations += 1
        if done:
            log.info(
                "resuming epoch %d after %d of its %d batches: the loader regenerates them and drops them",
                epoch,
                done,
                self.batches,
            )
        # set before the workers start, so each epoch reshuffles differently
        self.stream.epoch, self.stream.done = epoch + 1, done
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        yield from islice(loader, self.batches - done)
