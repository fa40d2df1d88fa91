import pytest

from carevl.prompts import (
    judge_prompt,
    pair_prompt,
    pair_verdict_line,
    parse_pair_verdict,
    parse_verdict,
    user_turn,
    verdict_line,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Overall Judgment: Answer 1 is better.", 1),
        ("blah\n\n**Overall Judgment**: Answer 2 is better.", 2),
        ("Therefore, Answer 2 is better.", 2),
        ("Therefore Answer 1 is the better one... Overall Judgment: Answer 2 is slightly better", 2),
        ("overall judgment - answer 1 is the better", 1),
        ("Answer 1 is better.", None),  # no "Overall Judgment"/"Therefore" lead-in
        ("Overall Judgment: Answer 3 is better.", None),
        ("Overall Judgment: both answers are equally good.", None),
        ("", None),
        (None, None),
        (12, None),
        ("Overall Judgment: Answer 99999999999999999999 is better.", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_verdict_line_round_trips():
    for label in (1, 2):
        assert parse_verdict("The image shows a cat. " + verdict_line(label)) == label
    with pytest.raises(ValueError):
        verdict_line(3)


def test_judge_prompt_holds_question_and_answers():
    text = judge_prompt(" What is it? ", ["A cat.", "A dog."])
    assert "Question: What is it?\n" in text and "Answer 1: A cat.\n" in text and "Answer 2: A dog.\n" in text
    assert "Overall Judgment: Answer X is better." in text
    with pytest.raises(ValueError):
        judge_prompt("q", ["only one"])
    assert user_turn("hi")[0]["content"][0] == {"type": "image"}


@pytest.mark.parametrize(
    "text, expected",
    [
        # Realistic judge outputs in the VL-RewardBench format.
        ("Answer 1 misreads the chart.\n\n**Overall Judgment:** **Answer 2** is better.", 2),
        ("Both are close. Answer 1 is better at grammar, but\nTherefore, Answer 2 is better.", 2),
        ("Answer 2 is better on detail. Overall Judgment: Answer 1 is better.", 1),
        ('{"analysis": "A1 invents a dog.", "judgment": "Overall Judgment: Answer 2 is better."}', 2),
        ("Overall Judgment: Answer 1 is better. On reflection, Answer 2 is better.", 2),  # greedy: last mention
        ("Overall Judgment: Both answers are equally good; it is a tie.", None),
        ("Overall Judgment: neither answer is better.", None),
        ("I cannot judge this image.", None),
    ],
)
def test_parse_verdict_on_realistic_outputs(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"Analysis": "A names the right colour.", "Judgement": "[[A]]"}', 1),
        ('```json\n{"analysis": "B is precise [[A]] is not", "judgement": "[[B]]"}\n```', 2),
        ("Both are equally vague. [[C]]", "tie"),
        ("A is wrong ([[A]] rejected); final: [[ B ]]", 2),
        ('{"Analysis": "no decision", "Judgement": "undecided"}', None),
        ("Answer A is better.", None),
        ("[[D]]", None),
        ("{broken json [[A]]", 1),
        ("A names the colour. Overall Judgment: Answer 2 is better.", 2),  # carevl's own verdict line
        ("Overall Judgment: Answer 2 is better. [[A]]", 1),  # the benchmark's format first
        (None, None),
    ],
)
def test_parse_pair_verdict(text, expected):
    assert parse_pair_verdict(text) == expected


def test_pair_prompt_and_verdict_lines():
    text = pair_prompt("Q?", ["first", "second"])
    assert "Answer A: first\n" in text and "Answer B: second\n" in text and "[[C]]" in text
    for label in (1, 2, "tie"):
        assert parse_pair_verdict(pair_verdict_line(label)) == label


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"explanation": "Answer 2 names the colour.", "verdict": 2}', (2, "Answer 2 names the colour.")),
        ('{"explanation": "x", "verdict": "Answer 1"}', (1, "x")),
        ('{"explanation": "", "verdict": 1}', (1, None)),
        ('{"explanation": "x", "verdict": 3}', (None, "x")),
        ("The first is right.\nOverall Judgment: Answer 1 is better.", (1, "The first is right.")),
        ("The second is right. **Overall Judgment**: Answer 2 is better.", (2, "The second is right.")),
        ("no verdict here", (None, "no verdict here")),
        ('{"explanation": "cut', (None, '{"explanation": "cut')),
        (None, (None, None)),
    ],
)
def test_parse_judgment(text, expected):
    from carevl.prompts import parse_judgment

    assert parse_judgment(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Relevance 20. Accuracy 25. Reasoning 20. Clarity 15.\nScore: 80", 80.0),
        ("**Score:** 72.5", 72.5),
        ("score = 0", 0.0),
        ("Score: 100", 100.0),
        ("Score: 40 for relevance... final Score: 65", 65.0),
        ("Score: 101", None),
        ("Score: -5", None),
        ("Total: 80", None),
        (None, None),
    ],
)
def test_parse_score_is_range_checked(text, expected):
    from carevl.prompts import parse_score

    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"relevance": 20, "factual_accuracy": 25, "logical_reasoning": 0, "clarity": 15}', 60),
        ('{"relevance": 20, "factual_accuracy": 26, "logical_reasoning": 0, "clarity": 15}', None),
        ('{"relevance": 20, "factual_accuracy": 25, "logical_reasoning": 0}', None),
        ('{"relevance": 20, "factual_accuracy": 25, "logical_reasoning": 0, "clarity": 15, "total": 60}', None),
        ('{"relevance": 20.5, "factual_accuracy": 25, "logical_reasoning": 0, "clarity": 15}', None),
        ('{"relevance": true, "factual_accuracy": 25, "logical_reasoning": 0, "clarity": 15}', None),
        ('{"relevance": 20, "factual_accuracy": 25, "logical_reasoning": 0, "clarity": 1', None),
        ("Score: 80", None),
        (None, None),
    ],
)
def test_structured_scores_need_all_four_aspects_in_range(text, expected):
    from carevl.prompts import parse_aspect_scores

    aspects = parse_aspect_scores(text)
    assert (None if aspects is None else sum(aspects.values())) == expected


def test_the_structured_evaluator_prompt_differs_only_in_how_it_asks_for_the_score():
    from carevl.prompts import FREE_TEXT_SCORE, STRUCTURED_SCORE, evaluator_prompt

    free = evaluator_prompt("q?", "a cat", ["A", "B"], 2, "B is right.")
    structured = evaluator_prompt("q?", "a cat", ["A", "B"], 2, "B is right.", structured=True)
    assert free.endswith(FREE_TEXT_SCORE) and structured.endswith(STRUCTURED_SCORE)
    assert free.removesuffix(FREE_TEXT_SCORE) == structured.removesuffix(STRUCTURED_SCORE)
    assert "Reference decision: Answer 2 is better." in structured
