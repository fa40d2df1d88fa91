"""The curation stages of paper §3.1-3.3. Each reads earlier records from `workdir`, appends its own
and returns a summary; `tools/curate.py` runs them from YAML.

    ingest -> items.jsonl          images stored once under images/, by sha256
    candidates -> candidates.jsonl every model x decoding answers every item
    captions -> captions.jsonl     one detailed caption per image
    pairs -> pairs.jsonl           distinct answers of an item, paired
    judge -> judgments.jsonl       the strong LVLM's verdict and explanation (optionally both orders)
    votes -> scores.jsonl          every expert scores every distinct answer given question + caption
    split -> split.jsonl           votes, confidence and (re)label of every pair
    sft_shards -> sft/             high-confidence pairs as SFT shards (target: explanation + verdict)

Models are given as factories and built one at a time, when their stage needs them.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from carevl import prompts
from carevl.backends.interface import BatchChatModel, Chat, ChatModel, Reply, RewardModel, Sampling, chunks
from carevl.curation import cost
from carevl.curation.provenance import producer, select, selected, selection
from carevl.curation.records import ImageStore, Records, content_key, holds_work_folder, replace_file
from carevl.curation.split import HIGH, count_votes, decide
from carevl.images import load_image, png_bytes
from carevl.schema import IMAGE_EXTENSIONS

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


def build_model(build, name: str):
    """(model, None), or (None, the reason) when `build` raises: a model that cannot load (a missing
    checkpoint, a wrong head, too little memory) fails its own units, recorded with that reason, and
    the stage goes on with the next model; a rerun retries them."""
    try:
        return (build() if callable(build) else build), None
    except Exception as error:
        log.exception("%s could not be built; its units are recorded as failed", name)
        return None, f"model_failed: {type(error).__name__}: {str(error)[:300]}"


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
        model, failure = build_model(build, name)  # once for all its decodings
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
        model = None
        free_memory()
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
    model = None

    def work(chunk: list, write) -> None:
        nonlocal model
        model = model or captioner()
        replies = model.generate([item_chat(store, item, prompt) for _, item in chunk], sampling)
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

    counts = run_units(out, units, work, chunk_size, "captions")
    return summarize("captions", counts, max_failed)


def caption_by_image(workdir: str | Path) -> dict[str, str]:
    """The captions of the captioner the last captions run was configured with."""
    return {r["image"]: r["caption"] for r in selected(records(workdir, "captions"))}


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


# -- the strong LVLM judge -----------------------------------------------------------------------------


@holds_work_folder
def judge(
    workdir: str,
    model: Callable[[], ChatModel] | None = None,
    batch: Callable[[], BatchChatModel] | None = None,
    both_orders: bool = False,
    sampling: Sampling | None = None,
    structured: bool = True,
    prices: cost.Prices | None = None,
    image_detail: str = "auto",
    max_usd: float | None = None,
    estimate_only: bool = False,
    chunk_size: int = 1024,
    max_failed: float = 0.0,
) -> dict:
    """The strong LVLM (paper: GPT-4o) judges every pair: a verdict and an explanation.

    The explanation becomes the SFT target. A token and cost estimate is printed before any request is sent.

    Args:
        workdir: the curation work directory.
        model: a live chat model (e.g. carevl.backends.openai_api.OpenAIChat).
        batch: instead of `model`, the Batch API (carevl.backends.openai_api.OpenAIBatch).
        both_orders: also judge each pair with the answers swapped; the split keeps a verdict only
            when both orders agree, cancelling position bias.
        sampling: decoding settings (default greedy, 1024 tokens).
        structured: ask for JSON {"explanation", "verdict"} (structured output); false for models
            without it (GPT-4o 2024-05-13): the prompt then asks for a final verdict line instead.
        prices: USD per million tokens for the estimate (default GPT-4o's).
        image_detail: GPT-4o image detail for the estimate ("low", "high", "auto").
        max_usd: refuse to start when the expected cost is above this.
        estimate_only: print the estimate and stop.
        chunk_size: pairs per generate call in live mode. Replies from a live endpoint are written
            as they arrive, so a kill loses only the requests in flight.
        max_failed: the share of this run's units that may fail before the stage exits with an error
            (failed units are recorded with their reasons, and a rerun retries them).
    """
    if (model is None) == (batch is None):
        raise ValueError("give exactly one of `model` (live) and `batch` (Batch API)")
    sampling = sampling or Sampling(max_tokens=1024)
    schema = prompts.JUDGMENT_SCHEMA if structured else None
    store, items, out = ImageStore(workdir), items_by_id(workdir), records(workdir, "judge")
    made_by = producer(model if model is not None else batch)
    template = prompts.CURATION_JUDGE_TEMPLATE + ("" if structured else prompts.FREE_TEXT_VERDICT)
    asked = (template, asdict(sampling), structured, made_by)  # as before for structured: old records stay
    units = []
    for pair in selected(records(workdir, "pairs")):
        for order in ("12", "21") if both_orders else ("12",):
            responses = pair["responses"] if order == "12" else pair["responses"][::-1]
            units.append((content_key("judgment", pair["key"], order, *asked), (pair, order, responses)))
    select(out, [key for key, _ in units])
    todo = [(key, unit) for key, unit in units if not out.done(key)]

    def chat(unit) -> Chat:
        pair, _, responses = unit
        question = items[pair["item"]]["question"]
        return item_chat(store, items[pair["item"]], prompts.curation_judge_prompt(question, responses, structured))

    figures = cost.check(
        "judge",
        [chat(unit) for _, unit in todo],
        sampling,
        prices or cost.Prices(),
        image_detail,
        batch is not None,
        max_usd,
    )
    if estimate_only:
        return {"stage": "judge", "estimate": figures}

    def record(key: str, unit, reply: Reply) -> dict:
        pair, order, _ = unit

        def fields(texts: list[str]) -> dict:
            verdict, explanation = prompts.parse_judgment(texts[0])
            if verdict is None or explanation is None:
                raise ValueError("no verdict or no explanation")
            return {"verdict": verdict if order == "12" else 3 - verdict, "explanation": explanation}

        return reply_record({"key": key, "pair": pair["key"], "order": order, "producer": made_by}, reply, fields)

    if batch is not None:
        counts = Counter(skipped=len(units) - len(todo))
        by_key = dict(todo)

        def on_replies(replies: dict[str, Reply]) -> None:
            written = [
                record(key, by_key[key], reply) for key, reply in replies.items() if key in by_key and not out.done(key)
            ]
            out.append(written)
            counts.update("failed: " + r["error"].split(":")[0] if "error" in r else "done" for r in written)

        batch().run(
            {key: chat(unit) for key, unit in todo}, sampling, schema, Path(workdir) / "judge.batches.jsonl", on_replies
        )
        return summarize("judge", counts, max_failed)

    live = None

    def work(chunk: list, write) -> None:
        nonlocal live
        live = live or model()
        live.generate_each(
            [chat(unit) for _, unit in chunk], sampling, schema, lambda i, reply: write([record(*chunk[i], reply)])
        )

    return summarize("judge", run_units(out, units, work, chunk_size, "judge"), max_failed)


# -- expert votes ------------------------------------------------------------------------------------


def score_key(expert: str, made_by: dict, item: dict, captions_: dict[str, str], answer: str) -> str:
    """An expert's score depends on the expert, the prompt, the question, the caption and the answer
    only: items that share all of them share the score."""
    question, caption = item["question"], captions_[item["image"]]
    return content_key("score", expert, made_by, prompts.EXPERT_TEMPLATE, question, caption, answer)


@holds_work_folder
def votes(
    workdir: str, experts: dict[str, Callable[[], RewardModel]], chunk_size: int = 256, max_failed: float = 0.0
) -> dict:
    """Every expert reward model scores every distinct answer, given question and caption.

    The experts are text-only: the image caption stands in for the image (paper: M = 5 experts). A pair's votes are
    derived from these scores in the split, so an answer in many pairs is scored once per expert.

    Args:
        workdir: the curation work directory.
        experts: name -> reward model; built one at a time.
        chunk_size: answers per scoring call (and per write to disk).
        max_failed: the share of this run's units that may fail before the stage exits with an error
            (failed units are recorded with their reasons, and a rerun retries them).
    """
    items, captions_ = items_by_id(workdir), caption_by_image(workdir)
    out = records(workdir, "votes")
    answers = sorted(
        {(pair["item"], text) for pair in selected(records(workdir, "pairs")) for text in pair["responses"]}
    )
    counts = Counter()
    missing = {item for item, _ in answers if items[item]["image"] not in captions_}
    if missing:
        counts["failed: no caption"] = sum(item in missing for item, _ in answers)
        log.warning("votes: %d items have no caption; run the captions stage first", len(missing))
    producers = {name: producer(build) for name, build in sorted(experts.items())}
    plan = {
        name: [
            (score_key(name, producers[name], items[item], captions_, text), (item, text))
            for item, text in answers
            if item not in missing
        ]
        for name in experts
    }
    select(out, [key for units in plan.values() for key, _ in units], experts=producers)
    for name, build in experts.items():
        units = plan[name]
        if all(out.done(key) for key, _ in units):
            counts["skipped"] += len(dict(units))
            continue
        expert, failure = build_model(build, name)

        def work(chunk: list, write, expert=expert, name=name, failure=failure) -> None:
            conversations = [
                prompts.expert_conversation(items[item]["question"], captions_[items[item]["image"]], text)
                for _, (item, text) in chunk
            ]
            scores = expert.score(conversations) if expert else [None] * len(chunk)
            write(
                [
                    {
                        "key": key,
                        "expert": name,
                        "producer": producers[name],
                        "item": item,
                        "answer": text,
                        **({"score": s} if s is not None else {"error": failure or "unscored"}),
                    }
                    for (key, (item, text)), s in zip(chunk, scores)
                ]
            )

        counts.update(run_units(out, units, work, chunk_size, f"votes {name}"))
        expert = None
        free_memory()
    return summarize("votes", counts, max_failed)


# -- the confidence split ---------------------------------------------------------------------------


@holds_work_folder
def split(workdir: str, tau: int | None = None) -> dict:
    """Join judgments and expert scores into the confidence split and relabel (carevl.curation.split).

    Args:
        workdir: the curation work directory.
        tau: expert votes needed for high confidence (default: number of experts - 1).
    """
    votes_ = records(workdir, "votes")
    chosen = selection(votes_)
    if chosen is None or not chosen["experts"]:
        raise RuntimeError("no expert scores: run the votes stage first")
    experts = chosen["experts"]  # the experts the last votes run was configured with: M is theirs
    scores = {record["key"]: record["score"] for record in selected(votes_)}
    items, captions_ = items_by_id(workdir), caption_by_image(workdir)
    tau = len(experts) - 1 if tau is None else tau
    judgments: dict[str, dict[str, dict]] = defaultdict(dict)
    for record in selected(records(workdir, "judge"), failed_too=True):
        judgments[record["pair"]][record["order"]] = record
    counts = Counter()
    rows = []
    for pair in sorted(selected(records(workdir, "pairs")), key=lambda p: p["key"]):
        item = items[pair["item"]]
        keys = [
            [score_key(name, made_by, item, captions_, text) for name, made_by in experts.items()]
            if item["image"] in captions_
            else []
            for text in pair["responses"]
        ]
        if any(len(k) != len(experts) or not all(key in scores for key in k) for k in keys):
            counts["skipped: missing expert scores"] += 1
            continue
        tally = count_votes([(scores[a], scores[b]) for a, b in zip(*keys)])
        seen = judgments.get(pair["key"], {})
        verdicts = {order: j.get("verdict") for order, j in seen.items()}
        agreed = set(verdicts.values())
        verdict = agreed.pop() if len(agreed) == 1 and None not in agreed and len(verdicts) > 0 else None
        if len(verdicts) == 2 and None not in verdicts.values() and len(set(verdicts.values())) == 2:
            counts["judge inconsistent across orders"] += 1
        decision = decide(tally, verdict, tau)
        counts[f"{decision.confidence}: {decision.rule}"] += 1
        rows.append(
            {
                "key": pair["key"],
                "item": pair["item"],
                "responses": pair["responses"],
                "votes": [tally.v1, tally.v2],
                "ties": tally.ties,
                "judge": verdict,
                "confidence": decision.confidence,
                "label": decision.label,
                "rule": decision.rule,
                "explanation": (seen.get("12") or {}).get("explanation"),
            }
        )
    records(workdir, "split").rewrite(rows)
    counts["tau"], counts["experts"] = tau, len(experts)
    return summarize("split", counts)


@holds_work_folder
def sft_shards(
    workdir: str,
    labels: str = "high_confidence",
    out: str | None = None,
    shard_size: int = 1000,
    max_target_chars: int = 8000,
    heldout: float = 0.0,
    heldout_out: str | None = None,
) -> dict:
    """Write SFT shards: the high-confidence pairs, or every judged pair (the no-experts baseline).

    The target is the judge's explanation followed by the verdict line. Targets longer than
    `max_target_chars` are dropped and counted. With `heldout`, that share of the items (chosen by a
    hash of the item id: the same items on every run, all pairs of an item on one side) goes to a
    held-out shard set instead, the SFT run's validation set.

    Args:
        workdir: the curation work directory.
        labels: "high_confidence" (CAREVL: pairs where the experts reached tau and agree with the
            judge) or "judge" (every pair the judge gave a verdict, with the judge's label: the
            paper's ablation without experts).
        out: shard directory (default <workdir>/sft, or <workdir>/sft-judge for labels "judge").
        shard_size: samples per shard.
        max_target_chars: longest explanation kept.
        heldout: share of items held out for validation (0: none).
        heldout_out: held-out shard directory (default: `out` with "-heldout" appended).
    """
    from contextlib import ExitStack

    from carevl.schema import SFTSample, ShardWriter

    if labels not in ("high_confidence", "judge"):
        raise ValueError(f"labels must be 'high_confidence' or 'judge', got {labels!r}")
    store, items = ImageStore(workdir), items_by_id(workdir)
    counts = Counter()
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"heldout must be in [0, 1), got {heldout}")
    out = out or str(Path(workdir) / ("sft" if labels == "high_confidence" else "sft-judge"))
    with ExitStack() as stack:
        writer = stack.enter_context(ShardWriter(Path(out), prefix="sft", max_count=shard_size, kind="sft"))
        held = (
            stack.enter_context(ShardWriter(Path(heldout_out or out + "-heldout"), prefix="sft", kind="sft"))
            if heldout
            else None
        )
        for row in records(workdir, "split").ok():
            if labels == "high_confidence" and row["confidence"] != HIGH:
                counts[f"not written: {row['confidence']} confidence"] += 1
                continue
            label = row["label"] if labels == "high_confidence" else row["judge"]
            if label is None:
                counts["not written: no judge verdict"] += 1
                continue
            if not row["explanation"] or len(row["explanation"]) > max_target_chars:
                counts["dropped: explanation missing or too long"] += 1
                continue
            item = items[row["item"]]
            held_out = held is not None and _share(row["item"]) < heldout
            written = write_or_count(
                held if held_out else writer,
                counts,
                SFTSample(
                    id=row["key"][:32],
                    question=item["question"],
                    responses=row["responses"],
                    label=label,
                    target=f"{row['explanation']} {prompts.verdict_line(label)}",
                    source="carevl-curation",
                    image=store.get(item["image"], item["image_ext"]),
                    image_ext=item["image_ext"],
                    meta={
                        "item": row["item"],
                        "votes": row["votes"],
                        "rule": row["rule"],
                        "confidence": row["confidence"],
                        **item["meta"],
                    },
                ),
            )
            counts["held out" if held_out else "written"] += written
        if not counts["written"]:  # raised inside the writer: the shard set before stays as it was
            raise StageFailed(f"sft_shards: no pair to write ({summarize('sft_shards', counts)})")
    return summarize("sft_shards", counts)


def _share(item_id: str) -> float:
    """A fixed number in [0, 1) for an item id, the same on every machine and run."""
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16) / 16**8
