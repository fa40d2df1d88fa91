"""Benchmark records as the judge sees them: one view per answer order, prompt-only inputs for
generation, the same prompt as a `Chat` (messages and the encoded image) for an inference engine
to read, and, for the `score` verdict mode, one input per candidate verdict line."""

from __future__ import annotations

from typing import Any

from carevl import benchmarks, schema
from carevl.backends.interface import Chat
from carevl.encoding import Encoder, collate
from carevl.prompts import user_turn


def build_views(
    encoder: Encoder,
    order: str,
    seed: int,
    candidates: bool,
    prompt: str,
    sample: schema.BenchmarkSample,
    image: Any,
) -> list[dict[str, Any]]:
    """The views of one record under the answer-order rule (two for order "both"), asked in `prompt`
    ("carevl" or "benchmark", `benchmarks.judge_request`)."""
    items = []
    for swap in benchmarks.views(sample.id, sample.responses, order, seed):
        responses, label = benchmarks.swapped(sample.responses, sample.label, swap)
        messages = user_turn(benchmarks.judge_request(sample.benchmark, sample.question, responses, prompt))
        item = {
            "id": sample.id,
            "benchmark": sample.benchmark,
            "category": sample.category,
            "label": label,
            "swapped": swap,
            "features": encoder.encode(image, messages),
            "chat": Chat(messages, [sample.image]),
        }
        if candidates:
            lines = [line for _, line in benchmarks.verdict_choices(sample.benchmark, prompt)]
            item["candidates"] = [
                {k: v for k, v in c.items() if k != "prompt_length"}
                for c in encoder.encode_many(image, messages, lines)
            ]
        items.append(item)
    return items


_LISTS = {
    "id": "ids",
    "benchmark": "benchmarks",
    "category": "categories",
    "label": "labels",
    "swapped": "swapped",
    "chat": "chats",
}


def collate_views(
    items: list[dict[str, Any]], skipped: dict[str, int], pad_token_id: int, order: str, prompt: str
) -> dict[str, Any]:
    """A benchmark batch: left-padded prompts, record fields as lists, the answer-order rule and the
    prompt the views follow, candidate inputs if built."""
    batch = {
        "prompt_inputs": collate([item["features"] for item in items], pad_token_id, padding_side="left"),
        "order": order,
        "prompt": prompt,
        "skipped": skipped,
        **{plural: [item[key] for item in items] for key, plural in _LISTS.items()},
    }
    if "candidates" in items[0]:
        batch["candidate_inputs"] = collate([c for item in items for c in item["candidates"]], pad_token_id)
        batch["num_candidates"] = len(items[0]["candidates"])
    if len({item["benchmark"] for item in items}) != 1:
        raise ValueError("a batch mixes benchmarks; keep each benchmark in its own shard directory")
    return batch
