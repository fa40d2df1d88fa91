"""Model FLOPs of a training step, for throughput and MFU (model FLOPs utilisation).

What a batch asks of the model (its `work`) is counted on the host by the collate functions, so
counting it costs no GPU synchronisation. The FLOPs per unit of work come from the model's weights:

- 6 per trainable weight and token (forward, input gradient, weight gradient), 4 per frozen
  language-model weight and token (forward and input gradient: LoRA leaves the base frozen);
- the language-model head (vocabulary x width) only at response positions, where carevl computes
  it; the input embedding is a lookup;
- 2 per frozen vision weight and image patch (forward only; 6 when the tower trains), the
  projector per merged image token;
- attention (QK^T and AV) as 4 x layers x attention width x (query length x key length) forward,
  three times that with backward, over the spans a sequence really computes: a packed DPO group
  counts its prompt once and each critique against the prompt and itself, not the padded square;
- a reference forward (DPO with a frozen copy or with LoRA off) at 2 per language-model weight and token.

Gradient-checkpointing recomputation is not counted: these are model FLOPs, not hardware FLOPs.
Vision FLOPs are counted for the Qwen2-VL family (patches from `image_grid_thw`, full attention
within each image); other families count their language model only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carevl.encoding import IGNORE_INDEX

# Dense (no sparsity) bf16/fp16 tensor-core peaks per GPU, TFLOP/s, from the vendors' data sheets;
# the first name that appears in the device's name wins, so the specific variants come first.
PEAK_TFLOPS = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
}
HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16")


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense half-precision peak in FLOP/s, or None when unknown or not running in half precision."""
    if str(precision) not in HALF_PRECISIONS:
        return None
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            return tflops * 1e12
    return None


def batch_work(lengths: list[int], response_tokens: int, image_grid_thw: torch.Tensor | None) -> dict[str, float]:
    """The work of a batch of sequences computed in full, each padded to the batch's longest: the
    tokens (padding left out), attention spans (each sequence's square), response tokens, and
    image patches with their attention spans (each image's square)."""
    patches = image_grid_thw.prod(dim=1).tolist() if image_grid_thw is not None else []
    return {
        "tokens": float(sum(lengths)),
        "spans": float(sum(n * n for n in lengths)),
        "response_tokens": float(response_tokens),
        "patches": float(sum(patches)),
        "patch_spans": float(sum(p * p for p in patches)),
    }


def packed_work(
    lengths: list[int],
    prompt_lengths: list[int],
    image_index: list[int],
    response_tokens: int,
    image_grid_thw: torch.Tensor | None,
) -> dict[str, float]:
    """The work of preference groups whose prompt is computed once per group: p + sum(r) tokens
    and p^2 + sum(2 p r + r^2) spans (each critique sees the prompt and itself)."""
    work = batch_work([], response_tokens, image_grid_thw)
    for group in sorted(set(image_index)):
        members = [s for s, g in enumerate(image_index) if g == group]
        p = prompt_lengths[members[0]]
        responses = [lengths[s] - p for s in members]
        work["tokens"] += p + sum(responses)
        work["spans"] += p * p + sum(2 * p * r + r * r for r in responses)
    return work


def response_count(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps only a partition in .data


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs per unit of work of one model, as trained (which weights train decides the factors).

    Attributes:
        per_token: language-model weights, forward and backward, per token.
        per_token_forward: the same weights' forward alone (a reference pass), per token.
        per_response_token: the head, forward and backward, per response token.
        per_patch: vision tower and projector, per image patch.
        per_span: language-model attention, forward and backward, per (query, key) pair.
        per_span_forward: its forward alone.
        per_patch_span: vision attention, per (query, key) pair of patches.
        head_forward: the head's forward alone, per response token.
    """

    per_token: float
    per_token_forward: float
    per_response_token: float
    head_forward: float
    per_patch: float
    per_span: float
    per_span_forward: float
    per_patch_span: float

    @classmethod
    def of(
        cls,
        hf: torch.nn.Module,
        vision_prefixes: tuple[str, ...] = ("model.visual.",),
        projector_prefixes: tuple[str, ...] = ("model.visual.merger.",),
    ) -> ModelFlops:
        """Count `hf`'s weights by role. The prefixes name the vision tower and projector
        parameters (`carevl.backbone.FAMILIES`)."""
        text = hf.config.get_text_config()
        skip = {id(hf.get_input_embeddings().weight), id(hf.get_output_embeddings().weight)}
        body = body_weights = vision = projector = 0.0
        vision_trains = False
        for name, param in hf.named_parameters():
            if id(param) in skip:
                continue
            n = _numel(param)
            if name.startswith(projector_prefixes):
                projector += (6 if param.requires_grad else 2) * n
            elif name.startswith(vision_prefixes):
                vision += (6 if param.requires_grad else 2) * n
                vision_trains |= param.requires_grad
            else:
                body += (6 if param.requires_grad else 4) * n
                body_weights += n
        head = text.vocab_size * text.hidden_size
        head_trains = hf.get_output_embeddings().weight.requires_grad
        width = text.num_attention_heads * (
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        )
        attention = 4.0 * text.num_hidden_layers * width
        vision_config = getattr(hf.config, "vision_config", None)
        merge = getattr(vision_config, "spatial_merge_size", 1) ** 2
        vision_attention = 0.0
        if vision_config is not None and hasattr(
            vision_config, "embed_dim"
        ):  # Qwen2-VL: full attention within each image
            vision_attention = 4.0 * vision_config.depth * vision_config.embed_dim * (3 if vision_trains else 1)
        return cls(
            per_token=body,
            per_token_forward=2 * body_weights,
            per_response_token=(6 if head_trains else 4) * head,
            head_forward=2 * head,
            per_patch=vision + projector / merge,
            per_span=3 * attention,
            per_span_forward=attention,
            per_patch_span=vision_attention,
        )

    def step(self, work: dict[str, float], reference_forward: bool = False) -> float:
        """FLOPs of a training step on `work` (plus a reference forward on the same tokens)."""
        flops = (
            self.per_token * work["tokens"]
            + self.per_response_token * work["response_tokens"]
            + self.per_span * work["spans"]
        )
        flops += self.per_patch * work["patches"] + self.per_patch_span * work["patch_spans"]
        if reference_forward:
            flops += (
                self.per_token_forward * work["tokens"]
                + self.head_forward * work["response_tokens"]
                + self.per_span_forward * work["spans"]
            )
        return flops
