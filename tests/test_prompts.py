import pytest

from carevl.prompts import judge_prompt, parse_verdict, user_turn, verdict_line


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
