"""Simulations of the curation models for the shapes world. They are not models: each reads the
world's truth (the scene of every image, from the ingest stage's items.jsonl) and answers through
the same `ChatModel` / `RewardModel` interfaces as real backends, with chosen error rates, so every
curation stage can run and be measured on CPU in seconds. `latency` (seconds per request) makes a
run last long enough to be interrupted in tests.

Every random choice is seeded by the model's name and its whole input (text and image bytes), so
a reply depends only on its own request: a killed and resumed stage reproduces an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from pathlib import Path

from carevl.backends.interface import Chat, ChatModel, Reply, RewardModel, Sampling
from carevl.prompts import SCORE_ASPECTS
from carevl.standins import shapes


def seeded(*parts) -> random.Random:
    return random.Random(hashlib.sha256(repr(parts).encode()).hexdigest())


class WorldTruth:
    """Scene of each image, by sha256, from a curation work directory's items.jsonl."""

    def __init__(self, workdir: str):
        self.path = Path(workdir) / "items.jsonl"
        self._scenes: dict[str, shapes.Scene] | None = None

    def scene(self, image: bytes) -> shapes.Scene | None:
        if self._scenes is None:
            self._scenes = {}
            for line in self.path.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if "truth" in record.get("meta", {}):
                    self._scenes[record["image"]] = shapes.scene_of(record["meta"]["truth"]["scene"])
        return self._scenes.get(hashlib.sha256(image).hexdigest())


class SimulatedAnswerer(ChatModel):
    """A simulated candidate model: states the true value of the asked attribute, or with probability
    `error_rate` (`fine_error_rate` on fine-detail questions, `shapes.KINDS`; doubled when sampling at
    temperature > 0) a wrong one, in one of `shapes.ANSWER_STYLES`, or in a style drawn per answer
    (`style: mixed`).

    With `shared_errors`, a wrong answer is the image's look-alike value: one wrong value per image
    and attribute, drawn from the image alone, so the models that err on an item give the same wrong
    answer, as real models share failure modes (the copy hidden at the edge is missed by all). Its
    pairs then always hold one right answer; without it, two wrong counts can make a pair.
    `shared_errors: fine` (or `coarse`) shares the errors on that kind of question only.

    The shapes pipeline has every model answer in sentences: were better models also the longer
    ones, a judge trained on their pairs could get most labels right from length alone, and on pairs
    of mixed styles the tiny judge never learned the task (see `shapes.quote_task`)."""

    operational = ("world", "latency")

    def __init__(
        self,
        name: str,
        world: str,
        error_rate: float = 0.3,
        fine_error_rate: float | None = None,
        style: str = "sentence",
        shared_errors: bool | str = False,
        latency: float = 0.0,
    ):
        if style not in (*shapes.ANSWER_STYLES, "mixed"):
            raise ValueError(f"style must be one of {sorted(shapes.ANSWER_STYLES)} or 'mixed'")
        kinds = sorted(set(shapes.KINDS.values()))
        if not isinstance(shared_errors, bool) and shared_errors not in kinds:
            raise ValueError(f"shared_errors must be true, false or one of {kinds}, got {shared_errors!r}")
        self.name, self.truth, self.style, self.latency = name, WorldTruth(world), style, latency
        self.shared_kinds = set(kinds) if shared_errors is True else {shared_errors} if shared_errors else set()
        self.error_rates = {"coarse": error_rate, "fine": error_rate if fine_error_rate is None else fine_error_rate}

    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        replies = []
        for chat in chats:
            time.sleep(self.latency)
            scene = self.truth.scene(chat.images[0]) if chat.images else None
            attribute = shapes.attribute_of(chat.text())
            if scene is None or attribute is None:
                replies.append(Reply(error="simulation: not a shapes-world request"))
                continue
            truth = scene.value(attribute)
            error = min(1.0, self.error_rates[shapes.KINDS[attribute]] * (2 if sampling.temperature > 0 else 1))
            others = [v for v in shapes.attribute_values(attribute) if v != truth]
            shared = shapes.KINDS[attribute] in self.shared_kinds
            look_alike = seeded("look-alike", chat.images[0], attribute).choice(others) if shared else None
            texts = []
            for index in range(sampling.n):
                rng = seeded(self.name, chat.text(), chat.images[0], sampling.seed, sampling.temperature, index)
                value = (look_alike or rng.choice(others)) if rng.random() < error else truth
                style = rng.choice(shapes.ANSWER_STYLES) if self.style == "mixed" else self.style
                texts.append(shapes.answer(attribute, value, style))
            replies.append(Reply(texts))
        return replies


