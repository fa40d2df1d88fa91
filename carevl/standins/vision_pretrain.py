"""Vision-encoder pretraining on the shapes world: the stand-in for the pretrained encoder a real VLM has.

Real judges start from VLMs whose vision encoders were pretrained on billions of images. A tiny
random encoder has seen nothing, and a tiny language model learns to read random image features
far too slowly for a CPU demo. This step trains the encoder (and projector) of a tiny checkpoint
to expose the scene's attributes, with linear probes that are thrown away afterwards: colour,
shape and count from the mean of the image tokens, position from their concatenation (which keeps
their order). The checkpoint keeps its format; only its vision weights change.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import torch
from torch import nn

from carevl.standins import shapes

log = logging.getLogger(__name__)


def pretrain_vision(
    model_dir: str, out_dir: str, steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0
) -> dict[str, float]:
    """Train the vision tower of a Qwen2-VL-family checkpoint on scene attributes; returns final probe accuracies."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    if not hasattr(model.model, "visual"):
        raise ValueError(f"{model.config.model_type}: vision pretraining supports the Qwen2-VL family only")
    vision = model.model.visual.train()
    width = model.config.text_config.hidden_size
    tokens = (shapes.IMAGE_SIZE // 14 // vision.spatial_merge_size) ** 2
    values = {a: shapes.attribute_values(a) for a in shapes.ATTRIBUTES}
    probes = nn.ModuleDict(
        {a: nn.Linear(width * (tokens if a == "position" else 1), len(v)) for a, v in values.items()}
    )
    optimizer = torch.optim.AdamW([*vision.parameters(), *probes.parameters()], lr=lr)
    accuracy = {}
    for step in range(steps):
        scenes = [shapes.random_scene(rng) for _ in range(batch_size)]
        pixels = processor.image_processor(images=[shapes.render(s, rng) for s in scenes], return_tensors="pt")
        features = vision(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"], return_dict=True).pooler_output
        features = features.view(batch_size, tokens, width)
        loss = torch.zeros(())
        for attribute, probe in probes.items():
            target = torch.tensor([values[attribute].index(s.value(attribute)) for s in scenes])
            logits = probe(features.flatten(1) if attribute == "position" else features.mean(1))
            loss = loss + nn.functional.cross_entropy(logits, target)
            accuracy[attribute] = (logits.argmax(1) == target).float().mean().item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "vision pretraining step %d/%d loss %.3f probe accuracy %s",
                step + 1,
                steps,
                loss.item(),
                {a: round(v, 2) for a, v in accuracy.items()},
            )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="tiny checkpoint to start from")
    parser.add_argument("--out", required=True, help="where to write the checkpoint with the pretrained encoder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    accuracy = pretrain_vision(args.model, args.out, steps=args.steps, seed=args.seed)
    print(f"probe accuracy after vision pretraining: {accuracy}")


if __name__ == "__main__":
    main()
