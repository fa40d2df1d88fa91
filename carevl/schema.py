"""The file contracts between carevl's parts (DESIGN §3), written down once for writers and readers.

- **Shards**: a WebDataset tar file; a sample is ``<key>.json`` plus ``<key>.<ext>`` holding the
  image's original encoded bytes; keys contain no dots. Prompts are never stored: they are
  rendered at load time from `carevl.prompts`, so training and evaluation always agree. Every
  shard set has a manifest (``manifest.json`` beside the shards) listing each shard with its
  sample count, which readers use to give every rank the same number of batches.
- **Reference log-probs** (``reference-logps.json`` beside preference-group shards): the frozen
  reference's summed log-prob of every critique of every group, written by
  ``tools/reference_logps.py`` and read by the DPO datamodule.
- **Questions** (the curation input, one JSON object a line): the image-question items that
  ``tools/curate.py ingest`` reads (`QUESTION_FIELDS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MANIFEST = "manifest.json"
WRITING = ".writing"  # where a ShardWriter puts shards until they are complete
REFERENCE_FILE = "reference-logps.json"
# A questions file line: "id" (unique), "image" (a path relative to the file), "question", and an
# optional "meta" object carried along into every record and shard of the item.
QUESTION_FIELDS = ("id", "image", "question", "meta")


class SchemaError(ValueError):
    """A sample that does not follow the shard contract; readers count and skip it."""


def check_pair(sample_id: str, responses: Any, label: Any, labels: tuple = (1, 2)) -> None:
    """The two answers and the label every judge-facing sample carries."""
    if not isinstance(responses, list) or len(responses) != 2 or not all(isinstance(r, str) for r in responses):
        raise SchemaError(f"{sample_id}: 'responses' must be a list of two strings")
    if label not in labels:
        raise SchemaError(f"{sample_id}: 'label' must be one of {labels}, got {label!r}")


def check_text(sample_id: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise SchemaError(f"{sample_id}: '{name}' must be a non-empty string")


@dataclass
class SFTSample:
    """A judge SFT example: the target is a critique ending in the verdict line."""

    id: str
    question: str
    responses: list[str]
    label: int
    target: str
    source: str
    image: bytes = field(repr=False)
    image_ext: str = "png"
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "sft"
    _required = ("id", "question", "responses", "label", "target", "source")

    def validate(self) -> None:
        check_pair(self.id, self.responses, self.label)
        check_text(self.id, "target", self.target)


@dataclass
class InstructSample:
    """A plain instruction-following example (prompt -> target), e.g. the captions a tiny base model
    is pretrained on before it becomes a judge."""

    id: str
    prompt: str
    target: str
    source: str
    image: bytes = field(repr=False)
    image_ext: str = "png"
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "instruct"
    _required = ("id", "prompt", "target", "source")

    def validate(self) -> None:
        check_text(self.id, "target", self.target)


@dataclass
class BenchmarkSample:
    """A benchmark record: two responses in the benchmark's own order and the human label
    (1, 2, or "tie"). Evaluation decides the order the judge sees them in."""

    id: str
    benchmark: str
    category: str
    question: str
    responses: list[str]
    label: int | str
    image: bytes = field(repr=False)
    image_ext: str = "png"
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "benchmark"
    _required = ("id", "benchmark", "category", "question", "responses", "label")

    def validate(self) -> None:
        check_pair(self.id, self.responses, self.label, labels=(1, 2, "tie"))


@dataclass
class PreferenceGroupSample:
    """A DPO group: one chosen critique against one or more rejected critiques of the same judge
    prompt (image, question, two answers), e.g. from Best-to-Worse. `label` is the answer the
    critiques should prefer; scores are the evaluator's, when known."""

    id: str
    question: str
    responses: list[str]
    label: int
    chosen: str
    rejected: list[str]
    image: bytes = field(repr=False)
    image_ext: str = "png"
    chosen_score: float | None = None
    rejected_scores: list[float] | None = None
    strategy: str = "best_to_worse"
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "preference_group"
    _required = ("id", "question", "responses", "label", "chosen", "rejected")

    def validate(self) -> None:
        check_pair(self.id, self.responses, self.label)
        check_text(self.id, "chosen", self.chosen)
        if (
            not isinstance(self.rejected, list)
            or not self.rejected
            or not all(isinstance(r, str) and r.strip() for r in self.rejected)
        ):
            raise SchemaError(f"{self.id}: 'rejected' must be a non-empty list of non-empty strings")
        if self.rejected_scores is not None and len(self.rejected_scores) != len(self.rejected):
            raise SchemaError(
                f"{self.id}: {len(self.rejected_scores)} rejected scores for {len(self.rejected)} rejected critiques"
            )