class SimulatedCaptioner(ChatModel):
    """A simulated captioner. It states coarse content reliably, misreading the colour or the shape
    with probability `error_rate`; fine detail it often leaves out ("some" for the number, with
    probability `fine_miss_rate`) or gets wrong (a wrong number, `fine_error_rate`), as real
    captioners miss counts and small objects."""

    operational = ("world", "latency")

    def __init__(
        self, name: str, world: str, error_rate: float = 0.05, fine_miss_rate: float = 0.0, fine_error_rate: float = 0.0
    ):
        if fine_miss_rate + fine_error_rate > 1:
            raise ValueError("fine_miss_rate + fine_error_rate must be at most 1")
        self.name, self.truth, self.error_rate = name, WorldTruth(world), error_rate
        self.fine_miss_rate, self.fine_error_rate = fine_miss_rate, fine_error_rate

    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        replies = []
        for chat in chats:
            scene = self.truth.scene(chat.images[0]) if chat.images else None
            if scene is None:
                replies.append(Reply(error="simulation: unknown image"))
                continue
            rng = seeded(self.name, chat.images[0], sampling.seed)
            if rng.random() < self.error_rate:
                scene = misread(
                    scene, rng.choice([a for a in shapes.JUDGE_ATTRIBUTES if shapes.KINDS[a] == "coarse"]), rng
                )
            fine = rng.random()
            if fine < self.fine_error_rate:
                scene = misread(scene, "count", rng)
            replies.append(
                Reply(
                    [shapes.caption_target(scene, count=fine >= self.fine_error_rate + self.fine_miss_rate)]
                    * sampling.n
                )
            )
        return replies


def misread(scene: shapes.Scene, attribute: str, rng: random.Random) -> shapes.Scene:
    """The scene with `attribute` set to a wrong value drawn by `rng`."""
    wrong = rng.choice([v for v in shapes.attribute_values(attribute) if v != scene.value(attribute)])
    return shapes.with_value(scene, attribute, wrong)


_ANSWER_LINE = re.compile(r"^Answer ([12]): (.*)$", re.MULTILINE)


