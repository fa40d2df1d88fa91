"""The judge prompts and their verdict parsers.

Training targets and evaluation both render prompts from this module, so a judge is always
asked the same way it was trained. The pairwise verdict line follows VL-RewardBench:
``Overall Judgment: Answer X is better.``; the tie-capable MLLM-as-a-Judge prompt asks for
``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie). Parsers return 1, 2, "tie" or None and never raise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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


# VL-RewardBench's own judge prompt, as its evaluation script sends it (leading space, blank lines
# and all): the protocol of the paper's Table 1 baselines. The same verdict line and parser as
# carevl's, with a different request around them.
VLRB_OFFICIAL_TEMPLATE = (
    " You are a highly capable multimodal AI assistant tasked with evaluating answers to visual questions. "
    "Please analyze the following image and question, then determine which of the two provided answers is better.\n"
    "\n"
    "Question: {question}\n"
    "\n"
    "Answer 1: {answer1}\n"
    "\n"
    "Answer 2: {answer2}\n"
    "\n"
    "Please evaluate both answers based on the following criteria:\n"
    "1. Accuracy: How well does the answer align with the visual information in the image?\n"
    "2. Completeness: Does the answer fully address all aspects of the question?\n"
    "3. Clarity: Is the answer easy to understand and well-articulated?\n"
    "4. Relevance: Does the answer directly relate to the question and the image?\n"
    "\n"
    "After your evaluation, please:\n"
    "1. Explain your reasoning for each criterion.\n"
    "2. Provide an overall judgment on which answer is better (Answer 1 or Answer 2). "
    "For example: Overall Judgment: Answer X is better.\n"
    "\n"
    "Your response should be structured and detailed, demonstrating your understanding of both the visual "
    "and textual elements of the task."
)


def vlrb_official_prompt(question: str, responses: list[str] | tuple[str, str]) -> str:
    """VL-RewardBench's own request (fields inserted as they are, as its script does)."""
    if len(responses) != 2:
        raise ValueError(f"a judge prompt needs exactly two responses, got {len(responses)}")
    return VLRB_OFFICIAL_TEMPLATE.format(question=question, answer1=responses[0], answer2=responses[1])


# A checkpoint carevl trained holds this file: evaluation then asks it in the prompt it learned.
TRAINED_PROMPT_FILE = "carevl_prompt.json"


def write_trained_prompt(checkpoint_dir: str | Path) -> None:
    """Mark an exported checkpoint as a carevl judge (trained on `JUDGE_TEMPLATE`'s verdict line)."""
    card = {"prompt": "carevl", "template": JUDGE_TEMPLATE}
    (Path(checkpoint_dir) / TRAINED_PROMPT_FILE).write_text(json.dumps(card, indent=1) + "\n")


def trained_prompt(checkpoint: str | Path | None) -> str | None:
    """The prompt a checkpoint was trained on ("carevl"), or None (a base or foreign model, a hub name)."""
    if checkpoint is None:
        return None
    card = Path(checkpoint) / TRAINED_PROMPT_FILE
    if not card.is_file():
        return None
    return json.loads(card.read_text()).get("prompt")


PAIR_TEMPLATE = (
    "Compare two answers to the question about the image and decide which is better, or whether "
    "they are equally good.\n"
    "Question: {question}\n"
    "Answer A: {answer1}\n"
    "Answer B: {answer2}\n"
    "Weigh how well each answer follows the question, how accurate it is about the image, and how "
    'helpful it is. Reply as JSON with an "Analysis" and a "Judgement", the judgement being '
    "[[A]] if A is better, [[B]] if B is better, or [[C]] for a tie."
)
_PAIR_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_PAIR_CHOICES = {"A": 1, "B": 2, "C": "tie"}


def pair_prompt(question: str, responses: list[str] | tuple[str, str]) -> str:
    """The user turn of the MLLM-as-a-Judge pair comparison (tie allowed)."""
    if len(responses) != 2:
        raise ValueError(f"a pair prompt needs exactly two responses, got {len(responses)}")
    return PAIR_TEMPLATE.format(question=question.strip(), answer1=responses[0].strip(), answer2=responses[1].strip())


