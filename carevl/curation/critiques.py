"""Curation II stages (paper §3.4-3.5): critiques sampled from the SFT judge for the low-confidence
pairs, their multi-dimensional scores, and preference groups -> DPO shards.

    critiques -> critiques.jsonl     m critiques per low-confidence pair, verdicts parsed
    evaluate -> evaluations.jsonl    an evaluator's 0-100 score of every critique
    groups -> groups/<strategy>/     preference-group shards (carevl.curation.groups)

Resumable like curation I: records carry content keys, reruns skip finished work. The critiques
stage also writes `critiques.selection.json`, the keys of the critiques it was asked for; `evaluate`
and `groups` read those only, so critiques of an older checkpoint, another judge name or pairs no
longer selected stay on disk but never enter the groups.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from carevl import prompts
from carevl.backends.interface import ChatModel, Sampling
from carevl.curation.groups import STRATEGIES, Critique, form_group
from carevl.curation.provenance import producer, select, selected
from carevl.curation.records import ImageStore, Records, content_key, holds_work_folder
from carevl.curation.units import (
    OnFirstUse,
    StageFailed,
    caption_by_image,
    item_chat,
    items_by_id,
    records,
    reply_record,
    run_units,
    summarize,
    write_or_count,
)

log = logging.getLogger(__name__)
CRITIQUES, EVALUATIONS, SELECTION = "critiques.jsonl", "evaluations.jsonl", "critiques.selection.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def checkpoint_revision(directory: str | Path) -> str:
    """A short sha256 of a local checkpoint's weight files (names and bytes): it changes whenever
    the checkpoint is retrained or replaced, whatever the directory is called."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {directory}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(directory)).encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:16]


def selected_critiques(workdir: str | Path) -> list[dict]:
    """The successful critique records of the last critiques run's selection (judge, checkpoint, pairs)."""
    path = Path(workdir) / SELECTION
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the critiques stage first")
    keys = set(json.loads(path.read_text())["keys"])
    found = Records(Path(workdir) / CRITIQUES).ok()
    chosen = [r for r in found if r["key"] in keys]
    if len(chosen) < len(found):
        log.info(
            "%d critique records of another judge, checkpoint or pair selection are left out", len(found) - len(chosen)
        )
    return chosen


def low_confidence(workdir: str | Path) -> list[dict]:
    """Low-confidence pairs of the split, with their relabeled label."""
    return [r for r in records(workdir, "split").ok() if r["confidence"] == "low" and r["label"] in (1, 2)]


@holds_work_folder
def critiques(
    workdir: str,
    judge: Callable[[], ChatModel],
    name: str,
    checkpoint: str | None = None,
    samples: int = 10,
    sampling: Sampling | None = None,
    max_pairs: int | None = None,
    chunk_size: int = 16,
    max_failed: float = 0.0,
) -> dict:
    """The SFT judge writes `samples` critiques of every low-confidence pair (paper: m = 10).

    The judge is asked exactly as it was trained (carevl.prompts.judge_prompt); each verdict is parsed and compared
    with the pair's relabeled label.

    Args:
        workdir: the curation work directory.
        judge: the SFT judge as a chat model (transformers on CPU, vLLM at scale).
        name: the judge's name in records and keys.
        checkpoint: the judge's local checkpoint directory: a hash of its weights joins every key, so
            after retraining (`tools/pipeline.py --from sft`) critiques are sampled afresh instead of
            the old checkpoint's being reused. Without it, change `name` when the checkpoint changes.
        samples: critiques per pair.
        sampling: decoding settings (default temperature 1.0, 512 tokens); n is set to `samples`.
        max_pairs: only the first this many low-confidence pairs (by key), for a pilot run.
        chunk_size: pairs per generate call (and per write to disk).
        max_failed: the share of this run's units that may fail before the stage exits with an error
            (failed units are recorded with their reasons, and a rerun retries them).
    """
    sampling = Sampling(**{**asdict(sampling or Sampling(temperature=1.0, max_tokens=512)), "n": samples})
    store, items, out = ImageStore(workdir), items_by_id(workdir), Records(Path(workdir) / CRITIQUES)
    rows = sorted(low_confidence(workdir), key=lambda r: r["key"])[:max_pairs]
    revision = checkpoint_revision(checkpoint) if checkpoint else None
    units = [
        (
            content_key(
                "critiques", name, revision, prompts.JUDGE_TEMPLATE, row["key"], row["label"], asdict(sampling)
            ),
            row,
        )
        for row in rows
    ]
    (Path(workdir) / SELECTION).write_text(
        json.dumps({"judge": name, "revision": revision, "keys": [key for key, _ in units]})
    )
    model = OnFirstUse(judge)

    def work(chunk: list, write) -> None:
        chats = [
            item_chat(store, items[row["item"]], prompts.judge_prompt(items[row["item"]]["question"], row["responses"]))
            for _, row in chunk
        ]

        def fields(texts: list[str]) -> dict:
            return {"samples": [{"text": t, "verdict": prompts.parse_verdict(t)} for t in texts]}

        write(
            [
                reply_record(
                    {"key": key, "pair": row["key"], "label": row["label"], "judge": name, "revision": revision},
                    reply,
                    fields,
                )
                for (key, row), reply in zip(chunk, model().generate(chats, sampling))
            ]
        )

    with model:
        counts = run_units(out, units, work, chunk_size, "critiques")
    found = selected_critiques(workdir)
    counts["samples"] = sum(len(r["samples"]) for r in found)
    counts["samples correct"] = sum(s["verdict"] == r["label"] for r in found for s in r["samples"])
    counts["samples unparseable"] = sum(s["verdict"] is None for r in found for s in r["samples"])
    return summarize("critiques", counts, max_failed)