Sample = SFTSample | InstructSample | BenchmarkSample | PreferenceGroupSample
SAMPLE_TYPES = {cls.kind: cls for cls in (SFTSample, InstructSample, BenchmarkSample, PreferenceGroupSample)}
_KEY = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(sample_id: str) -> str:
    """WebDataset key of an id: anything but letters, digits, '_' and '-' (dots above all) becomes '_'."""
    key = _KEY.sub("_", str(sample_id))
    if not key:
        raise SchemaError("empty sample id")
    return key


def check_encodable(sample: Sample) -> None:
    """Raise SchemaError for text the tokenizer could not read (a lone surrogate from a broken JSON
    escape, say): it is refused when shards are written, not met mid-epoch."""
    for name, value in asdict(sample).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise SchemaError(
                        f"{sample.id}: '{name}' holds text that is not valid Unicode ({error.reason})"
                    ) from None


def encode(sample: Sample) -> dict[str, Any]:
    """The WebDataset dict of a sample: __key__, json bytes and the image bytes under its extension."""
    sample.validate()
    check_encodable(sample)
    ext = sample.image_ext.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise SchemaError(f"{sample.id}: image extension {ext!r} not in {IMAGE_EXTENSIONS}")
    record = {k: v for k, v in asdict(sample).items() if k not in ("image", "image_ext")}
    return {"__key__": sample_key(sample.id), "json": json.dumps(record).encode(), ext: sample.image}


def decode(raw: dict[str, Any], kind: str) -> Sample:
    """A sample from a raw WebDataset dict (bytes values); raises SchemaError when the contract is broken."""
    cls = SAMPLE_TYPES[kind]
    key = raw.get("__key__", "?")
    if "json" not in raw:
        raise SchemaError(f"{key}: no json member")
    try:
        record = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as error:
        raise SchemaError(f"{key}: unreadable json ({error})") from error
    if not isinstance(record, dict):
        raise SchemaError(f"{key}: json is not an object")
    missing = [name for name in cls._required if name not in record]
    if missing:
        raise SchemaError(f"{key}: missing field(s) {', '.join(missing)}")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        raise SchemaError(f"{key}: no image member")
    known = {name for name in cls.__dataclass_fields__ if name not in ("image", "image_ext")}
    sample = cls(**{k: v for k, v in record.items() if k in known}, image=raw[image_ext], image_ext=image_ext)
    sample.validate()
    return sample


class ShardError(ValueError):
    """A shard set that cannot be read as its manifest describes (missing, truncated or replaced
    shards, or no manifest): the set must be written again."""


class ShardWriter:
    """Writes samples to numbered shards ``<dir>/<prefix>-000000.tar`` and a manifest of counts.

    Use as a context manager. A shard set is complete or absent, never partial: the shards are
    written into ``<dir>/.writing/`` and moved into place, with the manifest last, only when the
    writer closes without an exception. An exception (or a kill) leaves the set that was there
    before as it was; a writer that finds a ``.writing`` folder left by a killed run removes it.
    While a new set moves in there is no manifest, so a kill at that moment leaves a set that
    readers refuse rather than one they misread.
    """

    def __init__(self, directory: str | Path, prefix: str = "shard", max_count: int = 1000, kind: str = "sft"):
        import webdataset as wds

        self.directory = Path(directory)
        self.staging = self.directory / WRITING
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        self.prefix = prefix
        self.kind = kind
        self.max_count = max_count
        self._writer = wds.ShardWriter(str(self.staging / f"{prefix}-%06d.tar"), maxcount=max_count, verbose=0)
        self._count = 0

    def write(self, sample: Sample) -> None:
        if sample.kind != self.kind:
            raise SchemaError(f"writer for {self.kind!r} samples got a {sample.kind!r} sample")
        self._writer.write(encode(sample))
        self._count += 1

    def close(self) -> None:
        """Finish the shards and put the set in place of the one before."""
        self._writer.close()
        counts = [min(self.max_count, self._count - i) for i in range(0, self._count, self.max_count)]
        shards = [
            {
                "url": url,
                "samples": n,
                "bytes": (self.staging / url).stat().st_size,
                "sha256": file_sha256(self.staging / url),
            }
            for url, n in ((f"{self.prefix}-{i:06d}.tar", n) for i, n in enumerate(counts))
        ]
        old = self.directory / MANIFEST
        stale = [shard["url"] for shard in json.loads(old.read_text())["shards"]] if old.exists() else []
        old.unlink(missing_ok=True)  # from here until the new manifest, readers refuse the set
        for url in stale:
            (self.directory / url).unlink(missing_ok=True)
        for shard in shards:
            os.replace(self.staging / shard["url"], self.directory / shard["url"])
        manifest = {"kind": self.kind, "samples": self._count, "shards": shards}
        temporary = self.directory / f"{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest, indent=1))
        os.replace(temporary, old)
        shutil.rmtree(self.staging)

    def abort(self) -> None:
        """Drop what was written; the set that was there before stays as it was."""
        self._writer.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_samples(path: str | Path) -> int:
    """Samples in a tar shard (members grouped by key, as WebDataset groups them), read from its
    headers; raises ShardError when the tar cannot be read to its end."""
    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    keys.add(Path(member.name).name.split(".", 1)[0])
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"{path} cannot be read to its end ({error}): it was cut short") from error
    return len(keys)


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a shard set, with each shard's path under "urls". With `verify`, every shard
    is checked against it (it exists, has the size the writer recorded, reads to its end and holds
    the samples the manifest counts): a ShardError names the first that does not."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        if (Path(directory) / WRITING).exists():
            raise FileNotFoundError(f"no {MANIFEST} in {directory}: a writer did not finish, write the set again")
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: write shards with carevl.schema.ShardWriter")
    manifest = json.loads(path.read_text())
    manifest["urls"] = [str(Path(directory) / shard["url"]) for shard in manifest["shards"]]
    if verify:
        for shard, url in zip(manifest["shards"], manifest["urls"]):
            check_shard(url, shard)
    return manifest


