"""The paper's source datasets, read in their published formats, sampled and written as one questions
file (`carevl.schema.QUESTION_FIELDS`) that the ingest stage reads.

Formats:
    llava_json   a JSON list of {"id", "image" (relative to an image folder), "conversations":
                 [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}: LLaVA-Instruct-150k,
                 LLaVAR, LLaVA-Med, SVIT, ComVint. The first human turn is the question (later turns
                 lean on earlier answers).
    lrv_json     LRV-Instruction's {"annotations": [{"image_id", "question", "answer", ...}]}; images
                 are <image folder>/<image_id>.jpg (Visual Genome).
    m3it_jsonl   M3IT's jsonl: {"instruction", "inputs", "outputs", "image_base64_str": [...]}; the
                 question is the instruction and the inputs, the image the first of the list.
    parquet      Hugging Face parquet files with the image embedded ({"bytes", "path"}); `id` and
                 `question` name columns, "column.key" reads a key of a JSON string column, and a
                 column of LLaVA-style turns gives its first human turn. Presets: vlfeedback (id,
                 prompt), rlaif_v (idx, question), rlhf_v (idx, text.question), llava (id,
                 conversations: the LLaVA-format parquet releases, e.g. of SVIT).

Every record either becomes an item or is counted as skipped with its reason (no question, missing
or unreadable image); each item keeps its provenance in `meta` (source, original_id, file).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from carevl.images import image_extension, load_image, png_bytes
from carevl.schema import question_line

log = logging.getLogger(__name__)

FORMATS = ("llava_json", "lrv_json", "m3it_jsonl", "parquet")
PARQUET_PRESETS = {
    "vlfeedback": {"id": "id", "question": "prompt"},
    "rlaif_v": {"id": "idx", "question": "question"},
    "rlhf_v": {"id": "idx", "question": "text.question"},
    "llava": {"id": "id", "question": "conversations"},
}


@dataclass
class Source:
    """One dataset to draw items from.

    Args:
        name: the source's name in provenance and reports (e.g. llava_instruct, vlfeedback).
        format: one of llava_json, lrv_json, m3it_jsonl, parquet.
        path: the annotation file, or for parquet a file or a folder of *.parquet.
        images: the image folder (llava_json, lrv_json).
        sample: items to draw (seeded, without replacement); None takes every record.
        preset: parquet column names of a known dataset (vlfeedback, rlaif_v, rlhf_v).
        id_column: parquet id column (overrides the preset's).
        question_column: parquet question column, "column.key" for a key of a JSON string column.
        image_column: parquet image column.
    """

    name: str
    format: str
    path: str
    images: str | None = None
    sample: int | None = None
    preset: str | None = None
    id_column: str | None = None
    question_column: str | None = None
    image_column: str = "image"


@dataclass
class Record:
    original_id: str
    question: str | None
    image: bytes | None  # read only for the sampled records
    where: str


def clean_question(text: object) -> str | None:
    """The question without <image> tags and surrounding space; None when nothing is left."""
    if not isinstance(text, str):
        return None
    text = text.replace("<image>", "").strip()
    return text or None


def first_human_turn(conversations: object) -> str | None:
    for turn in conversations if isinstance(conversations, list) else []:
        if isinstance(turn, dict) and turn.get("from") == "human":
            return clean_question(turn.get("value"))
    return None


def _image_file(folder: str | None, name: object) -> bytes | None:
    if folder is None or not isinstance(name, str) or not name:
        return None
    path = Path(folder) / name
    return path.read_bytes() if path.is_file() else None


def index(source: Source) -> list[tuple[str, str | None, object]]:
    """(original id, question, how to get the image) for every record of the source, images unread."""
    path = Path(source.path)
    if source.format == "llava_json":
        rows = json.loads(path.read_text())
        return [(str(r.get("id")), first_human_turn(r.get("conversations")), r.get("image")) for r in rows]
    if source.format == "lrv_json":
        rows = json.loads(path.read_text())["annotations"]
        return [(str(r.get("image_id")), clean_question(r.get("question")), f"{r.get('image_id')}.jpg") for r in rows]
    if source.format == "m3it_jsonl":
        found = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                question = "\n".join(p for p in (row.get("instruction"), row.get("inputs")) if isinstance(p, str) and p)
                found.append((f"{path.name}:{number}", clean_question(question), number))
        return found
    if source.format == "parquet":
        return [(i, q, (file, row)) for file, row, i, q in _parquet_index(source)]
    raise ValueError(f"{source.name}: format must be one of {FORMATS}, got {source.format!r}")


def parquet_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no parquet files in {path}")
    return files


def _columns(source: Source) -> tuple[str, str]:
    preset = PARQUET_PRESETS.get(source.preset or "", {})
    if source.preset is not None and not preset:
        raise ValueError(f"{source.name}: preset must be one of {sorted(PARQUET_PRESETS)}, got {source.preset!r}")
    id_column, question_column = source.id_column or preset.get("id"), source.question_column or preset.get("question")
    if id_column is None or question_column is None:
        raise ValueError(f"{source.name}: parquet needs a preset or id_column and question_column")
    return id_column, question_column


def _parquet_index(source: Source) -> Iterator[tuple[Path, int, str, str | None]]:
    import pyarrow.parquet as pq

    id_column, question_column = _columns(source)
    column, _, key = question_column.partition(".")
    for file in parquet_files(Path(source.path)):
        table = pq.read_table(file, columns=list(dict.fromkeys([id_column, column])))
        for row, (record_id, value) in enumerate(zip(table[id_column].to_pylist(), table[column].to_pylist())):
            if key:
                try:
                    value = json.loads(value).get(key) if isinstance(value, str) else None
                except (ValueError, AttributeError):
                    value = None
            yield (
                file,
                row,
                str(record_id),
                first_human_turn(value) if isinstance(value, list) else clean_question(value),
            )


def parquet_images(source: Source, wanted: dict[Path, set[int]]) -> dict[tuple[Path, int], bytes | None]:
    """The embedded image bytes of the wanted rows, read a batch at a time."""
    import pyarrow.parquet as pq

    images = {}
    for file, rows in wanted.items():
        start = 0
        for batch in pq.ParquetFile(file).iter_batches(columns=[source.image_column], batch_size=256):
            for offset, cell in enumerate(batch.column(0).to_pylist()):
                if start + offset in rows:
                    images[(file, start + offset)] = cell.get("bytes") if isinstance(cell, dict) else cell
            start += batch.num_rows
    return images


def m3it_images(path: Path, wanted: set[int]) -> dict[int, bytes | None]:
    images = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if number in wanted:
            encoded = json.loads(line).get("image_base64_str") or [None]
            try:
                images[number] = base64.b64decode(encoded[0], validate=True) if encoded[0] else None
            except ValueError:
                images[number] = None
    return images


def draw(source: Source, seed: int) -> tuple[list[Record], Counter]:
    """The source's sampled records with their image bytes, and the counts of what was skipped."""
    counts = Counter()
    rows = index(source)
    usable = [row for row in rows if row[1] is not None]
    counts["skipped: no question"] = len(rows) - len(usable)
    if source.sample is not None and source.sample < len(usable):
        picked = sorted(random.Random(f"{seed}:{source.name}").sample(range(len(usable)), source.sample))
        usable = [usable[i] for i in picked]
    if source.format == "parquet":
        wanted: dict[Path, set[int]] = {}
        for _, _, (file, row) in usable:
            wanted.setdefault(file, set()).add(row)
        found = parquet_images(source, wanted)
        images = [found.get(where) for _, _, where in usable]
    elif source.format == "m3it_jsonl":
        found = m3it_images(Path(source.path), {number for _, _, number in usable})
        images = [found.get(number) for _, _, number in usable]
    else:
        images = [_image_file(source.images, name) for _, _, name in usable]
    records = [Record(i, q, image, f"{source.path}:{i}") for (i, q, _), image in zip(usable, images)]
    return records, counts


def write_questions(sources: list[Source], out: str | Path, seed: int = 0) -> dict:
    """Draw every source and write `out`/questions.jsonl with the images under `out`/images/<source>/.

    Item ids are "<source>/<original id>" (a repeated original id gets "#2", "#3", ...). Returns the
    counts per source (written, skipped by reason), also written to `out`/sources.json.
    """
    out = Path(out)
    summary = {}
    lines = []
    for source in sources:
        records, counts = draw(source, seed)
        folder = out / "images" / source.name
        folder.mkdir(parents=True, exist_ok=True)
        seen = Counter()
        for record in records:
            stored = stored_image(record.image)
            if isinstance(stored, str):
                log.warning("%s: %s skipped (%s)", source.name, record.where, stored)
                counts[f"skipped: {stored}"] += 1
                continue
            image, ext = stored
            seen[record.original_id] += 1
            suffix = f"#{seen[record.original_id]}" if seen[record.original_id] > 1 else ""
            name = f"{hashlib.sha256(image).hexdigest()}.{ext}"
            (folder / name).write_bytes(image)
            meta = {"source": source.name, "original_id": record.original_id, "file": str(source.path)}
            item_id = f"{source.name}/{record.original_id}{suffix}"
            lines.append(question_line(item_id, f"images/{source.name}/{name}", record.question, meta))
            counts["written"] += 1
        summary[source.name] = {k: v for k, v in sorted(counts.items()) if v}
        log.info("%s: %s", source.name, summary[source.name])
    (out / "questions.jsonl").write_text("".join(lines))
    (out / "sources.json").write_text(json.dumps({"seed": seed, "sources": summary}, indent=1))
    return summary


def stored_image(image: bytes | None) -> tuple[bytes, str] | str:
    """(bytes, extension) as the shards hold them (other formats re-encoded as PNG), or why not."""
    if image is None:
        return "missing image"
    try:
        decoded = load_image(image)
    except ValueError:
        return "unreadable image"
    try:
        return image, image_extension(image)
    except ValueError:
        return png_bytes(decoded), "png"
