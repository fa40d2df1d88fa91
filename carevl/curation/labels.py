"""The curation stages that label pairs (paper §3.2-3.3): the strong LVLM's judgments, the experts'
votes given the caption, the confidence split with its relabeling, and the SFT shards of the
high-confidence pairs. Each reads earlier records from `workdir`, appends its own and returns a
summary; `tools/curate.py` runs them from YAML.

    judge -> judgments.jsonl       the strong LVLM's verdict and explanation (optionally both orders)
    votes -> scores.jsonl          every expert scores every distinct answer given question + caption
    split -> split.jsonl           votes, confidence and (re)label of every pair
    sft_shards -> sft/             high-confidence pairs as SFT shards (target: explanation + verdict)
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from carevl import prompts
from carevl.backends.interface import BatchChatModel, Chat, ChatModel, Reply, RewardModel, Sampling
from carevl.curation import cost
from carevl.curation.provenance import producer, select, selected, selection
from carevl.curation.records import ImageStore, content_key, holds_work_folder
from carevl.curation.split import HIGH, count_votes, decide
from carevl.curation.units import (
    StageFailed,
    caption_by_image,
    item_chat,
    items_by_id,
    opened,
    records,
    reply_record,
    run_units,
    summarize,
    write_or_count,
)

log = logging.getLogger(__name__)


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
        with opened(build, name) as (expert, failure):

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
