"""The first curation stages of paper §3.1: items, candidate answers, captions and pairs. Each reads
earlier records from `workdir`, appends its own and returns a summary; `tools/curate.py` runs them
from YAML.

    ingest -> items.jsonl          images stored once under images/, by sha256
    candidates -> candidates.jsonl every model x decoding answers every item
    captions -> captions.jsonl     one detailed caption per image
    pairs -> pairs.jsonl           distinct answers of an item, paired

The stages that label the pairs are in `carevl.curation.labels`. Models are given as factories and
built one at a time, when their stage needs them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from carevl import prompts
from carevl.backends.interface import ChatModel, Reply, Sampling
from carevl.curation import cost
from carevl.curation.provenance import producer, select, selected
from carevl.curation.records import ImageStore, content_key, holds_work_folder, replace_file
from carevl.curation.units import (
    ITEMS_SELECTION,
    OnFirstUse,
    item_chat,
    items_by_id,
    opened,
    records,
    reply_record,
    run_units,
    summarize,
)
from carevl.images import load_image, png_bytes
from carevl.schema import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


@holds_work_folder
def ingest(workdir: str, source: str, images_outside: bool = False, max_failed: float = 0.0) -> dict:
    """Store images once (content-addressed) and record the image-question items.

    Every line is read on its own: a line that is not UTF-8, not JSON or not an object, an item
    without an id, question or readable image, and a duplicate id are failed records naming the
    file and line, and the other lines go on.

    Args:
        workdir: the curation work directory (created if missing).
        source: a questions file: one JSON object a line, {"id", "image" (a path relative to the
            file), "question", "meta" (optional; carried into every record and shard of the item)}
            (`carevl.schema.QUESTION_FIELDS`).
        images_outside: follow image paths that leave the questions file's folder (absolute paths,
            `..`); off, such an item fails.
        max_failed: the share of this run's units that may fail before the stage exits with an error
            (failed units are recorded with their reasons, and a rerun retries them).
    """
    store, out = ImageStore(workdir), records(workdir, "ingest")
    counts = Counter()
    new = []
    seen: set[str] = set()  # ids of this file's items
    current: list[str] = []  # their keys
    root = Path(source).parent.resolve()

    def fail(key: str, record_id: object, reason: str, where: str) -> None:
        log.warning("ingest: %s (%s)", where, reason)
        new.append({"key": key, "id": record_id if isinstance(record_id, str) else None, "error": f"{reason}: {where}"})

    for number, raw in enumerate(Path(source).read_bytes().splitlines(), start=1):
        where = f"{source}:{number}"
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            fail(content_key("ingest", source, number), None, "not_utf8", where)
            continue
        except ValueError:
            fail(content_key("ingest", source, number), None, "unparseable", where)
            continue
        if not isinstance(row, dict):
            fail(content_key("ingest", source, number), None, "not_an_object", where)
            continue
        image, problem = image_file(root, row.get("image"), images_outside)
        key = content_key("ingest", row, hashlib.sha256(image).hexdigest() if image is not None else problem)
        record_id, question = row.get("id"), row.get("question")
        if out.done(key) and record_id not in seen:
            counts["skipped"] += 1
            seen.add(record_id)
            current.append(key)
        elif not isinstance(record_id, str) or not record_id or not isinstance(question, str) or not question.strip():
            fail(key, record_id, "missing_field", f"{where}: id and question are required")
        elif problem is not None:
            fail(key, record_id, problem, where)
        elif record_id in seen:
            fail(key, record_id, "duplicate_id", f"{where}: {record_id}")
        else:
            try:
                decoded = load_image(image)
            except ValueError as error:
                fail(key, record_id, "corrupt_image", f"{where}: {error}")
                continue
            ext = Path(row["image"]).suffix.lstrip(".").lower().replace("jpeg", "jpg") or "png"
            if ext not in IMAGE_EXTENSIONS:  # shards hold PNG, JPEG or WebP: anything else is re-encoded once
                image, ext = png_bytes(decoded), "png"
                counts["converted to png"] += 1
            seen.add(record_id)
            current.append(key)
            item = {"image": store.put(image, ext), "image_ext": ext, "question": question.strip()}
            new.append({"key": key, "id": record_id, **item, "meta": row.get("meta") or {}})
    out.append(new)
    replace_file(Path(workdir) / ITEMS_SELECTION, json.dumps({"source": str(source), "keys": current}))
    for record in new:
        counts["failed: " + record["error"].split(":")[0] if "error" in record else "done"] += 1
    return summarize("ingest", counts, max_failed)


def image_file(root: Path, name: object, outside: bool) -> tuple[bytes | None, str | None]:
    """(the bytes of the image file `name` relative to `root`, None) or (None, why it cannot be read)."""
    if not isinstance(name, str) or not name:
        return None, "missing_field"
    path = (root / name).resolve()
    if not outside and not path.is_relative_to(root):
        return None, "outside_folder"
    if not path.is_file():
        return None, "missing_image"
    return path.read_bytes(), None


# -- candidates and captions -------------------------------------------------------------------------


def default_decodings() -> dict[str, Sampling]:
    return {"greedy": Sampling(temperature=0.0, max_tokens=512), "t1": Sampling(temperature=1.0, max_tokens=512)}


@holds_work_folder
def candidates(
    workdir: str,
    models: dict[str, Callable[[], ChatModel]],
    decodings: dict[str, Sampling] | None = None,
    prices: dict[str, cost.Prices] | None = None,
    max_usd: float | None = None,
    chunk_size: int = 64,
    max_failed: float = 0.0,
) -> dict:
    """Every model answers every item under every decoding (paper: 5 models, greedy and temperature 1.0).

    Args:
        workdir: the curation work directory.
        models: name -> chat model; built one at a time.
        decodings: name -> sampling settings (default: greedy and temperature 1.0, 512 tokens).
        prices: model name -> USD per million tokens, for models on a paid endpoint: their token
            and cost estimate is printed before any request, and `max_usd` is enforced.
        max_usd: refuse to start when the paid models' expected cost is above this.
        chunk_size: items per generate call (and per write to disk).
        max_failed: the share of this run's units that may fail before the stage exits with an error
            (failed units are recorded with their reasons, and a rerun retries them).
    """
    decodings = decodings or default_decodings()
    store, items, out = ImageStore(workdir), items_by_id(workdir), records(workdir, "candidates")
    counts = Counter()
    producers = {name: producer(build) for name, build in models.items()}
    plan = {
        (name, decoding): [
            (content_key("candidate", item["key"], name, producers[name], decoding, asdict(sampling)), item)
            for item in items.values()
        ]
        for name in models
        for decoding, sampling in decodings.items()
    }
    select(out, [key for units in plan.values() for key, _ in units])
    paid = [
        cost.check(
            f"candidates {name}/{decoding}",
            [item_chat(store, item, item["question"]) for key, item in units if not out.done(key)],
            decodings[decoding],
            prices[name],
        )
        for (name, decoding), units in plan.items()
        if prices and name in prices
    ]
    if max_usd is not None and sum(f["usd"] for f in paid) > max_usd:
        raise RuntimeError(f"expected cost ${sum(f['usd'] for f in paid):.2f} is above max_usd ${max_usd:.2f}")
    for name, build in models.items():
        if all(out.done(key) for decoding in decodings for key, _ in plan[(name, decoding)]):
            counts["skipped"] += sum(len(dict(plan[(name, decoding)])) for decoding in decodings)
            continue
        with opened(build, name) as (model, failure):  # once for all its decodings
            for decoding, sampling in decodings.items():

                def work(chunk, write, model=model, failure=failure, name=name, decoding=decoding, sampling=sampling):
                    chats = [item_chat(store, item, item["question"]) for _, item in chunk]
                    replies = model.generate(chats, sampling) if model else [Reply(error=failure)] * len(chunk)
                    write(
                        [
                            reply_record(
                                {
                                    "key": key,
                                    "item": item["id"],
                                    "model": name,
                                    "decoding": decoding,
                                    "producer": producers[name],
                                },
                                reply,
                                lambda texts: {"answers": texts},
                            )
                            for (key, item), reply in zip(chunk, replies)
                        ]
                    )

                counts.update(run_units(out, plan[(name, decoding)], work, chunk_size, f"candidates {name}/{decoding}"))
    return summarize("candidates", counts, max_failed)


@holds_work_folder
def captions(
    workdir: str,
    captioner: Callable[[], ChatModel],
    prompt: str = prompts.CAPTION_REQUEST,
    sampling: Sampling | None = None,
    prices: cost.Prices | None = None,
    max_usd: float | None = None,
    chunk_size: int = 64,
    max_failed: float = 0.0,
) -> dict:
    """One detailed caption per image, from a strong captioner (paper: Qwen2-VL-72B).

    Args:
        workdir: the curation work directory.
        captioner: the captioning chat model.
        prompt: the caption request.
        sampling: decoding settings (greedy, 1024 tokens by default).
        prices: USD per million tokens when the captioner is a paid endpoint: the estimate is
            printed before any request.
        max_usd: refuse to start above this expected cost (with `prices`).
        chunk_size: images per generate call (and per write to disk).
        max_failed: the share of this run's units that may fail before the stage exits with an error
            (failed units are recorded with their reasons, and a rerun retries them).
    """
    sampling = sampling or Sampling(max_tokens=1024)
    store, out = ImageStore(workdir), records(workdir, "captions")
    images = {item["image"]: item for item in items_by_id(workdir).values()}
    made_by = producer(captioner)
    units = [(content_key("caption", sha, prompt, asdict(sampling), made_by), item) for sha, item in images.items()]
    select(out, [key for key, _ in units])
    if prices is not None:
        cost.check(
            "captions",
            [item_chat(store, item, prompt) for key, item in units if not out.done(key)],
            sampling,
            prices,
            max_usd=max_usd,
        )
    model = OnFirstUse(captioner)

    def work(chunk: list, write) -> None:
        replies = model().generate([item_chat(store, item, prompt) for _, item in chunk], sampling)
        write(
            [
                reply_record(
                    {"key": key, "image": item["image"], "producer": made_by},
                    reply,
                    lambda texts: {"caption": texts[0].strip()},
                )
                for (key, item), reply in zip(chunk, replies)
            ]
        )

    with model:
        counts = run_units(out, units, work, chunk_size, "captions")
    return summarize("captions", counts, max_failed)


# -- pairs -----------------------------------------------------------------------------------------


def normalized(answer: str) -> str:
    return " ".join(answer.split()).casefold().rstrip(".")


@holds_work_folder
def pairs(workdir: str, max_pairs_per_item: int | None = None, seed: int = 0) -> dict:
    """Pair the distinct answers of each item.

    Answers equal up to case, spacing and a final full stop are one answer. Each pair's order is
    shuffled (seeded), so neither position is favoured.

    Args:
        workdir: the curation work directory.
        max_pairs_per_item: keep at most this many pairs per item (a seeded choice); None keeps all.
        seed: seed of the order and the choice.
    """
    counts = Counter()
    answers: dict[str, dict[str, dict]] = defaultdict(dict)
    for record in sorted(selected(records(workdir, "candidates")), key=lambda r: r["key"]):
        for index, text in enumerate(record["answers"]):
            if not text.strip():
                counts["dropped: empty answer"] += 1
                continue
            known = answers[record["item"]].setdefault(normalized(text), {"text": text.strip(), "sources": []})
            known["sources"].append(f"{record['model']}/{record['decoding']}/{index}")
    out = records(workdir, "pairs")
    new, current = [], []
    for item_id, distinct in sorted(answers.items()):
        counts["identical answers merged"] += sum(len(a["sources"]) - 1 for a in distinct.values())
        options = sorted(distinct.values(), key=lambda a: a["text"])
        combos = list(itertools.combinations(options, 2))
        rng = random.Random(content_key("pairs", item_id, seed))
        if max_pairs_per_item is not None and len(combos) > max_pairs_per_item:
            combos = rng.sample(combos, max_pairs_per_item)
            counts["dropped: over max_pairs_per_item"] += (
                len(list(itertools.combinations(options, 2))) - max_pairs_per_item
            )
        if len(options) < 2:
            counts["items with one distinct answer"] += 1
        for first, second in combos:
            if rng.random() < 0.5:
                first, second = second, first
            key = content_key("pair", item_id, first["text"], second["text"])
            current.append(key)
            counts["skipped" if out.done(key) else "done"] += 1
            if not out.done(key):
                new.append(
                    {
                        "key": key,
                        "item": item_id,
                        "responses": [first["text"], second["text"]],
                        "sources": [first["sources"], second["sources"]],
                    }
                )
    out.append(new)
    select(out, current)
    return summarize("pairs", counts)
