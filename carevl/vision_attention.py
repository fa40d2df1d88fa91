"""Qwen2-VL's vision attention with one call per image size instead of one per image.

Without flash-attention, transformers runs the vision tower's attention image by image: in each of
its layers (32 in the 2B and 7B models) it reads the image sizes back from the GPU three times
(each read waits for all queued work) and launches one attention per image. A batch of 32 images
then makes 1,024 attention calls and 96 host synchronisations per forward. Here the sizes are read once per forward,
and the images of one size go through a single batched `scaled_dot_product_attention` call: the
same full attention within each image, the same weights, the same output.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn


def attend_by_size(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[int], scale: float) -> torch.Tensor:
    """Full attention within each consecutive run of `sizes` tokens.

    Args:
        q, k, v: (tokens, heads, head_dim), the images' tokens one after another.
        sizes: tokens per image, summing to `tokens`.
        scale: the softmax scale.
    Returns:
        (tokens, heads, head_dim): each token attended over its own image only.
    """
    if len(set(sizes)) == 1:  # one size (fixed-resolution images): views, no copies
        count, size = len(sizes), sizes[0]

        def images(t: torch.Tensor) -> torch.Tensor:
            return t.view(count, size, *t.shape[1:]).transpose(1, 2)

        return (
            F.scaled_dot_product_attention(images(q), images(k), images(v), scale=scale)
            .transpose(1, 2)
            .reshape(q.shape)
        )
    chunks = [torch.split(t, sizes) for t in (q, k, v)]
    members: dict[int, list[int]] = {}
    for image, size in enumerate(sizes):
        members.setdefault(size, []).append(image)
    outputs: list[torch.Tensor | None] = [None] * len(sizes)
    for group in members.values():
        q_, k_, v_ = (torch.stack([chunk[i] for i in group]).transpose(1, 2) for chunk in chunks)
        attended = F.scaled_dot_product_attention(q_, k_, v_, scale=scale).transpose(1, 2)
        for j, image in enumerate(group):
            outputs[image] = attended[j]
    return torch.cat(outputs)


class ImageSizes:
    """The image sizes of the vision forward in progress, read from `cu_seqlens` once and shared
    by every layer (they all receive the same tensor)."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.sizes: list[int] = []

    def of(self, cu_seqlens: torch.Tensor) -> list[int]:
        if cu_seqlens is not self.key:
            self.key, self.sizes = cu_seqlens, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        return self.sizes


def _forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Qwen2-VL's `VisionAttention.forward` (qkv, rotary, attention, proj), attending by size."""
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._rotary(q, k, cos, sin)
    attended = attend_by_size(q, k, v, self._image_sizes.of(cu_seqlens), self.scaling)
    return self.proj(attended.reshape(tokens, -1))


def batch_vision_attention(hf: nn.Module) -> int:
    """Replace the attention forward of a Qwen2-VL vision tower's layers in place (parameters and
    their names are untouched). Only where the tower uses SDPA: flash-attention already makes one
    variable-length call, and eager attention is left as it is. Returns the number of layers changed."""
    if hf.config.model_type != "qwen2_vl":
        return 0
    visual = hf.model.visual
    if visual.config._attn_implementation != "sdpa":
        return 0
    sizes = ImageSizes()
    layers = [block.attn for block in visual.blocks]
    for attn in layers:
        attn._rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        attn._image_sizes = sizes
        attn.forward = types.MethodType(_forward, attn)
    return len(layers)
