"""Vision-encoder pretraining of the demo (carevl.standins.vision_pretrain): it teaches the encoder to
expose the scene and touches nothing else of the checkpoint."""

from __future__ import annotations

import torch

from carevl.standins import shapes
from carevl.standins.vision_pretrain import pretrain_vision


def test_vision_pretraining_trains_the_encoder_alone_until_colour_is_readable(tiny_qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(tiny_qwen).state_dict()
    accuracy = pretrain_vision(tiny_qwen, str(tmp_path / "out"), steps=60, batch_size=16, seed=0)
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()

    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".visual." in name or name.startswith("visual.") for name in changed), sorted(changed)[:5]
    assert any("merger" in name for name in changed)  # the projector into the language model trains too
    # Colour is the easiest attribute: a linear probe on the mean image token reads it on a whole batch
    # of fresh scenes (its last one, 16 scenes), where chance is one in len(colours).
    chance = 1 / len(shapes.attribute_values("colour"))
    assert accuracy["colour"] >= 0.75 > 3 * chance