class SimulatedJudge(ChatModel):
    """A simulated strong LVLM judge (GPT-4o's role): where exactly one answer is right it picks that
    one with probability `accuracy` (`fine_accuracy` on fine-detail questions) and otherwise names
    the worse answer, or with `unsure: first` Answer 1, whichever it is (LLM judges' position bias,
    Zheng et al. 2023: it is then right on every pair whose better answer comes first, and wrong in
    the same, learnable way on the rest); where no answer or both are right it picks the longer
    answer (a verbosity bias), ties at random. Its explanation reads like the shapes
    world's critiques and supports its verdict, right or wrong; on a pair with no right answer it
    says the image has the picked answer's value, or with `reads_when_neither` what it sees there
    (the image's value with probability `reading_accuracy`, by default `accuracy` of the kind, else a
    misreading) and, where no answer says that, "as neither answer says" (a real LVLM describes the
    image it sees; how well it sees need not be how often its verdict is biased). With a
    schema it answers as JSON {"explanation", "verdict"}, like structured output; without one, in
    free text ending with the verdict line. At temperature > 0 the n samples differ."""

    operational = ("world", "latency")

    def __init__(
        self,
        name: str,
        world: str,
        accuracy: float = 0.8,
        fine_accuracy: float | None = None,
        unsure: str = "worse",
        reads_when_neither: bool = False,
        reading_accuracy: float | None = None,
        latency: float = 0.0,
    ):
        if unsure not in ("worse", "first"):
            raise ValueError(f"unsure must be 'worse' or 'first', got {unsure!r}")
        self.name, self.truth, self.unsure, self.latency = name, WorldTruth(world), unsure, latency
        self.reads_when_neither = reads_when_neither
        self.accuracies = {"coarse": accuracy, "fine": accuracy if fine_accuracy is None else fine_accuracy}
        self.reading_accuracy = reading_accuracy

    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        replies = []
        for chat in chats:
            time.sleep(self.latency)
            scene = self.truth.scene(chat.images[0]) if chat.images else None
            text = chat.text()
            attribute = shapes.attribute_of(text)
            answers = dict(_ANSWER_LINE.findall(text))
            if scene is None or attribute is None or set(answers) != {"1", "2"}:
                replies.append(Reply(error="simulation: not a shapes-world judge request"))
                continue
            values = [shapes.mentioned_value(answers[k], attribute) for k in ("1", "2")]
            samples = [
                self.judgment(
                    scene,
                    attribute,
                    answers,
                    values,
                    seeded(self.name, text, chat.images[0], sampling.seed, index if sampling.temperature > 0 else 0),
                )
                for index in range(sampling.n)
            ]
            replies.append(
                Reply(
                    [
                        json.dumps({"explanation": e, "verdict": v})
                        if schema
                        else f"{e} Overall Judgment: Answer {v} is better."
                        for e, v in samples
                    ]
                )
            )
        return replies

    def judgment(
        self, scene: shapes.Scene, attribute: str, answers: dict, values: list, rng: random.Random
    ) -> tuple[str, int]:
        truth = scene.value(attribute)
        right = [v == truth for v in values]
        accuracy = self.accuracies[shapes.KINDS[attribute]]
        if right[0] != right[1]:
            best = 1 if right[0] else 2
            sure = rng.random() < accuracy
            verdict = best if sure else 1 if self.unsure == "first" else 3 - best
        else:
            lengths = [len(answers["1"]), len(answers["2"])]
            verdict = 1 + (lengths[1] > lengths[0]) if lengths[0] != lengths[1] else rng.choice((1, 2))
        quoted = [v or "nothing clear" for v in values]
        if self.reads_when_neither and not any(right):
            reading = accuracy if self.reading_accuracy is None else self.reading_accuracy
            seen = truth if rng.random() < reading else misread(scene, attribute, rng).value(attribute)
            named = values.index(seen) + 1 if seen in values else None
            verdict = named or verdict
            text = shapes.critique(quoted, seen, named, verdict)
        else:
            seen = truth if values[verdict - 1] == truth or values[verdict - 1] is None else values[verdict - 1]
            text = shapes.critique(quoted, seen, verdict, verdict)
        return text.rsplit(" Overall Judgment:", 1)[0], verdict


_DESCRIPTION = re.compile(r"Image description: (.*)", re.IGNORECASE)


class SimulatedExpert(RewardModel):
    """A simulated text-only reward model: it sees the question, the caption and one answer, scores 2
    when the answer's value matches the caption's (0 otherwise), flips that with probability
    `error_rate`, and adds 0 or 1 at random, so two equally right answers tie half the time. Where
    the caption does not state the asked value it cannot tell, and its scores are that noise alone."""

    operational = ("world", "latency")

    def __init__(self, name: str, error_rate: float = 0.2):
        self.name, self.error_rate = name, error_rate

    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        scores = []
        for conversation in conversations:
            prompt = "\n".join(m["content"] for m in conversation if m["role"] == "user")
            answer = "\n".join(m["content"] for m in conversation if m["role"] == "assistant")
            attribute = shapes.attribute_of(prompt)
            description = _DESCRIPTION.search(prompt)
            if attribute is None or description is None:
                scores.append(None)
                continue
            match = shapes.mentioned_value(answer, attribute) == shapes.mentioned_value(description.group(1), attribute)
            rng = seeded(self.name, prompt, answer)
            if rng.random() < self.error_rate:
                match = not match
            scores.append(2.0 * match + rng.randint(0, 1))
        return scores


