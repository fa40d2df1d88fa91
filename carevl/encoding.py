"""From a sample to model inputs: chat rendering, the family's processor, label masking, collation.

One `Encoder` serves every model family: the prompt (image + user turn) goes through the
family's own processor, which expands the image placeholder into image tokens and produces the
pixel inputs; the response (the target and the chat template's end-of-turn text) is tokenised
alone and appended, so training sees exactly the tokens that generation would produce after the
prompt. Prompt, image and padding positions carry the label -100 and never enter the loss.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
# Inputs aligned with token positions: padded along the sequence; everything else is concatenated.
TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids", "cross_attention_mask")


class TooLong(ValueError):
    """A sample longer than the maximum length. Image tokens are never truncated: it is dropped."""


class Encoder:
    """Turns (image, chat messages, target) into model inputs with masked labels.

    Args:
        processor: the model family's Hugging Face processor (tokenizer + image processor + chat template).
        max_length: samples with more tokens (image tokens included) raise `TooLong`.
    """

    def __init__(self, processor: Any, max_length: int = 4096):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def prompt_text(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def response_text(self, messages: list[dict], prompt: str, target: str) -> str:
        """The target followed by whatever the chat template closes an assistant turn with."""
        turn = {"role": "assistant", "content": [{"type": "text", "text": target}]}
        full = self.processor.apply_chat_template(messages + [turn], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently with an assistant turn appended")
        return full[len(prompt) :]

    def encode(self, image: Any, messages: list[dict], target: str | None = None) -> dict[str, torch.Tensor]:
        """Inputs of one sample, each with a leading batch dimension of 1.

        With a target: `labels` holds the response token ids at response positions and -100 elsewhere,
        and `prompt_length` says where the response starts. Without one: the prompt alone.
        """
        if target is None:
            return self.encode_prompt(image, messages)[1]
        return self.encode_many(image, messages, [target])[0]

    def encode_prompt(self, image: Any, messages: list[dict]) -> tuple[str, dict[str, torch.Tensor]]:
        """(prompt text, prompt inputs): the image goes through the processor here, once."""
        prompt = self.prompt_text(messages)
        images = [image] if image is not None else None
        features = dict(self.processor(text=[prompt], images=images, return_tensors="pt", add_special_tokens=False))
        length = features["input_ids"].shape[1]
        if length > self.max_length:
            raise TooLong(f"prompt has {length} tokens > max_length {self.max_length}")
        return prompt, features

    def encode_many(self, image: Any, messages: list[dict], targets: list[str]) -> list[dict[str, torch.Tensor]]:
        """Inputs of one prompt followed by each target, processing the image and prompt once; the
        non-token inputs (pixel values, grids) are shared, not copied, between the results."""
        prompt, features = self.encode_prompt(image, messages)
        prompt_length = features["input_ids"].shape[1]
        encoded = []
        for target in targets:
            response_ids = self.tokenizer(
                self.response_text(messages, prompt, target), add_special_tokens=False, return_tensors="pt"
            )["input_ids"]
            length = prompt_length + response_ids.shape[1]
            if length > self.max_length:
                raise TooLong(f"{length} tokens > max_length {self.max_length}")
            item = {
                key: _extend(key, value, response_ids) if key in TOKEN_KEYS else value
                for key, value in features.items()
            }
            item["labels"] = torch.cat([torch.full((1, prompt_length), IGNORE_INDEX), response_ids], dim=1)
            item["prompt_length"] = torch.tensor([prompt_length])
            encoded.append(item)
        return encoded


def _extend(key: str, value: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """Extend a token-aligned prompt input over the appended response tokens."""
    n = response_ids.shape[1]
    if key == "input_ids":
        return torch.cat([value, response_ids], dim=1)
    if key == "cross_attention_mask":
        # Text after the image attends to it: the response repeats the prompt's last row.
        return torch.cat([value, value[:, -1:].expand(-1, n, *value.shape[2:])], dim=1)
    if key == "attention_mask":
        return torch.cat([value, torch.ones(1, n, dtype=value.dtype)], dim=1)
    return torch.cat([value, torch.zeros(1, n, dtype=value.dtype)], dim=1)


def _pad_to(value: torch.Tensor, dim: int, size: int, fill: float, left: bool) -> torch.Tensor:
    missing = size - value.shape[dim]
    if missing <= 0:
        return value
    shape = list(value.shape)
    shape[dim] = missing
    filler = torch.full(shape, fill, dtype=value.dtype)
    return torch.cat([filler, value] if left else [value, filler], dim=dim)


def collate(
    features: list[dict[str, torch.Tensor]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Batch per-sample inputs of any family.

    Token-aligned inputs (`TOKEN_KEYS`) are padded to the longest sequence (input_ids with the pad
    token, labels with -100, masks with 0) on `padding_side`; other tensors (pixel values, grid sizes,
    aspect ratios) are concatenated along their first dimension, zero-padding trailing dimensions
    that differ between samples.
    """
    left = padding_side == "left"
    length = max(f["input_ids"].shape[1] for f in features) if "input_ids" in features[0] else 0
    batch = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key in TOKEN_KEYS:
            fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            values = [_pad_to(v, 1, length, fill, left) for v in values]
        elif any(v.shape[1:] != values[0].shape[1:] for v in values):
            for dim in range(1, values[0].dim()):
                size = max(v.shape[dim] for v in values)
                values = [_pad_to(v, dim, size, 0, False) for v in values]
        batch[key] = torch.cat(values, dim=0)
    return batch


def prompt_only(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompt part of one encoded sample (for generation), dropping labels and response tokens."""
    n = int(features["prompt_length"][0])
    return {
        key: value[:, :n] if key in TOKEN_KEYS else value
        for key, value in features.items()
        if key not in ("labels", "prompt_length")
    }
