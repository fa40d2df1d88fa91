"""Padding-free SFT batches: a batch's samples laid end to end in one row.

A padded batch of B samples computes B x (longest sample) tokens. Packed, it computes the sum of
the samples' lengths: each sample keeps its own positions (text positions restart at 0, M-RoPE
positions as the sample would get alone), and attention stays inside a sample. The row carries no
attention mask: the sample boundaries are where the text positions restart. FlashAttention reads
them as variable-length kernels do; eager attention gets transformers' block-causal mask over the
whole row; SDPA gets `varlen_sdpa` (`use_varlen_attention`), which attends within each sample with
one causal call per sample, so attention costs the sum of the squared sample lengths, not the
square of the row's. Every response token then gets the log-prob it gets in the padded batch
(`tests/test_packing.py`).

The Qwen2-VL family takes such positions: a (4, 1, T) tensor whose first row holds the text
positions and the other three the M-RoPE ones. Image inputs need no change: the row holds the
image tokens of the samples in batch order, the order their features are stacked in.
"""

from __future__ import annotations

import torch
from torch import nn

from carevl.encoding import IGNORE_INDEX

# Families whose language model reads packed positions (text positions prepended to M-RoPE's).
PACKED_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
VARLEN_SDPA = "carevl_varlen_sdpa"


def check_packable(hf: nn.Module) -> None:
    """A clear error for a model whose family cannot take packed rows."""
    if hf.config.model_type not in PACKED_FAMILIES:
        raise ValueError(
            f"pack_samples needs a model of the {' or '.join(PACKED_FAMILIES)} family; "
            f"{hf.config.model_type} takes padded batches only (set pack_samples: false)"
        )


def pack_batch(hf: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One row holding every sample of a right-padded batch, padding left out.

    Args:
        hf: the Qwen2-VL-family model (its `get_rope_index` gives each sample's M-RoPE positions).
        inputs: the padded batch (`carevl.encoding.collate`, right padding).
    Returns:
        the row's model inputs, labels included, and (T,) the batch row each of its tokens came from.
    """
    check_packable(hf)
    mask = inputs["attention_mask"].bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("pack_batch needs right-padded samples (padding after each sample's tokens)")
    rope, _ = hf.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    lengths = mask.sum(dim=1)
    text = torch.cat([torch.arange(n, device=mask.device) for n in lengths.tolist()])
    positions = torch.cat([text[None], rope[:, mask]])[:, None]  # (4, 1, T)
    row = {key: inputs[key][mask][None] for key in ("input_ids", "labels", "mm_token_type_ids") if key in inputs}
    row["position_ids"] = positions
    row.update({key: inputs[key] for key in ("pixel_values", "image_grid_thw") if key in inputs})
    starts = torch.cumsum(lengths, 0) - lengths
    if (row["labels"][0, starts] != IGNORE_INDEX).any():
        raise ValueError("a packed sample starts with a response token: the sample before it would predict it")
    owner = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(lengths)
    return row, owner


def packed_response_rows(labels: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(N,) the sample of each response token of a packed row, in the order
    `carevl.losses.response_token_logprobs` returns their log-probs."""
    return owner[1:][labels[0, 1:] != IGNORE_INDEX]


class SampleLengths:
    """The sample lengths of the packed row in progress, read from its text positions once and
    shared by every layer (they all receive the same tensor)."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.lengths: list[int] | None = None

    def of(self, position_ids: torch.Tensor) -> list[int] | None:
        """Lengths of the runs of consecutive positions in a (1, T) row; None for one run."""
        if position_ids is not self.key:
            step = torch.diff(position_ids[0], prepend=position_ids[0, :1] - 1)
            starts = (step != 1).nonzero()[:, 0].tolist()
            bounds = [0, *[s for s in starts if s > 0], position_ids.shape[1]]
            self.key = position_ids
            self.lengths = [b - a for a, b in zip(bounds, bounds[1:])] if len(bounds) > 2 else None
        return self.lengths


_lengths = SampleLengths()


def varlen_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' SDPA attention, but a packed row (one row whose text positions restart)
    attends within each sample: one causal call per sample instead of one masked call over the
    whole row. Any other call is plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
        and position_ids.shape[0] == 1
    )
    lengths = _lengths.of(position_ids) if packed else None
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    pieces = [
        sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    ]
    return torch.cat(pieces, dim=1), None


def use_varlen_attention(hf: nn.Module) -> bool:
    """Switch a packable model's language model from SDPA to `varlen_sdpa` (the vision tower and
    every other implementation are left as they are). Returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    check_packable(hf)
    if hf.config.text_config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # rows that are not packed keep their masks
    hf.set_attn_implementation({"text_config": VARLEN_SDPA})
    return True
