"""carevl's data in a peer system's format, for the comparisons tests and benchmarks make against it:
TRL's DPOTrainer (the DPO loss, and the speed of a DPO epoch)."""

from __future__ import annotations

from carevl.images import load_image
from carevl.prompts import judge_prompt, user_turn


def trl_pair(image: bytes, question: str, responses: list[str], chosen: str, rejected: str) -> dict:
    """One (chosen, rejected) critique pair in TRL's conversational vision format, asked with
    carevl's judge prompt."""

    def assistant(text: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    return {
        "images": [load_image(image)],
        "prompt": user_turn(judge_prompt(question, responses)),
        "chosen": assistant(chosen),
        "rejected": assistant(rejected),
    }