def critique_context(prompt: str) -> str:
    """What a score depends on besides the evaluator: the free-text evaluator prompt (question,
    caption, answers, label, critique), whichever reply format the evaluator is asked for. Equal
    critiques of equal pairs are scored once."""
    return content_key("critique-context", prompt)


@holds_work_folder
def evaluate(
    workdir: str,
    evaluator: Callable[[], ChatModel],
    name: str,
    sampling: Sampling | None = None,
    chunk_size: int = 64,
    max_failed: float = 0.0,
    structured: bool = False,
) -> dict:
    """An expert evaluator (paper: Llama-3.3-70B-Instruct) scores every critique from 0 to 100.

    The four aspects are relevance, factual accuracy, logical reasoning and clarity, 25 points each
    (carevl.prompts.EVALUATOR_TEMPLATE); the evaluator sees the
    question, the caption, both answers, the reference choice and the critique. Replies without a
    score in range are recorded as failed (``unparseable``), excluded from groups and counted.

    Args:
        workdir: the curation work directory.
        evaluator: the evaluator chat model (vLLM, an OpenAI-compatible endpoint, or a simulation).
        name: the evaluator's name in records and keys.
        sampling: decoding settings (default greedy, 1024 tokens).
        chunk_size: critiques per generate call (and per write to disk).
        max_failed: the share of this run's units that may fail before the stage exits with an error
            (failed units are recorded with their reasons, and a rerun retries them).
        structured: ask for the four aspects' points as JSON (carevl.prompts.SCORE_SCHEMA, structured
            output on vLLM and the OpenAI API) and score their sum; records then hold `aspects`.
            False (the paper's way): the reply ends in a "Score: N" line.
    """
    sampling = sampling or Sampling(max_tokens=1024)
    schema = prompts.SCORE_SCHEMA if structured else None
    items, captions_ = items_by_id(workdir), caption_by_image(workdir)
    pairs = {r["key"]: r for r in low_confidence(workdir)}
    made_by = producer(evaluator)
    out = Records(Path(workdir) / EVALUATIONS)
    units = []
    for record in selected_critiques(workdir):
        pair = pairs.get(record["pair"])
        if pair is None:
            continue
        item = items[pair["item"]]
        for sample in record["samples"]:
            content = (
                item["question"],
                captions_.get(item["image"], ""),
                pair["responses"],
                pair["label"],
                sample["text"],
            )
            prompt = prompts.evaluator_prompt(*content, structured)
            context = critique_context(prompts.evaluator_prompt(*content))
            units.append((content_key("evaluation", name, made_by, prompt, asdict(sampling)), (context, prompt)))
    select(out, [key for key, _ in units])
    model = OnFirstUse(evaluator)

    def work(chunk: list, write) -> None:
        from carevl.backends.interface import Chat

        def fields(texts: list[str]) -> dict:
            if structured:
                aspects = prompts.parse_aspect_scores(texts[0])
                if aspects is None:
                    raise ValueError(f"no JSON of {', '.join(prompts.SCORE_ASPECTS)} from 0 to 25")
                return {"score": float(sum(aspects.values())), "aspects": aspects}
            score = prompts.parse_score(texts[0])
            if score is None:
                raise ValueError("no score from 0 to 100")
            return {"score": score}

        chats = [Chat.user(prompt) for _, (_, prompt) in chunk]
        model().generate_each(
            chats,
            sampling,
            schema,
            lambda i, reply: write(
                [
                    reply_record(
                        {"key": chunk[i][0], "context": chunk[i][1][0], "evaluator": name, "producer": made_by},
                        reply,
                        fields,
                    )
                ]
            ),
        )

    with model:
        counts = run_units(out, units, work, chunk_size, "evaluate")
    return summarize("evaluate", counts, max_failed)


