"""The shapes world: synthetic images whose content is known exactly.

Each scene holds 1-3 copies of one shape in one colour, placed in one region of the image.
Questions ask for one attribute (colour, shape, count or position); one answer states the true
value, the other a wrong one. Judge critiques follow the recipe that makes a tiny model learn
the task: say what the image shows, compare each answer with it, then give the verdict.

The world is the embedded default of the demo and the tests, and the ground truth that the
simulated curation stages are measured against (`carevl.standins.world` writes its files). Why
the critiques, answers and questions look as they do: docs/shapes-world.md.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from carevl.images import png_bytes
from carevl.prompts import verdict_line

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# Region of each position as (x0, y0, x1, y1) fractions of the image.
REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}
ATTRIBUTES = ("colour", "shape", "count", "position")
# How much detail each question asks for. Captions state coarse content (which shape, which colour)
# reliably and often leave out or blur fine detail (how many, where), as real captioners do; the
# simulated curation models err accordingly (`carevl.standins.simulated`), and held-out accuracy is
# reported per kind (the samples' `meta.category`).
KINDS = {"colour": "coarse", "shape": "coarse", "count": "fine", "position": "fine"}

BACKGROUND = (60, 60, 60)
IMAGE_SIZE = 56  # a multiple of 28: Qwen2-VL sees a 4 x 4 patch grid, merged into 4 image tokens


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    position: str

    def value(self, attribute: str) -> str:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": COUNT_WORDS[self.count],
            "position": self.position,
        }[attribute]

    def caption(self, count: bool = True) -> str:
        """The scene in words; without `count`, "some" stands for the number (a blurred caption)."""
        if not count:
            return f"some {self.colour} {self.shape}s at the {self.position}"
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun} at the {self.position}"


QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What kind of shape is shown?",
    "count": "How many shapes are there?",
    "position": "Where are the shapes?",
}
ANSWERS = {
    "colour": "The shapes are {}.",
    "shape": "It is a {}.",
    "count": "There are {}.",
    "position": "They are at the {}.",
}


ANSWER_STYLES = ("sentence", "short", "verbose")


def answer(attribute: str, value: str, style: str = "sentence") -> str:
    """An answer stating `value` in one of the styles the world's answerers use."""
    sentence = ANSWERS[attribute].format(value)
    if style == "short":
        return value.capitalize() + "."
    if style == "verbose":
        return "Looking at the image carefully, " + sentence[0].lower() + sentence[1:]
    if style != "sentence":
        raise ValueError(f"style must be one of {ANSWER_STYLES}, got {style!r}")
    return sentence


def attribute_values(attribute: str) -> list[str]:
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": list(COUNT_WORDS.values()),
        "position": list(REGIONS),
    }[attribute]


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice((1, 2, 3)), rng.choice(list(REGIONS)))


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene; shapes do not overlap and stay inside their region."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * size for v in REGIONS[scene.position])
    radius = size * 0.13
    # Three slots along the centre line of the region's long side (regions are half the image, so
    # "left" and "top" shapes never share a place); copies take distinct slots, jittered a little.
    tall = (y1 - y0) > (x1 - x0)
    slots = []
    for k in range(3):
        along = (k + 0.5) / 3
        cx = (x0 + x1) / 2 if tall else x0 + along * (x1 - x0)
        cy = y0 + along * (y1 - y0) if tall else (y0 + y1) / 2
        slots.append((cx, cy))
    jitter = size * 0.02
    centres = [
        (cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter))
        for cx, cy in rng.sample(slots, scene.count)
    ]
    fill = COLOURS[scene.colour]
    for cx, cy in centres:
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


