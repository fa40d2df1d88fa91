"""SFT batches: judge samples (image, question, two answers -> critique) or plain instruction
samples (prompt -> target), each encoded on its own and padded into a batch."""

from __future__ import annotations

from typing import Any

import torch

from carevl import schema
from carevl.encoding import Encoder, collate, prompt_only
from carevl.flops import batch_work, response_count
from carevl.prompts import judge_prompt, user_turn


def build_item(encoder: Encoder, sample: schema.SFTSample | schema.InstructSample, image: Any) -> list[dict[str, Any]]:
    """The one training item of a decoded sample. Prompts come from `carevl.prompts` only."""
    if isinstance(sample, schema.SFTSample):
        messages, label = user_turn(judge_prompt(sample.question, sample.responses)), sample.label
    else:
        messages, label = user_turn(sample.prompt), None
    category = sample.meta.get("category")
    features = encoder.encode(image, messages, sample.target)
    return [
        {
            "features": features,
            "id": sample.id,
            "weight": float(sample.weight),
            "verdict_label": label,
            "target": None if label is not None else sample.target,
            "category": None if category is None else str(category),
            "length": features["input_ids"].shape[1],
        }
    ]


def collate_items(
    items: list[dict[str, Any]], skipped: dict[str, int], pad_token_id: int, with_prompts: bool
) -> dict[str, Any]:
    """A batch: padded model inputs, ids, weights, skip counts since the last batch, the work it asks
    of the model (`carevl.flops`), and in validation left-padded prompt-only inputs for generation
    with what to score the outputs against: verdict labels and categories (`meta.category`) of
    judge samples, target texts of instruction samples."""
    features = [item["features"] for item in items]
    inputs = collate([{k: v for k, v in f.items() if k != "prompt_length"} for f in features], pad_token_id)
    batch = {
        "inputs": inputs,
        "work": batch_work(
            [item["length"] for item in items], response_count(inputs["labels"]), inputs.get("image_grid_thw")
        ),
        "ids": [item["id"] for item in items],
        "weights": torch.tensor([item["weight"] for item in items]),
        "skipped": skipped,
    }
    if not with_prompts:
        return batch
    batch["prompt_inputs"] = collate([prompt_only(f) for f in features], pad_token_id, padding_side="left")
    labels = [item["verdict_label"] for item in items]
    if all(label is not None for label in labels):
        batch["verdict_labels"] = labels
        batch["verdict_categories"] = [item["category"] for item in items]
    else:
        batch["targets"] = [item["target"] for item in items]
    return batch
