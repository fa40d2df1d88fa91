"""Summed response log-probs of preference-group batches (`datamodules.preference.collate_groups`).

A batch of G groups holds S sequences, each group's chosen critique first. Image inputs hold one
entry per group and `batch["image_index"]` maps every sequence to its group's image, so the
vision tower can run once per image (`image_features`) and its features be handed to every
critique of the group and to the reference pass.

With `pack` (Qwen2-VL: explicit 3D positions and custom 4D attention masks are accepted) each
group becomes one row: its prompt, image tokens included, followed by every critique, with a
block mask that lets each critique see the prompt and its own earlier tokens only and positions
that continue from the end of the prompt. Each critique then gets exactly the log-prob it gets
alone, while the prompt goes through the language model once per group instead of once per
critique.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from carevl.encoding import TOKEN_KEYS
from carevl.losses import response_token_logprobs, sequence_logprobs, token_logprobs

# Families whose model accepts precomputed image features (`mm_encoder_outputs`).
SHARED_VISION = ("qwen2_vl", "qwen2_5_vl")
# Families whose prompt can be shared by several critiques in one row.
PACKED_PROMPTS = ("qwen2_vl",)


def block_mask(block_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, L) attention allowed (1) or not (0) in rows packing a prompt (block -1) and several
    responses (blocks 0, 1, ...) after it: causal, and a response sees the prompt and itself only.
    Padding (block -2) sees only itself, so no row is fully masked."""
    row, column = block_ids[:, :, None], block_ids[:, None, :]
    length = block_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=block_ids.device).tril()
    allowed = causal & ((column == -1) | (column == row)) & (row != -2) & (column != -2)
    return allowed | torch.eye(length, dtype=torch.bool, device=block_ids.device)


def shares_vision(hf: nn.Module) -> bool:
    return hf.config.model_type in SHARED_VISION


def packs_group(hf: nn.Module, batch: dict) -> bool:
    """Whether `group_logprobs(hf, batch, image_features(hf, ...), pack=True)` computes each group's
    prompt once: a family that packs prompts, with image features to share."""
    return hf.config.model_type in PACKED_PROMPTS and "pixel_values" in batch["inputs"] and "prompt_lengths" in batch


def image_features(hf: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    """Per-image features of a group batch's unique images (Qwen2-VL family), else None.

    Computed without a graph when the whole vision tower, projector included, is frozen."""
    if not shares_vision(hf) or "pixel_values" not in inputs:
        return None
    frozen = not any(p.requires_grad for p in hf.model.visual.parameters())
    with torch.no_grad() if frozen else contextlib.nullcontext():
        out = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return list(out.pooler_output)


def group_logprobs(
    hf: nn.Module,
    batch: dict,
    features: list[torch.Tensor] | None = None,
    chunk: int | None = None,
    pad_token_id: int = 0,
    pack: bool = True,
) -> torch.Tensor:
    """(S,) summed response log-probs of every sequence of a preference-group batch.

    Args:
        hf: the Hugging Face model that scores (the policy, or the frozen reference).
        batch: a preference-group batch.
        features: image features from `image_features`: the vision tower is not run again.
            Without them each sequence gets its group's image inputs.
        chunk: response tokens through the head at a time (`carevl.losses.token_logprobs`).
        pad_token_id: the id packed rows are padded with.
        pack: compute each group's prompt once when the family allows it (`packs_group`); the
            values are the same.
    """
    if pack and features is not None and packs_group(hf, batch):
        return packed_group_logprobs(hf, batch, features, chunk, pad_token_id)
    inputs, index = batch["inputs"], batch["image_index"]
    model_inputs = {k: v for k, v in inputs.items() if k in TOKEN_KEYS and k != "labels"}
    images = {k: v for k, v in inputs.items() if k not in TOKEN_KEYS}
    if features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        model_inputs["image_grid_thw"] = images["image_grid_thw"][index]
        model_inputs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[features[i] for i in index.tolist()])
        }
    elif "image_grid_thw" in images:  # Qwen2-VL family without shared features: patches are flattened per image
        sizes = (images["image_grid_thw"].prod(dim=1)).tolist()
        per_image = torch.split(images["pixel_values"], sizes)
        model_inputs["pixel_values"] = torch.cat([per_image[i] for i in index.tolist()])
        model_inputs["image_grid_thw"] = images["image_grid_thw"][index]
    else:  # one entry per image along the first dimension (LLaVA-OneVision, Mllama)
        model_inputs.update({k: v[index] for k, v in images.items()})
    hidden = hf.model(**model_inputs, use_cache=False).last_hidden_state
    logps, rows = response_token_logprobs(hidden, inputs["labels"], hf.lm_head, chunk)
    return sequence_logprobs(logps, rows, inputs["labels"].shape[0])


