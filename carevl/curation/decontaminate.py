"""Training items that overlap the evaluation benchmarks, found and taken out before any model answers them.

An item is removed when it matches a benchmark record by any of:

    image_exact       the same image bytes (sha256)
    image_perceptual  the same picture resized, re-encoded or lightly edited: 64-bit DCT hashes (pHash)
                      at most `max_hash_distance` bits apart
    question_exact    the same question once normalised (case, punctuation, whitespace, an <image> tag),
                      unless the benchmark asks it of `template_questions` or more pictures
    question_ngram    a reworded question: at least `min_ngram_overlap` of the shorter question's word
                      n-grams, and at least `min_shared_ngrams` of them, appear in the other, not
                      counting template phrases (n-grams found in the questions of
                      `template_questions` or more benchmark records: "the bottom of the image
                      shows", MathVerse's fixed instruction), which say nothing about the content

Questions shorter than `min_question_words` words ("Describe the image.") are generic instructions that
many datasets share with the benchmarks over different images: they match only through the image.
Benchmark records come from shard sets (`tools/convert_benchmark.py`: images and questions) or from
the releases' jsonl files (questions only; the text-only copies in ../shared/benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from carevl import benchmarks as bench
from carevl.curation.records import holds_work_folder, replace_file
from carevl.images import load_image

log = logging.getLogger(__name__)

REPORT = "decontamination.json"


class StaleDecontamination(RuntimeError):
    """Items were ingested after the last decontamination: they have not been checked."""


@dataclass(frozen=True)
class Entry:
    """What matching needs of one record, training item or benchmark record."""

    id: str
    question: str
    sha256: str | None = None
    phash: int | None = None
    benchmark: str | None = None


def normalise(question: str) -> str:
    """Lower case, no <image> tag, punctuation as spaces, single spaces."""
    text = question.lower().replace("<image>", " ")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _dct_matrix(size: int) -> np.ndarray:
    k = np.arange(size)[:, None]
    x = np.arange(size)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * size))


_DCT = _dct_matrix(32)


def perceptual_hash(image_bytes: bytes) -> int:
    """pHash: the 8x8 lowest frequencies (DC term left out) of the 32x32 grey image's DCT, each bit
    set where the coefficient exceeds their median. Survives resizing, re-encoding and small edits."""
    from PIL import Image

    grey = load_image(image_bytes).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8].flatten()[1:]
    bits = low > np.median(low)
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def image_entry(entry_id: str, question: str, image: bytes | None, benchmark: str | None = None) -> Entry:
    if image is None:
        return Entry(entry_id, question, benchmark=benchmark)
    return Entry(entry_id, question, hashlib.sha256(image).hexdigest(), perceptual_hash(image), benchmark)


def benchmark_entries(source: str | Path) -> list[Entry]:
    """The records of a benchmark shard set (images and questions) or release jsonl (questions)."""
    from carevl.schema import read_shard_samples

    path = Path(source)
    if path.is_dir():
        return [image_entry(s.id, s.question, s.image, s.benchmark) for s in read_shard_samples(path, "benchmark")]
    entries = []
    for record in bench.read_jsonl(path):
        fields = bench.mllm_judge_fields(record) if "instruction" in record else bench.vlrb_fields(record)
        entries.append(Entry(fields["id"], fields["question"], benchmark=fields["benchmark"]))
    return entries


@dataclass(frozen=True)
class Thresholds:
    max_hash_distance: int = 8
    ngram: int = 5
    min_ngram_overlap: float = 0.6
    min_question_words: int = 6
    template_questions: int = 5
    min_shared_ngrams: int = 3


class BenchmarkIndex:
    """Benchmark records indexed by image hash, perceptual hash, normalised question and n-gram."""

    def __init__(self, records: list[Entry], limits: Thresholds):
        self.records, self.limits = records, limits
        self.by_sha = defaultdict(list)
        for record in records:
            if record.sha256:
                self.by_sha[record.sha256].append(record)
        self.hashed = [r for r in records if r.phash is not None]
        self.hashes = np.array([r.phash for r in self.hashed], dtype=np.uint64)
        self.texts = [normalise(record.question) for record in records]
        self.by_text, self.by_gram, self.grams_of = defaultdict(list), defaultdict(set), {}
        for index, record in enumerate(records):
            words = self.texts[index].split()
            if len(words) < limits.min_question_words:
                continue
            self.by_text[self.texts[index]].append(record)
            self.grams_of[index] = ngrams(words, limits.ngram)
            for gram in self.grams_of[index]:
                self.by_gram[gram].add(index)
        # a question or phrase asked of `template_questions` or more benchmark pictures is an instruction, not content
        self.templates = {gram for gram, found in self.by_gram.items() if len(found) >= limits.template_questions}
        self.by_text = {text: found for text, found in self.by_text.items() if len(found) < limits.template_questions}

    def matches(self, item: Entry) -> list[dict]:
        """Every benchmark record `item` overlaps: {reason, benchmark, record, distance or overlap}."""
        found = []

        def add(reason: str, record: Entry, **detail) -> None:
            found.append({"reason": reason, "benchmark": record.benchmark, "record": record.id, **detail})

        for record in self.by_sha.get(item.sha256, []) if item.sha256 else []:
            add("image_exact", record)
        if item.phash is not None and len(self.hashes):
            distances = np.bitwise_count(self.hashes ^ np.uint64(item.phash))
            for index in np.flatnonzero(distances <= self.limits.max_hash_distance):
                if self.hashed[index].sha256 != item.sha256:
                    add("image_perceptual", self.hashed[index], distance=int(distances[index]))
        words = normalise(item.question).split()
        if len(words) < self.limits.min_question_words:
            return found
        text = " ".join(words)
        for record in self.by_text.get(text, []):
            add("question_exact", record)
        grams = ngrams(words, self.limits.ngram)
        shared = Counter(index for gram in grams - self.templates for index in self.by_gram.get(gram, ()))
        for index, count in shared.items():
            overlap = count / max(1, min(len(grams), len(self.grams_of[index])))
            enough = count >= self.limits.min_shared_ngrams and overlap >= self.limits.min_ngram_overlap
            if enough and self.texts[index] != text:
                add("question_ngram", self.records[index], overlap=round(overlap, 3))
        return found


def find_overlaps(items: list[Entry], records: list[Entry], limits: Thresholds) -> dict[str, list[dict]]:
    """For each item that overlaps a benchmark record, its matches (`BenchmarkIndex.matches`)."""
    index = BenchmarkIndex(records, limits)
    found = {item.id: index.matches(item) for item in items}
    return {item_id: matches for item_id, matches in found.items() if matches}


@holds_work_folder
def decontaminate(
    workdir: str,
    benchmarks: list[str],
    max_hash_distance: int = 8,
    ngram: int = 5,
    min_ngram_overlap: float = 0.6,
    min_question_words: int = 6,
    template_questions: int = 5,
    min_shared_ngrams: int = 3,
    examples: int = 5,
) -> dict:
    """Take the items that overlap the evaluation benchmarks out of curation (run after ingest,
    before candidates) and write the report, decontamination.json, under the work directory.

    Later stages read the items without the removed ones; items ingested after this stage make
    them stop with an error until it runs again.

    Args:
        workdir: the curation work directory.
        benchmarks: benchmark shard directories (tools/convert_benchmark.py; images and questions) or
            release jsonl files (VL-RewardBench's data.jsonl, MLLM-as-a-Judge's pair.jsonl; questions only).
        max_hash_distance: perceptual hashes at most this many bits apart (of 64) are the same picture.
        ngram: word n-gram length for reworded questions.
        min_ngram_overlap: the share of the shorter question's n-grams found in the other that makes
            a reworded duplicate.
        min_question_words: shorter questions are generic instructions and match only through the image.
        template_questions: a question asked of this many benchmark records matches only through
            the image, and an n-gram found in as many records' questions is a template phrase that
            does not count towards a reworded match.
        min_shared_ngrams: a reworded match shares at least this many n-grams (two short questions
            differing in their last word share two 5-grams: "what is the title of this book / design").
        examples: matches quoted in the report per reason.
    """
    from carevl.curation.records import ImageStore
    from carevl.curation.units import items_by_id, summarize

    limits = Thresholds(
        max_hash_distance, ngram, min_ngram_overlap, min_question_words, template_questions, min_shared_ngrams
    )
    records = [entry for source in benchmarks for entry in benchmark_entries(source)]
    if not records:
        raise ValueError(f"no benchmark records in {benchmarks}")
    store = ImageStore(workdir)
    items = items_by_id(workdir, decontaminated=False)
    entries = [
        image_entry(item_id, item["question"], store.get(item["image"], item["image_ext"]))
        for item_id, item in tqdm(items.items(), desc="decontaminate: hashing items", unit="item", disable=None)
    ]
    found = find_overlaps(entries, records, limits)
    questions = {r.id: r.question for r in records}
    report = overlap_report(items, found, questions, limits, examples)
    report.update(
        {
            "benchmarks": {str(s): n for s, n in Counter(r.benchmark for r in records).items()},
            "sources": [str(s) for s in benchmarks],
            "checked": sorted(item["key"] for item in items.values()),
            "removed_keys": sorted(items[i]["key"] for i in found),
        }
    )
    replace_file(Path(workdir) / REPORT, json.dumps(report, indent=1))
    counts = Counter({"kept": len(items) - len(found), "removed": len(found)})
    counts.update({f"by {reason}": n for reason, n in report["by_reason"].items()})
    return summarize("decontaminate", counts)


def overlap_report(
    items: dict[str, dict], found: dict[str, list[dict]], questions: dict[str, str], limits: Thresholds, examples: int
) -> dict:
    """Counts per reason, per benchmark and per source, and a few quoted examples per reason."""
    by_reason, by_benchmark, by_source = Counter(), Counter(), Counter()
    quoted: dict[str, list[dict]] = defaultdict(list)
    for item_id, matches in found.items():
        item = items[item_id]
        by_source[str((item.get("meta") or {}).get("source", "unknown"))] += 1
        for reason in {m["reason"] for m in matches}:
            by_reason[reason] += 1
        for name in {m["benchmark"] for m in matches}:
            by_benchmark[str(name)] += 1
        for m in matches:
            if len(quoted[m["reason"]]) < examples:
                quoted[m["reason"]].append(
                    {"item": item_id, "question": item["question"], **m, "record_question": questions[m["record"]]}
                )
    sources = Counter(str((item.get("meta") or {}).get("source", "unknown")) for item in items.values())
    return {
        "thresholds": asdict(limits),
        "items": len(items),
        "removed": len(found),
        "by_reason": dict(sorted(by_reason.items())),
        "by_benchmark": dict(sorted(by_benchmark.items())),
        "by_source": {s: {"items": n, "removed": by_source.get(s, 0)} for s, n in sorted(sources.items())},
        "examples": dict(quoted),
        "matches": found,
    }


def removed_keys(workdir: str | Path, selected: list[str]) -> set[str]:
    """The keys the last decontamination removed (none when it never ran). Raises StaleDecontamination
    when a selected item was ingested after it."""
    path = Path(workdir) / REPORT
    if not path.exists():
        return set()
    report = json.loads(path.read_text())
    unchecked = set(selected) - set(report["checked"])
    if unchecked:
        raise StaleDecontamination(
            f"{len(unchecked)} items were ingested after the last decontamination ({path}): "
            "run the decontaminate stage again before the next stage"
        )
    return set(report["removed_keys"])
