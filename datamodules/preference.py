"""Preference-group batches for DPO: whole groups, each image and prompt processed once.

A batch of G groups holds S = sum over groups of (1 + rejected) sequences, chosen first in each
group. Token inputs have one row per sequence; image inputs have one entry per *group* and
`image_index` maps every sequence to its group's image, so the model can encode each image once
and share its features between the chosen, every rejected and the reference pass.
"""

from __future__ import annotations

from typing import Any

import torch

from carevl import schema
from carevl.encoding import TOKEN_KEYS, Encoder, collate
from carevl.flops import batch_work, packed_work, response_count
from carevl.prompts import judge_prompt, user_turn


def encode_group(
    encoder: Encoder, reference: dict[str, Any] | None, sample: schema.PreferenceGroupSample, image: Any
) -> list[dict[str, Any]]:
    """One item per group: the chosen and every rejected critique after one shared prompt, with the
    group's precomputed reference log-probs when `reference` (`carevl.schema.read_reference`) is
    given; a group the reference was not computed for is an error, never a skip."""
    messages = user_turn(judge_prompt(sample.question, sample.responses))
    encodings = encoder.encode_many(image, messages, [sample.chosen, *sample.rejected])
    length = sum(encoding["input_ids"].shape[1] for encoding in encodings)
    item = {"id": sample.id, "encodings": encodings, "verdict_label": sample.label, "length": length}
    if reference is not None:
        logps = reference["logps"].get(sample.id)
        if logps is None:
            raise schema.ReferenceMismatch(
                f"{sample.id}: no precomputed reference log-probs (computed with another max_length, or before "
                "the group was added): run tools/reference_logps.py again"
            )
        if reference["groups"].get(sample.id) != schema.group_fingerprint(sample) or len(logps) != len(encodings):
            raise schema.ReferenceMismatch(
                f"{sample.id}: the reference log-probs were computed for another text or image of this group: "
                "run tools/reference_logps.py again (it recomputes what is stale)"
            )
        item["reference_logps"] = logps
    return [item]


def collate_groups(items: list[dict[str, Any]], skipped: dict[str, int], pad_token_id: int) -> dict[str, Any]:
    """A DPO batch: per-sequence token inputs, per-group image inputs, the group structure, and the
    work it asks of the model (`carevl.flops`) with each critique computed in full or with each
    group's prompt computed once (`packed_work`)."""
    token_rows, image_rows, image_index, chosen, rejected, rejected_group, prompt_lengths = [], [], [], [], [], [], []
    for g, item in enumerate(items):
        first = item["encodings"][0]
        image_rows.append({k: v for k, v in first.items() if k not in TOKEN_KEYS and k != "prompt_length"})
        chosen.append(len(token_rows))
        for j, encoding in enumerate(item["encodings"]):
            if j > 0:
                rejected.append(len(token_rows))
                rejected_group.append(g)
            token_rows.append({k: v for k, v in encoding.items() if k in TOKEN_KEYS})
            prompt_lengths.append(int(encoding["prompt_length"][0]))
            image_index.append(g)
    inputs = collate(token_rows, pad_token_id)
    inputs.update(collate(image_rows, pad_token_id) if image_rows[0] else {})
    lengths, responses, grid = (
        [int(row["input_ids"].shape[1]) for row in token_rows],
        response_count(inputs["labels"]),
        inputs.get("image_grid_thw"),
    )
    batch = {
        "inputs": inputs,
        "image_index": torch.tensor(image_index),
        "chosen_index": torch.tensor(chosen),
        "rejected_index": torch.tensor(rejected),
        "rejected_group": torch.tensor(rejected_group),
        "prompt_lengths": torch.tensor(prompt_lengths),
        "work": batch_work(lengths, responses, grid),
        "packed_work": packed_work(lengths, prompt_lengths, image_index, responses, grid),
        "ids": [item["id"] for item in items],
        "skipped": skipped,
    }
    if all("reference_logps" in item for item in items):
        batch["reference_logps"] = torch.tensor(
            [v for item in items for v in item["reference_logps"]], dtype=torch.float32
        )
    return batch
