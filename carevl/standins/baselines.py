"""carevl's data in a peer system's format, for the comparisons tests and benchmarks make against it:
TRL's DPOTrainer (the DPO loss, and the speed of a DPO epoch) and SFTTrainer (the speed of an SFT
epoch)."""

from __future__ import annotations

from carevl.images import load_image
from carevl.prompts import judge_prompt, user_turn


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def trl_pair(image: bytes, question: str, responses: list[str], chosen: str, rejected: str) -> dict:
    """One (chosen, rejected) critique pair in TRL's conversational vision format, asked with
    carevl's judge prompt."""
    return {
        "images": [load_image(image)],
        "prompt": user_turn(judge_prompt(question, responses)),
        "chosen": _assistant(chosen),
        "rejected": _assistant(rejected),
    }


def trl_completion(image: bytes, question: str, responses: list[str], critique: str) -> dict:
    """One judge sample as TRL's SFTTrainer reads a conversational prompt-completion row with an
    image: carevl's judge prompt, the critique as the completion (the only tokens with a loss)."""
    return {
        "images": [load_image(image)],
        "prompt": user_turn(judge_prompt(question, responses)),
        "completion": _assistant(critique),
    }
