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
from carevl.losses import response_token_logprobs


def judge_item(sample: dict, responses: list[str]) -> shapes.JudgeItem:
    """The shard sample as a world item, its answers rewritten as `responses`."""
    scene, attribute = shapes.scene_of(sample["meta"]["scene"]), sample["meta"]["attribute"]
    values = tuple(shapes.mentioned_value(text, attribute) for text in sample["responses"])
    return shapes.JudgeItem(sample["id"], scene, attribute, sample["question"], tuple(responses), values, sample["label"], sample["image"])


@torch.no_grad()
def prefers_right(judge: HFChat, item: shapes.JudgeItem) -> bool:
    """Whether the judge gives the right critique a higher log-probability than the same critique
    naming the other answer (`shapes.worse_critiques`' first flaw)."""
    chat = Chat.user(prompts.judge_prompt(item.question, item.responses), item.image)
    targets = [item.critique(), shapes.worse_critiques(item)[0]]
    scores = []
    for inputs in judge.encoder.encode_many(load_image(item.image), chat.messages, targets):
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "prompt_length")}
        hidden = judge.model.model(**model_inputs, use_cache=False).last_hidden_state
        logps, _ = response_token_logprobs(hidden, inputs["labels"], judge.model.lm_head)
        scores.append(logps.sum().item())
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
            item = judge_item(sample, sample["responses"])
            responses = [shapes.answer(item.attribute, value, rng.choice(shapes.ANSWER_STYLES) if style == "mixed" else style) for value in item.values]
            right += prefers_right(judge, judge_item(sample, responses))
        results[style] = right / len(samples)
        print(f"{style:>8}: right answer named in {right}/{len(samples)} ({100 * right / len(samples):.1f}%)", flush=True)
    print(json.dumps({"model": args.model, "samples": len(samples), "prefers_right": results}))


if __name__ == "__main__":
    main()