def pair_verdict_line(label: int | str) -> str:
    letters = {1: "A", 2: "B", "tie": "C"}
    if label not in letters:
        raise ValueError(f"label must be 1, 2 or 'tie', got {label!r}")
    return f'{{"Judgement": "[[{letters[label]}]]"}}'


def parse_pair_verdict(text: object) -> int | str | None:
    """1, 2 or "tie" for an output holding [[A]], [[B]] or [[C]]; None when unparseable. Never raises.

    A JSON object's "Judgement" (any case) is read first; otherwise the last bracketed letter of the
    text wins, as the decision comes after the analysis. Without a bracketed letter, carevl's own
    verdict line ("Overall Judgment: Answer 1 is better.", `parse_verdict`) is read: a judge trained
    on it answers in it whatever format the prompt asks for, and it names a choice as plainly.
    """
    if not isinstance(text, str):
        return None
    judgement = _json_judgement(text)
    for candidate in (judgement, text):
        if candidate:
            found = _PAIR_VERDICT.findall(candidate)
            if found:
                return _PAIR_CHOICES[found[-1]]
    return parse_verdict(text)


def _json_judgement(text: str) -> str | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        record = json.loads(text[start : end + 1])
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    for key, value in record.items():
        if str(key).lower() in ("judgement", "judgment") and isinstance(value, str):
            return value
    return None


# -- curation (paper §3.1-3.3) ---------------------------------------------------------------------

CAPTION_REQUEST = (
    "Describe the image in detail: every object with its colour, shape, count and position, any "
    "text in it, and the scene as a whole. Describe only what is visible."
)

CURATION_JUDGE_TEMPLATE = (
    "You are judging two answers to a question about the image.\n"
    "Question: {question}\n"
    "Answer 1: {answer1}\n"
    "Answer 2: {answer2}\n"
    "Check each answer against the image: is it correct, complete and relevant to the question? "
    "Explain your reasoning step by step, then give the number of the better answer."
)
# Structured output for the curation judge: the explanation becomes the SFT target.
JUDGMENT_SCHEMA = {
    "type": "object",
    "properties": {"explanation": {"type": "string"}, "verdict": {"type": "integer", "enum": [1, 2]}},
    "required": ["explanation", "verdict"],
    "additionalProperties": False,
}

# What a text-only expert reward model sees in its user turn; the answer is the assistant turn.
EXPERT_TEMPLATE = "{question}\n\nImage description: {caption}"


# For a judge without structured output (GPT-4o 2024-05-13): the verdict comes as the last line.
FREE_TEXT_VERDICT = (
    '\nEnd with one line: "Overall Judgment: Answer 1 is better." or "Overall Judgment: Answer 2 is better."'
)


def curation_judge_prompt(question: str, responses: list[str] | tuple[str, str], structured: bool = True) -> str:
    """The curation judge's prompt; without `structured` output it asks for the verdict line, which
    `parse_judgment` reads."""
    if len(responses) != 2:
        raise ValueError(f"a judge prompt needs exactly two responses, got {len(responses)}")
    prompt = CURATION_JUDGE_TEMPLATE.format(
        question=question.strip(), answer1=responses[0].strip(), answer2=responses[1].strip()
    )
    return prompt if structured else prompt + FREE_TEXT_VERDICT


def expert_conversation(question: str, caption: str, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": EXPERT_TEMPLATE.format(question=question.strip(), caption=caption.strip())},
        {"role": "assistant", "content": answer},
    ]


def parse_judgment(text: object) -> tuple[int | None, str | None]:
    """(verdict, explanation) of a curation judge's reply: structured JSON {"explanation", "verdict"},
    or free text ending in the verdict line (the line is cut from the explanation). Never raises."""
    if not isinstance(text, str):
        return None, None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if isinstance(record, dict):
        verdict = record.get("verdict")
        explanation = record.get("explanation")
        verdict = (
            verdict
            if verdict in (1, 2)
            else parse_verdict(f"Overall Judgment: Answer {verdict} is better")
            if isinstance(verdict, str)
            else None
        )
        return verdict, explanation.strip() if isinstance(explanation, str) and explanation.strip() else None
    verdict = parse_verdict(text)
    cut = re.split(r"(?:\*\*)?Overall Judgment", text, flags=re.IGNORECASE)[0].strip()
    return verdict, cut or None


