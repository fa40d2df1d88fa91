"""The shapes world: synthetic images whose content is known exactly.

Each scene holds 1-3 copies of one shape in one colour, placed in one region of the image.
Questions ask for one attribute (colour, shape, count or position); one answer states the true
value, the other a wrong one. Judge critiques follow the recipe that makes a tiny model learn
the task: say what the image shows, compare each answer with it, then give the verdict.

The world is the embedded default of the demo and the tests, and the ground truth that the
simulated curation stages are measured against.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

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

    def caption(self) -> str:
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


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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
            "meta": {"attribute": self.attribute, "scene": self.scene.__dict__},
        }

    def critique(self) -> str:
        """Say what the image shows, quote each answer's value, name the answer whose value the image
        has, then give the verdict.

        The decisive step is a recall, not a comparison: after "The image has purple, as Answer" the
        judge names the answer that says purple. A tiny model learns that lookup in minutes (from
        where the value stands in a sentence-style prompt: tools/lookup_probe.py); asked instead to
        write "correct" or "wrong" after each quoted value, the same model stayed at chance on the
        first decision after 1,250 steps.
        """
        truth = self.scene.value(self.attribute)
        return " ".join([f"The image shows {self.scene.caption()}.", recall_critique(self.values, truth, "image"), verdict_line(self.label)])


def recall_critique(values: tuple[str, ...] | list[str], truth: str, source: str) -> str:
    """Quote each answer's value, then name the (first) answer whose value `source` has."""
    quotes = " ".join(f"Answer {number} says {value}." for number, value in enumerate(values, start=1))
    return f"{quotes} The {source} has {truth}, as Answer {list(values).index(truth) + 1} says."


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


def caption_target(scene: Scene) -> str:
    return f"The image shows {scene.caption()}."


def quote_task(rng: random.Random) -> tuple[str, str]:
    """A text skill of the base model: quote the value of each answer line, then say which answer
    gives a reference value.

    Real language models arrive able to copy and look up words of their prompt; a tiny random one
    does not, and learning that inside the long judge prompt takes far longer than the judgement.
    The answers are sentences, the style of the world's answerers. The tiny model finds the answer
    that says a value by where the value stands in the prompt, not by matching its own quotes: with
    sentence-only quoting here and in the judge data it reached 91.5% held-out verdict accuracy;
    with quoting in every style of `ANSWER_STYLES` 57.0%, and on judge pairs whose answers mix the
    styles it stayed at chance in every run (46.5-56.0%).
    """
    attribute = rng.choice(ATTRIBUTES)
    picked = rng.sample(attribute_values(attribute), 2)
    truth = rng.choice(picked)
    lines = [answer(attribute, value) for value in picked]
    prompt = f"Answer 1: {lines[0]}\nAnswer 2: {lines[1]}\nWhich answer says {truth}?"
    return prompt, recall_critique(picked, truth, "reference")


# Attributes the demo's judge questions ask about. Positions are drawn and captioned, but a tiny
# language model learns to read *where* the content is (which image token holds it) too slowly for
# a CPU demo: after 750 caption steps it names the right position 57% of the time, against 98-100%
# for colour, shape and count.
JUDGE_ATTRIBUTES = ("colour", "shape", "count")


def write_world(
    out_dir: str,
    train: int = 2000,
    heldout: int = 200,
    captions: int = 2000,
    shard_size: int = 500,
    seed: int = 0,
    attributes: tuple[str, ...] = JUDGE_ATTRIBUTES,
) -> dict[str, int]:
    """Write the world's shards: ``train`` and ``heldout`` judge SFT samples, and ``pretrain``
    instruct samples for the tiny base model: ``captions`` captions, as many questions about the
    image answered in one sentence (what the candidate models do), and as many quoting tasks.

    The answered questions are what lets SFT find the asked attribute's value fast: with captions
    and quoting only, the tiny judge reached 72.5% held-out verdict accuracy after 5 epochs of
    2,000 samples and 88.5% after 10; with them, 91.5% after 4 (same pretraining cost).

    Seeds differ per split, so held-out images never appear in training.
    """
    from pathlib import Path

    from carevl.schema import InstructSample, SFTSample, ShardWriter

    out = Path(out_dir)
    for split, n, split_seed in (("train", train, seed), ("heldout", heldout, seed + 1)):
        with ShardWriter(out / split, prefix=split, max_count=shard_size, kind="sft") as writer:
            for item in judge_items(n, split_seed, prefix=f"shapes-{split}", attributes=attributes):
                writer.write(SFTSample(**item.fields(), target=item.critique(), source="shapes-world"))
    rng = random.Random(seed + 2)
    with ShardWriter(out / "pretrain", prefix="pretrain", max_count=shard_size, kind="instruct") as writer:
        for index in range(3 * captions):
            scene = random_scene(rng)
            if index % 3 == 0:
                prompt, target = CAPTION_PROMPT, caption_target(scene)
            elif index % 3 == 1:
                attribute = rng.choice(attributes)
                prompt, target = QUESTIONS[attribute], answer(attribute, scene.value(attribute))
            else:
                prompt, target = quote_task(rng)
            writer.write(
                InstructSample(
                    id=f"shapes-pretrain-{index:06d}",
                    prompt=prompt,
                    target=target,
                    source="shapes-world",
                    image=png_bytes(render(scene, rng)),
                    meta={"scene": scene.__dict__},
                )
            )
    return {"train": train, "heldout": heldout, "pretrain": 3 * captions}