@dataclass(frozen=True)
class JudgeItem:
    """One judge example: the scene, the question, the two answers and the better one."""

    id: str
    scene: Scene
    attribute: str
    question: str
    responses: tuple[str, str]
    values: tuple[str, str]
    label: int
    image: bytes

    def fields(self) -> dict:
        """The shard fields every sample kind built from this item shares."""
        return {
            "id": self.id,
            "question": self.question,
            "responses": list(self.responses),
            "label": self.label,
            "image": self.image,
            "meta": {"attribute": self.attribute, "category": KINDS[self.attribute], "scene": self.scene.__dict__},
        }

    def critique(self) -> str:
        """Quote each answer's value, say which value the image has and name the answer that says it,
        then give the verdict: the base model's quoting task (`quote_task`) with the image as the
        reference. The decisive step is a recall, not a comparison: after "The image has purple, as
        Answer" the judge names the answer that says purple (docs/shapes-world.md)."""
        return critique(self.values, self.scene.value(self.attribute), self.label, self.label)


def quotes(values: tuple[str, ...] | list[str]) -> str:
    return " ".join(f"Answer {number} says {value}." for number, value in enumerate(values, start=1))


def recall(quoted: tuple[str, ...] | list[str], source: str, had: str, named: int | None) -> str:
    """The quotes, then the value `source` has and the answer named for it (None: neither answer)."""
    said = "neither answer says" if named is None else f"Answer {named} says"
    return f"{quotes(quoted)} The {source} has {had}, as {said}."


def recall_critique(values: tuple[str, ...] | list[str], truth: str, source: str) -> str:
    """Quote each answer's value, then name the (first) answer whose value `source` has."""
    return recall(values, source, truth, list(values).index(truth) + 1)


def critique(quoted: tuple[str, ...] | list[str], had: str, named: int | None, verdict: int) -> str:
    """A judge critique: the quoted values, the value it says the image has and the answer it
    names for it (None: "as neither answer says"), then the verdict line."""
    return f"{recall(quoted, 'image', had, named)} {verdict_line(verdict)}"


def judge_items(n: int, seed: int, prefix: str = "shapes", attributes: tuple[str, ...] = ATTRIBUTES) -> list[JudgeItem]:
    """n judge items drawn from a seeded generator: same seed, same items, same images."""
    rng = random.Random(seed)
    items = []
    for index in range(n):
        scene = random_scene(rng)
        attribute = rng.choice(attributes)
        truth = scene.value(attribute)
        wrong = rng.choice([v for v in attribute_values(attribute) if v != truth])
        label = rng.choice((1, 2))
        values = (truth, wrong) if label == 1 else (wrong, truth)
        template = ANSWERS[attribute]
        items.append(
            JudgeItem(
                id=f"{prefix}-{seed}-{index:06d}",
                scene=scene,
                attribute=attribute,
                question=QUESTIONS[attribute],
                responses=(template.format(values[0]), template.format(values[1])),
                values=values,
                label=label,
                image=png_bytes(render(scene, rng)),
            )
        )
    return items


CAPTION_PROMPT = "Describe the image."


def caption_target(scene: Scene, count: bool = True) -> str:
    return f"The image shows {scene.caption(count)}."


READING_PROMPT = "Whatever the answers say, what does the image show?"


def reading_task(attribute: str, value: str, rng: random.Random) -> tuple[str, str]:
    """A vision skill of the base model: say what the image shows while two answers are in view,
    whatever they say (two values drawn at random, so they may miss the image's value or both
    state it: the task is reading, not judging).

    Real VLMs read an image as well with other text in the prompt as without; a tiny one taught
    to answer bare questions reads counts poorly in the judge's longer prompt (docs/results.md).
    """
    shown = [answer(attribute, v) for v in rng.sample(attribute_values(attribute), 2)]
    prompt = f"Question: {QUESTIONS[attribute]}\nAnswer 1: {shown[0]}\nAnswer 2: {shown[1]}\n{READING_PROMPT}"
    return prompt, f"The image has {value}."