# -- critique scoring (paper §3.5) -------------------------------------------------------------------

EVALUATOR_TEMPLATE = """You grade a critique written by a judge model. The judge saw an image, a question and two answers, and had to decide which answer is better. You cannot see the image; a detailed description stands in for it.

Image description: {caption}
Question: {question}
Answer 1: {answer1}
Answer 2: {answer2}
Reference decision: Answer {label} is better.

Critique to grade:
{critique}

Grade the critique on four aspects, each worth 25 points:
1. Relevance: does it address the question and what the image shows? (0-5 off topic; 6-10 mostly generic; 11-15 partly on point; 16-20 on point with gaps; 21-25 fully on point)
2. Factual accuracy: are its claims about the image and the answers true? (0-5 mostly false; 6-10 several errors; 11-15 one clear error; 16-20 minor slips; 21-25 no errors)
3. Logical reasoning: does its conclusion follow from its analysis, and does it reach the reference decision? (0-5 no reasoning or the wrong decision for no reason; 6-10 weak; 11-15 sound in parts; 16-20 sound with small gaps; 21-25 rigorous)
4. Clarity: is it concise, well organised and easy to follow? (0-5 confusing; 6-10 hard to follow; 11-15 adequate; 16-20 clear; 21-25 exemplary)

"""
# How the evaluator replies: free text ending in the total (the paper's way), or, with structured
# output, JSON holding each aspect's points (the total is their sum: no reply without a score).
FREE_TEXT_SCORE = (
    'Explain each aspect\'s points in one sentence, then end with the total on its own line as "Score: <points>", '
    "a number from 0 to 100."
)
STRUCTURED_SCORE = (
    'Reply as JSON with each aspect\'s points: {"relevance": <0-25>, "factual_accuracy": <0-25>, '
    '"logical_reasoning": <0-25>, "clarity": <0-25>}.'
)
SCORE_ASPECTS = ("relevance", "factual_accuracy", "logical_reasoning", "clarity")
SCORE_SCHEMA = {
    "type": "object",
    "properties": {aspect: {"type": "integer", "minimum": 0, "maximum": 25} for aspect in SCORE_ASPECTS},
    "required": list(SCORE_ASPECTS),
    "additionalProperties": False,
}

_SCORE = re.compile(r"Score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def evaluator_prompt(
    question: str,
    caption: str,
    responses: list[str] | tuple[str, str],
    label: int,
    critique: str,
    structured: bool = False,
) -> str:
    """The evaluator's prompt; `structured` asks for the aspects as JSON (`SCORE_SCHEMA`) instead of
    the "Score:" line."""
    return EVALUATOR_TEMPLATE.format(
        caption=caption.strip(),
        question=question.strip(),
        answer1=responses[0].strip(),
        answer2=responses[1].strip(),
        label=label,
        critique=critique.strip(),
    ) + (STRUCTURED_SCORE if structured else FREE_TEXT_SCORE)


def parse_score(text: object) -> float | None:
    """The last "Score: N" of an evaluator's reply when 0 <= N <= 100; None otherwise. Never raises."""
    if not isinstance(text, str):
        return None
    found = _SCORE.findall(text.replace("*", ""))
    if not found:
        return None
    value = float(found[-1])
    return value if 0 <= value <= 100 else None


def parse_aspect_scores(text: object) -> dict[str, int] | None:
    """The four aspects' points of a structured evaluator reply (`SCORE_SCHEMA`), each an integer
    from 0 to 25; None for anything else. Never raises."""
    try:
        record = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(record, dict) or set(record) != set(SCORE_ASPECTS):
        return None
    points = {aspect: record[aspect] for aspect in SCORE_ASPECTS}
    if not all(type(value) is int and 0 <= value <= 25 for value in points.values()):
        return None
    return points
