"""The pairwise judge prompt and its verdict parser.

Training targets and evaluation both render prompts from this module, so a judge is always
asked the same way it was trained. The verdict line follows VL-RewardBench:
``Overall Judgment: Answer X is better.``
"""

from __future__ import annotations

import re

JUDGE_TEMPLATE = (
    "Which answer to the question about the image is better?\n"
    "Question: {question}\n"
    "Answer 1: {answer1}\n"
    "Answer 2: {answer2}\n"
    "Say what the image shows, check each answer against it, and end with "
    '"Overall Judgment: Answer X is better." where X is 1 or 2.'
)

# The official VL-RewardBench pattern, applied after removing newlines and '*'. The greedy '.*'
# makes the last "Answer N is better" after the first "Overall Judgment"/"Therefore" win.
_VERDICT = re.compile(
    r"(?:Overall Judgment|Therefore)\s*.*\s*-*\s*Answer\s*(\d+)\s*is\s*(?:the\s*)?(?:slightly\s*)?better",
    re.IGNORECASE,
)


def judge_prompt(question: str, responses: list[str] | tuple[str, str]) -> str:
    """The text of the judge's user turn (the image is passed beside it as a chat part)."""
    if len(responses) != 2:
        raise ValueError(f"a judge prompt needs exactly two responses, got {len(responses)}")
    return JUDGE_TEMPLATE.format(question=question.strip(), answer1=responses[0].strip(), answer2=responses[1].strip())


def user_turn(text: str, with_image: bool = True) -> list[dict]:
    """Chat messages of one user turn: the image part first, then the text."""
    content = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def verdict_line(label: int) -> str:
    if label not in (1, 2):
        raise ValueError(f"label must be 1 or 2, got {label!r}")
    return f"Overall Judgment: Answer {label} is better."


def parse_verdict(text: object) -> int | None:
    """1 or 2 for a judge output in the VL-RewardBench format, None when unparseable. Never raises."""
    if not isinstance(text, str):
        return None
    match = _VERDICT.search(text.replace("\n", " ").replace("*", ""))
    if match is None:
        return None
    choice = int(match.group(1)) if match.group(1).isdigit() and len(match.group(1)) < 4 else None
    return choice if choice in (1, 2) else None
