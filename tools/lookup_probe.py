"""Probe a shapes-world judge's decisive step: which answer does it name once caption and quotes are right?

For each held-out judge sample, the judge scores two whole critiques that share the true caption and
both quotes and differ only in the answer named after "The image has <value>, as Answer" and in the
verdict. The probe counts how often the right one has the higher log-probability, with the prompt's
answers rewritten in each answer style of the world. A judge that finds the answer by matching its
own quotes scores the same in every style; one that finds it by where the value stands in a
sentence-style prompt drops to chance on the other styles.

    python tools/lookup_probe.py --model runs/demo/sft --shards runs/demo/world/heldout
"""

import argparse
import glob
import json
import random

import torch
import webdataset as wds

from carevl import prompts, shapes
from carevl.backends.hf import HFChat
from carevl.inference import Chat, load_image


def critiques(scene: shapes.Scene, attribute: str, values: list[str], label: int) -> tuple[str, str]:
    """The right critique and the one naming the other answer (with the matching verdict)."""
    caption = f"The image shows {scene.caption()}."
    right = shapes.recall_critique(values, scene.value(attribute), "image")
    wrong = right.replace(f"as Answer {label} says", f"as Answer {3 - label} says")
    return f"{caption} {right} {prompts.verdict_line(label)}", f"{caption} {wrong} {prompts.verdict_line(3 - label)}"


@torch.no_grad()
def prefers_right(judge: HFChat, image: bytes, question: str, responses: list[str], targets: tuple[str, str]) -> bool:
    chat = Chat.user(prompts.judge_prompt(question, responses), image)
    scores = []
    for inputs in judge.encoder.encode_many(load_image(image), chat.messages, list(targets)):
        labels = inputs.pop("labels")[0]
        inputs.pop("prompt_length")
        logits = judge.model(**inputs).logits[0, :-1]
        keep = labels[1:] != -100
        scores.append(torch.log_softmax(logits[keep], -1).gather(1, labels[1:][keep, None]).sum().item())
    return scores[0] > scores[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="judge checkpoint (Hugging Face directory)")
    parser.add_argument("--shards", required=True, help="shapes-world judge shards (meta holds scene and attribute)")
    parser.add_argument("--n", type=int, default=100, help="samples to probe")
    args = parser.parse_args()
    samples = [json.loads(s["json"]) | {"image": s["png"]} for s in wds.WebDataset(sorted(glob.glob(f"{args.shards}/*.tar")), shardshuffle=False)][: args.n]
    judge = HFChat(args.model)
    results = {}
    for style in (*shapes.ANSWER_STYLES, "mixed"):
        rng, right = random.Random(0), 0
        for sample in samples:
            scene, attribute = shapes.scene_of(sample["meta"]["scene"]), sample["meta"]["attribute"]
            values = [shapes.mentioned_value(text, attribute) for text in sample["responses"]]
            responses = [shapes.answer(attribute, value, rng.choice(shapes.ANSWER_STYLES) if style == "mixed" else style) for value in values]
            right += prefers_right(judge, sample["image"], sample["question"], responses, critiques(scene, attribute, values, sample["label"]))
        results[style] = right / len(samples)
        print(f"{style:>8}: right answer named in {right}/{len(samples)} ({100 * right / len(samples):.1f}%)", flush=True)
    print(json.dumps({"model": args.model, "samples": len(samples), "prefers_right": results}))


if __name__ == "__main__":
    main()