@holds_work_folder
def groups(
    workdir: str,
    strategies: list[str] | None = None,
    evaluator: str | None = None,
    out: str | None = None,
    shard_size: int = 1000,
    min_chosen_score: float | None = None,
) -> dict:
    """Preference groups of the low-confidence pairs' scored critiques -> DPO shards.

    One shard set per strategy (default: Best-to-Worse only; the paper's ablations are lowest_incorrect,
    highest_incorrect and all_incorrect (Figure 3) and random_incorrect (Table 3)).

    Args:
        workdir: the curation work directory.
        strategies: which of best_to_worse, lowest_incorrect, highest_incorrect, all_incorrect,
            random_incorrect.
        evaluator: keep only this evaluator's scores (by default, those of the evaluator the last
            evaluate run was configured with).
        out: the directory holding one shard directory per strategy (default <workdir>/groups).
        shard_size: groups per shard.
        min_chosen_score: a pair forms no group when its best correct critique scores below this
            (counted as "below min_chosen_score"): a correct verdict whose critique the evaluator
            marks down, say for stating what the caption contradicts, is not worth raising.
            None (the paper's way) keeps every pair with a correct critique.
    """
    from carevl.schema import PreferenceGroupSample, ShardWriter

    strategies = strategies or ["best_to_worse"]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    store, items = ImageStore(workdir), items_by_id(workdir)
    pairs = {r["key"]: r for r in low_confidence(workdir)}
    # the scores of the evaluator the last evaluate run was configured with
    evaluations = selected(Records(Path(workdir) / EVALUATIONS))
    scores = {r["context"]: r["score"] for r in evaluations if evaluator is None or r["evaluator"] == evaluator}
    captions_ = caption_by_image(workdir)
    counts = Counter()
    found = sorted((r for r in selected_critiques(workdir) if r["pair"] in pairs), key=lambda r: r["pair"])
    root = Path(out or Path(workdir) / "groups")
    for strategy in strategies:
        with ShardWriter(root / strategy, prefix="groups", max_count=shard_size, kind="preference_group") as writer:
            for record in found:
                pair, item = pairs[record["pair"]], items[pairs[record["pair"]]["item"]]
                contexts = [
                    critique_context(
                        prompts.evaluator_prompt(
                            item["question"],
                            captions_.get(item["image"], ""),
                            pair["responses"],
                            pair["label"],
                            s["text"],
                        )
                    )
                    for s in record["samples"]
                ]
                table = [
                    Critique(i, s["text"], s["verdict"], scores.get(c))
                    for i, (s, c) in enumerate(zip(record["samples"], contexts))
                ]
                counts["critiques without a score"] += (
                    sum(c.score is None for c in table) if strategy == strategies[0] else 0
                )
                group, reason = form_group(table, pair["label"], strategy, pair["key"], min_chosen_score)
                if group is None:
                    counts[f"{strategy}: {reason}"] += 1
                    continue
                written = write_or_count(
                    writer,
                    counts,
                    PreferenceGroupSample(
                        id=f"{pair['key'][:32]}-{strategy}",
                        question=item["question"],
                        responses=pair["responses"],
                        label=pair["label"],
                        chosen=group.chosen.text,
                        rejected=[c.text for c in group.rejected],
                        image=store.get(item["image"], item["image_ext"]),
                        image_ext=item["image_ext"],
                        chosen_score=group.chosen.score,
                        rejected_scores=[c.score for c in group.rejected],
                        strategy=strategy,
                        meta={"item": pair["item"], "rule": pair["rule"], **item["meta"]},
                    ),
                )
                counts[f"{strategy}: written"] += written
            if not counts[f"{strategy}: written"]:  # raised inside the writer: the set before stays
                raise StageFailed(f"groups: no {strategy} group to write ({summarize('groups', counts)})")
    return summarize("groups", counts)