_FIELD = re.compile(r"^(Image description|Question|Answer 1|Answer 2|Reference decision): (.*)$", re.MULTILINE)


class SimulatedEvaluator(ChatModel):
    """A simulated critique evaluator (Llama-3.3-70B's role). It grades what a reader of the request
    can check, on the paper's four aspects of 25 points:

    - relevance: each answer's value quoted as that answer states it (12 and 13 points);
    - accuracy: the verdict is the reference decision (15), and the value the critique says the
      image has agrees with the image description (10; 5 where the description does not state it);
    - reasoning: the answer it names does say that value, or for "as neither answer says" neither
      quote does (15), and the verdict follows the named answer (10);
    - clarity: 25 for a critique in the world's form, 5 for anything else;

    then +-2 at random. With probability `unparseable_rate` it forgets the final "Score:" line. With
    a schema (structured output) it replies with the four aspects as JSON and never forgets."""

    operational = ("world", "latency")

    def __init__(self, name: str, unparseable_rate: float = 0.02):
        self.name, self.unparseable_rate = name, unparseable_rate

    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        replies = []
        for chat in chats:
            text = chat.text()
            fields = dict(_FIELD.findall(text))
            attribute = shapes.attribute_of(fields.get("Question", ""))
            critique = text.split("Critique to grade:", 1)[-1].split("Grade the critique", 1)[0].strip()
            if attribute is None or "Reference decision" not in fields:
                replies.append(Reply(error="simulation: not a shapes-world evaluation request"))
                continue
            rng = seeded(self.name, text, sampling.seed)
            aspects = grade(critique, fields, attribute)
            aspects["clarity"] = max(0, min(25, aspects["clarity"] + rng.randint(-2, 2)))  # SCORE_ASPECTS[-1]
            points = sum(aspects.values())
            if schema is not None:
                replies.append(Reply([json.dumps(aspects)] * sampling.n))
                continue
            ending = "" if rng.random() < self.unparseable_rate else f"\nScore: {points}"
            replies.append(Reply([f"Relevance, accuracy, reasoning and clarity weighed.{ending}"] * sampling.n))
        return replies


_QUOTE = re.compile(r"Answer ([12]) says (\w+)\.")
_RECALL = re.compile(r"The image has (\w+), as (?:Answer ([12])|neither answer) says\.")
_FORM = re.compile(
    r"Answer 1 says \w+\. Answer 2 says \w+\. The image has \w+, as (?:Answer [12]|neither answer) says\. "
    r"Overall Judgment: Answer [12] is better\."
)


def grade(critique: str, fields: dict[str, str], attribute: str) -> dict[str, int]:
    """The four aspects' points of a shapes-world critique (`SimulatedEvaluator`)."""
    from carevl.prompts import parse_verdict

    def value(text: str | None) -> str | None:
        return None if text is None else shapes.mentioned_value(text, attribute)

    answers = {k: value(fields.get(f"Answer {k}")) for k in ("1", "2")}
    quoted = {k: value(v) for k, v in _QUOTE.findall(critique)}
    recall = _RECALL.search(critique)
    had, named = (value(recall.group(1)), recall.group(2)) if recall else (None, None)
    verdict = parse_verdict(critique)
    reference = parse_verdict(f"Overall Judgment: {fields['Reference decision']}")
    stated = value(fields.get("Image description", ""))
    agreement = 0 if had is None else 5 if stated is None else 10 * (had == stated)
    points = (
        12 * (quoted.get("1") == answers["1"]) + 13 * (quoted.get("2") == answers["2"]),
        15 * (verdict == reference) + agreement,
        15 * (had is not None and (quoted.get(named) == had if named else had not in quoted.values()))
        + 10 * (verdict is not None and str(verdict) == named),
        25 if _FORM.fullmatch(critique) else 5,
    )
    return dict(zip(SCORE_ASPECTS, points))