def quote_task(rng: random.Random) -> tuple[str, str]:
    """A text skill of the base model: quote the value of each answer line, then say which answer
    gives a reference value.

    Real language models arrive able to copy and look up words of their prompt; a tiny random one
    does not, and learning that inside the long judge prompt takes far longer than the judgement.
    The answers are sentences, the style of the world's answerers.
    """
    attribute = rng.choice(ATTRIBUTES)
    picked = rng.sample(attribute_values(attribute), 2)
    truth = rng.choice(picked)
    lines = [answer(attribute, value) for value in picked]
    prompt = f"Answer 1: {lines[0]}\nAnswer 2: {lines[1]}\nWhich answer says {truth}?"
    return prompt, recall_critique(picked, truth, "reference")


# Attributes the demo's judge questions ask about. Positions are drawn and captioned, but a tiny
# language model learns to read *where* the content is too slowly for a CPU demo.
JUDGE_ATTRIBUTES = ("colour", "shape", "count")


def worse_critiques(item: JudgeItem) -> list[str]:
    """Simulated worse critiques of a judge item, each with a known flaw: the recall names the other
    answer; the image is misread; the quotes are swapped; the analysis is right but the verdict is
    not. They stand in for sampled critiques that an evaluator scored lower (Best-to-Worse)."""
    truth, other, values = item.scene.value(item.attribute), 3 - item.label, item.values
    return [
        critique(values, truth, other, other),
        critique(values, values[other - 1], other, other),
        critique(values[::-1], truth, other, other),
        critique(values, truth, item.label, other),
    ]


def distinct_worse_critiques(item: JudgeItem, n: int) -> list[str]:
    """n distinct worse critiques of an item, in this order: `worse_critiques`, the image misread as
    each other value of the asked attribute (naming either answer, under either verdict), then
    shortened analyses under the wrong verdict. Raises ValueError when there are fewer."""
    truth, other = item.scene.value(item.attribute), 3 - item.label
    misread = (
        critique(item.values, value, named, verdict)
        for value in attribute_values(item.attribute)
        if value != truth
        for named in (1, 2)
        for verdict in (1, 2)
    )
    shortened = (f"{text} {verdict_line(other)}" for text in (quotes(item.values), f"The image has {truth}.", ""))
    candidates = [*worse_critiques(item), *misread, *(text.strip() for text in shortened)]
    critiques = list(dict.fromkeys(c for c in candidates if c != item.critique()))[:n]
    if len(critiques) < n:
        raise ValueError(f"{item.id}: only {len(critiques)} distinct worse critiques, {n} asked for")
    return critiques


def with_value(scene: Scene, attribute: str, value: str) -> Scene:
    """The scene with one attribute set to `value` (as `Scene.value` words it)."""
    field = (
        {"count": {word: n for n, word in COUNT_WORDS.items()}[value]} if attribute == "count" else {attribute: value}
    )
    return Scene(**{**scene.__dict__, **field})


# -- reading the world back from text (the simulated curation backends and the curation report) ------


def attribute_of(question: str) -> str | None:
    """The attribute a shapes-world question asks about, None for any other text."""
    return next((attribute for attribute, text in QUESTIONS.items() if text in question), None)


def mentioned_value(text: str, attribute: str) -> str | None:
    """The first value of `attribute` that `text` names as a word ("circles" names circle)."""
    found = [
        (m.start(), value)
        for value in attribute_values(attribute)
        for m in [re.search(rf"\b{value}s?\b", text, re.IGNORECASE)]
        if m
    ]
    return min(found)[1] if found else None


def scene_of(record: dict) -> Scene:
    return Scene(**record)


def true_label(item: dict, responses: list[str]) -> int | None:
    """The truly better answer of a curation pair (1 or 2) where exactly one answer states the
    world's value, from the item's `meta.truth`; None otherwise. The curation report's `truth`."""
    truth = item.get("meta", {}).get("truth")
    if truth is None:
        return None
    attribute = truth["attribute"]
    value = scene_of(truth["scene"]).value(attribute)
    right = [mentioned_value(text, attribute) == value for text in responses]
    return (1 if right[0] else 2) if right[0] != right[1] else None
