"""The shard contract (DESIGN §3), written down once for the writers (tools) and readers (datamodules).

A shard is a WebDataset tar file. A sample is ``<key>.json`` plus ``<key>.<ext>`` holding the image's
original encoded bytes; keys contain no dots. Prompts are never stored: they are rendered at load
time from `carevl.prompts`, so training and evaluation always agree.

Every shard set has a manifest (``manifest.json`` beside the shards) listing each shard with its
sample count, which readers use to give every rank the same number of batches.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MANIFEST = "manifest.json"


class SchemaError(ValueError):
    """A sample that does not follow the shard contract; readers count and skip it."""


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
        if not isinstance(self.responses, list) or len(self.responses) != 2 or not all(isinstance(r, str) for r in self.responses):
            raise SchemaError(f"{self.id}: 'responses' must be a list of two strings")
        if self.label not in (1, 2):
            raise SchemaError(f"{self.id}: 'label' must be 1 or 2, got {self.label!r}")
        if not isinstance(self.target, str) or not self.target.strip():
            raise SchemaError(f"{self.id}: 'target' must be a non-empty string")


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
        if not isinstance(self.target, str) or not self.target.strip():
            raise SchemaError(f"{self.id}: 'target' must be a non-empty string")


SAMPLE_TYPES = {cls.kind: cls for cls in (SFTSample, InstructSample)}
_KEY = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(sample_id: str) -> str:
    """WebDataset key of an id: anything but letters, digits, '_' and '-' (dots above all) becomes '_'."""
    key = _KEY.sub("_", str(sample_id))
    if not key:
        raise SchemaError("empty sample id")
    return key


def encode(sample: SFTSample | InstructSample) -> dict[str, Any]:
    """The WebDataset dict of a sample: __key__, json bytes and the image bytes under its extension."""
    sample.validate()
    ext = sample.image_ext.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise SchemaError(f"{sample.id}: image extension {ext!r} not in {IMAGE_EXTENSIONS}")
    record = {k: v for k, v in asdict(sample).items() if k not in ("image", "image_ext")}
    return {"__key__": sample_key(sample.id), "json": json.dumps(record).encode(), ext: sample.image}


def decode(raw: dict[str, Any], kind: str) -> SFTSample | InstructSample:
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


class ShardWriter:
    """Writes samples to numbered shards ``<dir>/<prefix>-000000.tar`` and a manifest of counts.

    Use as a context manager; the manifest is written on exit.
    """

    def __init__(self, directory: str | Path, prefix: str = "shard", max_count: int = 1000, kind: str = "sft"):
        import webdataset as wds

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.kind = kind
        self.max_count = max_count
        self._writer = wds.ShardWriter(str(self.directory / f"{prefix}-%06d.tar"), maxcount=max_count, verbose=0)
        self._count = 0

    def write(self, sample: SFTSample | InstructSample) -> None:
        if sample.kind != self.kind:
            raise SchemaError(f"writer for {self.kind!r} samples got a {sample.kind!r} sample")
        self._writer.write(encode(sample))
        self._count += 1

    def close(self) -> None:
        self._writer.close()
        counts = [min(self.max_count, self._count - i) for i in range(0, self._count, self.max_count)]
        shards = [{"url": f"{self.prefix}-{i:06d}.tar", "samples": n} for i, n in enumerate(counts)]
        manifest = {"kind": self.kind, "samples": self._count, "shards": shards}
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=1))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: write shards with carevl.schema.ShardWriter")
    manifest = json.loads(path.read_text())
    manifest["urls"] = [str(Path(directory) / shard["url"]) for shard in manifest["shards"]]
    return manifest