def read_shard_samples(directory: str | Path, kind: str) -> Iterator[Sample]:
    """Every sample of a shard set, in shard order, checked against its manifest first."""
    import webdataset as wds

    for url in read_manifest(directory)["urls"]:
        for raw in wds.WebDataset(url, shardshuffle=False):
            yield decode(raw, kind)


def check_shard(url: str, shard: dict[str, Any]) -> None:
    """Raise ShardError unless the tar at `url` is the one its manifest entry describes."""
    path = Path(url)
    if not path.is_file():
        raise ShardError(f"{url} is missing: its manifest lists it")
    size = path.stat().st_size
    if "bytes" in shard and size != shard["bytes"]:
        raise ShardError(f"{url} has {size} bytes, its manifest says {shard['bytes']}: it was cut short or replaced")
    found = shard_samples(path)
    if found != shard["samples"]:
        raise ShardError(f"{url} holds {found} samples, its manifest says {shard['samples']}")


class ReferenceMismatch(ValueError):
    """Reference log-probs that were not computed for this model or these groups."""


def checkpoint_fingerprint(model: str) -> str | None:
    """sha256 of the names, sizes and modification times of a local checkpoint's weight and config
    files (None for a hub name): a model written again at the same path has another."""
    directory = Path(model)
    if not directory.is_dir():
        return None
    files = sorted(f for f in directory.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
    return _sha256([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def shards_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's shard list (names, counts, sizes and contents as the writer hashed
    them): a shard set written again with any change has another."""
    return _sha256([(s["url"], s["samples"], s.get("bytes"), s.get("sha256")) for s in manifest["shards"]])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def group_fingerprint(sample: PreferenceGroupSample) -> str:
    """sha256 of what a group's reference log-probs are computed from: its image, question, answers
    and critiques."""
    texts = [sample.question, sample.responses, sample.chosen, sample.rejected]
    return hashlib.sha256(sample.image + json.dumps(texts).encode()).hexdigest()


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


def read_reference(directory: str | Path) -> dict[str, Any] | None:
    """The precomputed reference beside a shard set, None when there is none: "logps" ({group id:
    [chosen, rejected...]}), "groups" ({group id: group_fingerprint}), "model" and "model_files"
    (the checkpoint and its `checkpoint_fingerprint`), "shards" (the `shards_fingerprint` of the set
    it was computed over), "dtype", "max_length", "skipped"."""
    path = Path(directory) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_reference(reference: dict[str, Any], directory: str | Path, model: str) -> None:
    """Raise ReferenceMismatch, naming what differs, unless `reference` was computed with the
    checkpoint `model` over the shard set in `directory` as it is now."""
    rerun = f"run tools/reference_logps.py --model {model} --shards {directory} again (it recomputes what is stale)"
    fingerprint = checkpoint_fingerprint(model)
    if reference.get("model_files") != fingerprint or (fingerprint is None and reference.get("model") != model):
        raise ReferenceMismatch(
            f"{directory}/{REFERENCE_FILE} was computed with the checkpoint {reference.get('model')} as it was then, "
            f"not with {model} as it is now: {rerun}"
        )
    if reference.get("shards") != shards_fingerprint(read_manifest(directory, verify=False)):
        raise ReferenceMismatch(f"the groups in {directory} were written again after {REFERENCE_FILE}: {rerun}")


def question_line(item_id: str, image: str, question: str, meta: dict[str, Any] | None = None) -> str:
    """One line of a questions file (`QUESTION_FIELDS`); `image` is relative to the file."""
    return json.dumps({"id": item_id, "image": image, "question": question, "meta": meta or {}}) + "\n"
