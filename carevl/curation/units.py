"""What every curation stage runs on: the record file of each stage, the items and captions the
stages read, the loop that runs a stage's units of work (resuming, counting failures by reason) and
the summary that fails a stage beyond its `max_failed` share. The stages themselves are in
`carevl.curation.stages` (items, answers, captions, pairs), `carevl.curation.labels` (judge, votes,
split, SFT shards) and `carevl.curation.critiques` (curation II).
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from carevl.backends.interface import Chat, Reply, chunks
from carevl.curation.provenance import selected
from carevl.curation.records import ImageStore, Records

log = logging.getLogger(__name__)

ITEMS_SELECTION = "items.selection.json"  # the keys of the items of the last ingest's questions file
FILES = {
    "ingest": "items.jsonl",
    "candidates": "candidates.jsonl",
    "captions": "captions.jsonl",
    "pairs": "pairs.jsonl",
    "judge": "judgments.jsonl",
    "votes": "scores.jsonl",
    "split": "split.jsonl",
}


def records(workdir: str | Path, stage: str) -> Records:
    return Records(Path(workdir) / FILES[stage])


class StageFailed(RuntimeError):
    """A stage whose work failed beyond what its config allows. Its records are kept (each failed
    unit with its reason), and running the stage again retries the failed units."""


def summarize(stage: str, counts: Counter, max_failed: float | None = None) -> dict:
    """The stage's counts, logged. With `max_failed`, raise StageFailed when more than that share of
    this run's units failed (counts "failed: <reason>" against "done")."""
    summary = {"stage": stage, **dict(sorted(counts.items()))}
    log.info("%s: %s", stage, ", ".join(f"{k} {v}" for k, v in summary.items() if k != "stage"))
    failures = {k.removeprefix("failed: "): v for k, v in counts.items() if k.startswith("failed: ")}
    failed = sum(failures.values())
    attempted = failed + counts.get("done", 0)
    if max_failed is not None and failed > max_failed * attempted:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(failures.items()))
        raise StageFailed(
            f"{stage}: {failed} of {attempted} units failed ({reasons}), more than max_failed ({max_failed:g}) allows. "
            "The failures are recorded with their reasons; run the stage again to retry them."
        )
    return summary


def write_or_count(writer, counts: Counter, sample) -> bool:
    """Write a sample to a shard set, or count why it breaks the shard contract ("dropped: ...")."""
    from carevl.schema import SchemaError

    try:
        writer.write(sample)
    except SchemaError as error:
        log.warning("not written: %s", error)
        counts[f"dropped: {str(error).split(': ', 1)[-1]}"] += 1
        return False
    return True


def free_memory() -> None:
    """Give a released model's memory back before the next one is built."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@contextmanager
def opened(build, name: str):
    """(model, None), or (None, the reason) when `build` raises: a model that cannot load (a missing
    checkpoint, a wrong head, too little memory) fails its own units, recorded with that reason, and
    the stage goes on with the next model; a rerun retries them. On leaving, a model built here is
    closed (its engine processes stop) and its memory freed before the next one is built; a model
    handed over already built is left open for its owner."""
    try:
        model, failure = (build() if callable(build) else build), None
    except Exception as error:
        log.exception("%s could not be built; its units are recorded as failed", name)
        model, failure = None, f"model_failed: {type(error).__name__}: {str(error)[:300]}"
    try:
        yield model, failure
    finally:
        if model is not None and callable(build):
            model.close()
        free_memory()


class OnFirstUse:
    """A model built by the first call, so a stage whose units are all done builds none; closed
    and freed on leaving the ``with`` block."""

    def __init__(self, build: Callable):
        self.build, self.model = build, None

    def __call__(self):
        if self.model is None:
            self.model = self.build()
        return self.model

    def __enter__(self) -> OnFirstUse:
        return self

    def __exit__(self, *exc) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None
            free_memory()


def run_units(
    out: Records,
    units: list[tuple[str, object]],
    work: Callable[[list, Callable[[list[dict]], None]], None],
    chunk_size: int,
    desc: str,
) -> Counter:
    """Process the units whose key has no successful record, `chunk_size` at a time. `work(chunk,
    write)` hands its records to `write` (appended to disk at once), per chunk or, for backends that
    stream, per reply. Counts done / skipped (already there) / failed by reason."""
    units = list(dict(units).items())  # units with equal inputs are done once
    counts = Counter(skipped=sum(out.done(key) for key, _ in units))
    todo = [(key, payload) for key, payload in units if not out.done(key)]
    with tqdm(total=len(todo), desc=desc, unit="item", disable=None) as bar:

        def write(records: list[dict]) -> None:
            out.append(records)
            for record in records:
                counts["failed: " + record["error"].split(":")[0] if "error" in record else "done"] += 1
            bar.update(len(records))

        for chunk in chunks(todo, chunk_size):
            work(chunk, write)
    return counts


def reply_record(base: dict, reply: Reply, fields: Callable[[list[str]], dict]) -> dict:
    if not reply.ok:
        return {**base, "error": reply.error}
    try:
        return {**base, **fields(reply.texts)}
    except ValueError as error:  # what the model wrote stays beside the reason (cut to 2,000 characters)
        return {**base, "error": f"unparseable: {error}", "replies": [text[:2000] for text in reply.texts]}


# -- items -----------------------------------------------------------------------------------------


def items_by_id(workdir: str | Path, decontaminated: bool = True) -> dict[str, dict]:
    """The items of the questions file the last ingest read (an item changed since, or no longer
    in the file, is left out), without those the decontaminate stage removed (`decontaminated`)."""
    from carevl.curation.decontaminate import removed_keys

    found = records(workdir, "ingest").ok()
    selection = Path(workdir) / ITEMS_SELECTION
    if selection.exists():
        keys = set(json.loads(selection.read_text())["keys"])
        if decontaminated:
            keys -= removed_keys(workdir, sorted(keys))
        found = [r for r in found if r["key"] in keys]
    return {r["id"]: r for r in found}


def item_chat(store: ImageStore, item: dict, text: str) -> Chat:
    return Chat.user(text, store.get(item["image"], item["image_ext"]))


def caption_by_image(workdir: str | Path) -> dict[str, str]:
    """The captions of the captioner the last captions run was configured with."""
    return {r["image"]: r["caption"] for r in selected(records(workdir, "captions"))}
