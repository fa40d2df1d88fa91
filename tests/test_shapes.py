"""The shapes world's base-model pretraining mixture and answer styles."""

import json
import random
from collections import Counter

import pytest

from carevl.schema import read_shard_samples
from carevl.standins import shapes
from carevl.standins.world import write_world


@pytest.mark.parametrize("attribute", shapes.ATTRIBUTES)
def test_every_answer_style_states_its_value(attribute):
    for value in shapes.attribute_values(attribute):
        for style in shapes.ANSWER_STYLES:
            assert shapes.mentioned_value(shapes.answer(attribute, value, style), attribute) == value
    with pytest.raises(ValueError, match="style must be one of"):
        shapes.answer(attribute, value, "shouting")


def test_quoting_tasks_name_the_answer_that_gives_the_value():
    rng = random.Random(3)
    for _ in range(200):
        prompt, target = shapes.quote_task(rng)
        lines = dict(line.split(": ", 1) for line in prompt.splitlines()[:2])
        asked = prompt.rsplit("says ", 1)[1].rstrip("?")
        attribute = next(a for a in shapes.ATTRIBUTES if asked in shapes.attribute_values(a))
        values = [shapes.mentioned_value(lines[f"Answer {n}"], attribute) for n in (1, 2)]
        assert target.endswith(f"The reference has {asked}, as Answer {values.index(asked) + 1} says.")
        assert [lines[f"Answer {n}"] for n in (1, 2)] == [shapes.answer(attribute, value) for value in values]


def test_pretraining_mixes_captions_answered_questions_and_quoting(tmp_path):
    counts = write_world(str(tmp_path), train=0, heldout=2, captions=20, shard_size=100)
    assert counts["pretrain"] == 60
    kinds = Counter()
    for sample in read_shard_samples(tmp_path / "pretrain", "instruct"):
        scene = shapes.scene_of(sample.meta["scene"])
        if sample.prompt == shapes.CAPTION_PROMPT:
            assert sample.target == shapes.caption_target(scene)
            kinds["caption"] += 1
        elif sample.prompt in shapes.QUESTIONS.values():
            attribute = next(a for a, q in shapes.QUESTIONS.items() if q == sample.prompt)
            assert attribute in shapes.JUDGE_ATTRIBUTES
            assert sample.target == shapes.answer(attribute, scene.value(attribute))
            kinds["question"] += 1
        else:
            assert "Which answer says" in sample.prompt
            kinds["quote"] += 1
    assert kinds == {"caption": 20, "question": 20, "quote": 20}


def test_a_share_of_pretraining_questions_is_read_with_two_answers_in_view(tmp_path):
    counts = write_world(str(tmp_path), train=0, heldout=2, captions=60, quotes=0, shard_size=500, answers_in_view=0.5)
    assert counts["pretrain"] == 120
    kinds = Counter()
    for sample in read_shard_samples(tmp_path / "pretrain", "instruct"):
        if not sample.prompt.endswith(shapes.READING_PROMPT):
            kinds["other"] += 1
            continue
        question, *answers, _ = sample.prompt.splitlines()
        attribute = shapes.attribute_of(question)
        assert attribute in shapes.JUDGE_ATTRIBUTES and len(answers) == 2
        values = [shapes.mentioned_value(line.split(": ", 1)[1], attribute) for line in answers]
        assert values[0] != values[1] and None not in values
        truth = shapes.scene_of(sample.meta["scene"]).value(attribute)
        assert sample.target == f"The image has {truth}."
        kinds["reading"] += 1
        kinds["answer shows the image"] += truth in values
    # about half of the 60 questions, and the answers in view do not give the image away
    assert 20 <= kinds["reading"] <= 40 and kinds["other"] == 120 - kinds["reading"]
    assert 0 < kinds["answer shows the image"] < kinds["reading"]


def test_held_out_quoting_tasks_are_written_apart_and_only_when_asked(tmp_path):
    assert write_world(str(tmp_path / "none"), train=0, heldout=2, captions=4)["quotes-check"] == 0
    assert not (tmp_path / "none" / "quotes-check").exists()
    counts = write_world(str(tmp_path / "some"), train=0, heldout=2, captions=4, quote_checks=7)
    assert counts["quotes-check"] == 7
    manifest = json.loads((tmp_path / "some" / "quotes-check" / "manifest.json").read_text())
    assert (manifest["kind"], manifest["samples"]) == ("instruct", 7)
    samples = list(read_shard_samples(tmp_path / "some" / "quotes-check", "instruct"))
    assert len(samples) == 7
    for sample in samples:
        asked = sample.prompt.rsplit("Which answer says ", 1)[1].rstrip("?")
        lines = dict(line.split(": ", 1) for line in sample.prompt.splitlines()[:2])
        number = next(n for n in (1, 2) if lines[f"Answer {n}"].rstrip(".").endswith(asked))
        assert sample.target.endswith(f"The reference has {asked}, as Answer {number} says.")


def test_reading_checks_ask_each_attribute_of_fresh_images_with_answers_in_view(tmp_path):
    assert write_world(str(tmp_path / "none"), train=0, heldout=2, captions=4)["reading-check"] == 0
    assert not (tmp_path / "none" / "reading-check").exists()
    counts = write_world(str(tmp_path / "some"), train=0, heldout=2, captions=4, reading_checks=12)
    assert counts["reading-check"] == 12 * len(shapes.JUDGE_ATTRIBUTES)
    assert sorted(p.name for p in (tmp_path / "some" / "reading-check").iterdir()) == sorted(shapes.JUDGE_ATTRIBUTES)
    images = set()
    for attribute in shapes.JUDGE_ATTRIBUTES:
        samples = list(read_shard_samples(tmp_path / "some" / "reading-check" / attribute, "instruct"))
        assert len(samples) == 12
        shown_truth = 0
        for sample in samples:
            question, *answers, reading = sample.prompt.splitlines()
            assert reading == shapes.READING_PROMPT and shapes.attribute_of(question) == attribute
            truth = shapes.scene_of(sample.meta["scene"]).value(attribute)
            assert sample.target == f"The image has {truth}."
            values = [shapes.mentioned_value(line.split(": ", 1)[1], attribute) for line in answers]
            shown_truth += truth in values
            images.add(sample.image)
        assert shown_truth < 12  # the answers in view do not give the image away
    assert len(images) == 12 * len(shapes.JUDGE_ATTRIBUTES)  # a fresh image per task
    pretrain = {s.image for s in read_shard_samples(tmp_path / "some" / "pretrain", "instruct")}
    assert not images & pretrain


def test_items_have_as_many_distinct_worse_critiques_as_asked_or_a_clear_error():
    """The DPO speed benchmark's pairs count (groups x rejected) is what it trains on: every group
    gets `rejected` distinct critiques other than the chosen one."""

    for item in shapes.judge_items(
        24, seed=0
    ):  # "count" and "shape" items have too few values for nine misreadings alone
        worse = shapes.distinct_worse_critiques(item, 9)
        assert len(worse) == len(set(worse)) == 9
        assert item.critique() not in worse
    with pytest.raises(ValueError, match="distinct worse critiques"):
        shapes.distinct_worse_critiques(shapes.judge_items(1, seed=0)[0], 40)