def packed_group_logprobs(
    hf: nn.Module, batch: dict, features: list[torch.Tensor], chunk: int | None = None, pad_token_id: int = 0
) -> torch.Tensor:
    """(S,) summed response log-probs like `group_logprobs`, with each group's prompt computed once
    in a row of its own (the module's doc)."""
    inputs, index = batch["inputs"], batch["image_index"]
    ids, device = inputs["input_ids"], inputs["input_ids"].device
    # the layout is read on the host once (three transfers, not a sync per group and sequence)
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    prompt_lengths, owner = batch["prompt_lengths"].tolist(), index.tolist()
    rows, positions, blocks, predictors, targets, owners = [], [], [], [], [], []
    for group in range(max(owner) + 1):
        members = [sequence for sequence, g in enumerate(owner) if g == group]
        first, prompt_length = members[0], prompt_lengths[members[0]]
        prompt = ids[first, :prompt_length]
        position, _ = hf.model.get_rope_index(
            prompt[None],
            inputs["mm_token_type_ids"][first, :prompt_length][None],
            inputs["image_grid_thw"][group : group + 1],
        )
        start = int(position.max()) + 1
        row, row_positions = [prompt], [position[:, 0]]
        row_blocks = [torch.full((prompt_length,), -1, device=device)]
        offset = prompt_length
        row_predictors, row_targets, row_owners = [], [], []
        for block, sequence in enumerate(members):
            response = ids[sequence, prompt_length : lengths[sequence]]
            n = response.numel()
            row.append(response)
            row_positions.append((start + torch.arange(n, device=device)).expand(3, n))
            row_blocks.append(torch.full((n,), block, device=device))
            # the first critique token is predicted by the prompt's last position, the others by the one before
            first_predictor = torch.tensor([prompt_length - 1], device=device)
            row_predictors.append(torch.cat([first_predictor, offset + torch.arange(n - 1, device=device)]))
            row_targets.append(response)
            row_owners.append(torch.full((n,), sequence, device=device))
            offset += n
        rows.append(torch.cat(row))
        positions.append(torch.cat(row_positions, dim=1))
        blocks.append(torch.cat(row_blocks))
        predictors.append(torch.cat(row_predictors))
        targets.append(torch.cat(row_targets))
        owners.append(torch.cat(row_owners))
    length = max(r.numel() for r in rows)
    input_ids = torch.stack([nn.functional.pad(r, (0, length - r.numel()), value=pad_token_id) for r in rows])
    position_ids = torch.stack([nn.functional.pad(p, (0, length - p.shape[1])) for p in positions], dim=1)
    block_ids = torch.stack([nn.functional.pad(b, (0, length - b.numel()), value=-2) for b in blocks])
    dtype = next(hf.parameters()).dtype
    mask = block_mask(block_ids).to(dtype)
    mask = (1.0 - mask) * torch.finfo(dtype).min
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    hidden = hf.model(
        input_ids=input_ids,
        attention_mask=mask[:, None],
        position_ids=position_ids,
        image_grid_thw=inputs["image_grid_thw"],
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(features))},
        use_cache=False,
    ).last_hidden_state
    group_rows = torch.cat([torch.full_like(p, g) for g, p in enumerate(predictors)])
    logps = token_logprobs(hidden[group_rows, torch.cat(predictors)], torch.cat(targets), hf.lm_head, chunk)
    return sequence_logprobs(logps, torch.cat(owners), ids.shape[0])