# The shapes world in the benchmarks' formats, so `carevl test` runs on the demo judge. The
# categories are a stated mapping, not the benchmarks' own: colour questions stand for
# VL-RewardBench "general", shape for "hallucination" (object recognition), count for "reasoning";
# every MLLM-as-a-Judge record stands for the "coco" subset, and a third of them are ties (two
# answers that are both wrong).
BENCHMARK_CATEGORIES = {"colour": "general", "shape": "hallucination", "count": "reasoning", "position": "general"}


def write_benchmarks(out_dir: str, n: int = 120, seed: int = 7, attributes: tuple[str, ...] = JUDGE_ATTRIBUTES) -> dict[str, int]:
    """Write `vlrewardbench/` and `mllm_judge/` benchmark shards of fresh shapes-world items."""
    from pathlib import Path

    from carevl.benchmarks import MLLM_JUDGE, VLREWARDBENCH
    from carevl.schema import BenchmarkSample, ShardWriter

    out = Path(out_dir)
    rng = random.Random(seed)
    with ShardWriter(out / VLREWARDBENCH, prefix="benchmark", kind="benchmark") as vlrb, ShardWriter(
        out / MLLM_JUDGE, prefix="benchmark", kind="benchmark"
    ) as mllm:
        for item in judge_items(n, seed, prefix="shapes-bench", attributes=attributes):
            fields = item.fields()
            vlrb.write(BenchmarkSample(**fields, benchmark=VLREWARDBENCH, category=BENCHMARK_CATEGORIES[item.attribute]))
            if rng.random() < 1 / 3:
                truth = item.scene.value(item.attribute)
                wrong = [v for v in attribute_values(item.attribute) if v != truth]
                fields.update(responses=[ANSWERS[item.attribute].format(v) for v in rng.sample(wrong, 2)], label="tie")
            mllm.write(BenchmarkSample(**fields, benchmark=MLLM_JUDGE, category="coco"))
    return {VLREWARDBENCH: n, MLLM_JUDGE: n}


def worse_critiques(item: JudgeItem) -> list[str]:
    """Simulated worse critiques of a judge item, each with a known flaw: the recall names the other
    answer; the scene is misread; the quotes are swapped; the analysis is right but the verdict is
    not. They stand in for sampled critiques that an evaluator scored lower (Best-to-Worse)."""
    truth = item.scene.value(item.attribute)
    other = 3 - item.label
    caption = f"The image shows {item.scene.caption()}."
    wrong_value = item.values[other - 1]
    misread = with_value(item.scene, item.attribute, wrong_value)
    recall = recall_critique(item.values, truth, "image")
    return [
        " ".join([caption, recall.replace(f"as Answer {item.label} says", f"as Answer {other} says"), verdict_line(other)]),
        " ".join([f"The image shows {misread.caption()}.", recall_critique(item.values, wrong_value, "image"), verdict_line(other)]),
        " ".join([caption, recall_critique(item.values[::-1], truth, "image"), verdict_line(other)]),
        " ".join([caption, recall, verdict_line(other)]),
    ]


def with_value(scene: Scene, attribute: str, value: str) -> Scene:
    """The scene with one attribute set to `value` (as `Scene.value` words it)."""
    field = {"count": {word: n for n, word in COUNT_WORDS.items()}[value]} if attribute == "count" else {attribute: value}
    return Scene(**{**scene.__dict__, **field})


def write_preference_groups(out_dir: str, n: int = 400, seed: int = 11, attributes: tuple[str, ...] = JUDGE_ATTRIBUTES, shard_size: int = 200) -> int:
    """Preference-group shards of the shapes world: the correct critique against 1-4 simulated worse ones."""
    from carevl.schema import PreferenceGroupSample, ShardWriter

    rng = random.Random(seed)
    with ShardWriter(out_dir, prefix="groups", max_count=shard_size, kind="preference_group") as writer:
        for item in judge_items(n, seed, prefix="shapes-groups", attributes=attributes):
            rejected = worse_critiques(item)[: rng.randint(1, 4)]
            writer.write(PreferenceGroupSample(**item.fields(), chosen=item.critique(), rejected=rejected, strategy="simulated"))
    return n


# -- reading the world back from text (the simulated curation backends and the curation report) ------


def attribute_of(question: str) -> str | None:
    """The attribute a shapes-world question asks about, None for any other text."""
    return next((attribute for attribute, text in QUESTIONS.items() if text in question), None)


def mentioned_value(text: str, attribute: str) -> str | None:
    """The first value of `attribute` that `text` names as a word ("circles" names circle)."""
    import re

    found = [(m.start(), value) for value in attribute_values(attribute) for m in [re.search(rf"\b{value}s?\b", text, re.IGNORECASE)] if m]
    return min(found)[1] if found else None


def scene_of(record: dict) -> Scene:
    return Scene(**record)
