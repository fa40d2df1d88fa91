"""Critique generation through vLLM against Hugging Face transformers: the same judge, the same
judge prompts (`carevl.prompts.judge_prompt`, as curation II's critique sampling asks them), greedy.

Prints each engine's seconds for the whole set (vLLM's engine start apart), the ratio, and how
many verdicts (`carevl.prompts.parse_verdict`) and whole critiques come out the same. Runs in
vLLM's environment (`bash tools/setup_vllm_env.sh`), which holds transformers too:

    .venv-vllm/bin/python -m tools.bench.generation --model runs/demo/sft --items 200

`--model` is a judge checkpoint (the demo's SFT judge after `bash tools/demo.sh`); without it a tiny
random Qwen2-VL is built here, whose critiques are noise but still must match token for token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from carevl.backends.interface import Chat, Sampling
from carevl.prompts import judge_prompt, parse_verdict
from carevl.standins.shapes import judge_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a judge checkpoint; default: a tiny random Qwen2-VL built here")
    parser.add_argument("--items", type=int, default=200, help="shapes-world judge items (pairs)")
    parser.add_argument("--max-tokens", type=int, default=160, help="critique budget (the demo's critiques: ~80)")
    parser.add_argument("--seed", type=int, default=11, help="which items (not a sampling seed: decoding is greedy)")
    args = parser.parse_args()

    from carevl.backends.hf import HFChat
    from carevl.backends.vllm import VLLMChat

    if args.model is None:
        from carevl.standins.tiny import build_tiny_model

        args.model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "judge", hidden=128, layers=2))
    items = judge_items(args.items, seed=args.seed)
    chats = [Chat.user(judge_prompt(item.question, item.responses), item.image) for item in items]
    greedy = Sampling(temperature=0.0, max_tokens=args.max_tokens)

    start = time.perf_counter()
    hf = HFChat(args.model).generate(chats, greedy)
    hf_seconds = time.perf_counter() - start

    start = time.perf_counter()
    engine = VLLMChat(args.model, dtype="float32", max_model_len=2048)
    engine_start = time.perf_counter() - start
    start = time.perf_counter()
    vllm = engine.generate(chats, greedy)
    vllm_seconds = time.perf_counter() - start
    engine.close()

    failed = [r.error for r in hf + vllm if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} generations failed, e.g. {failed[0]}")
    texts = [(a.texts[0], b.texts[0]) for a, b in zip(hf, vllm)]
    verdicts = [(parse_verdict(a), parse_verdict(b)) for a, b in texts]
    right = [item.label for item in items]
    print(f"{len(chats)} judge prompts, greedy, up to {args.max_tokens} tokens, {args.model}")
    print(f"transformers generate   {hf_seconds:8.2f} s")
    print(f"vLLM                    {vllm_seconds:8.2f} s   (+ {engine_start:.1f} s starting the engine)")
    print(
        f"vLLM vs transformers: {hf_seconds / vllm_seconds:.2f}x faster, the engine start counted: "
        f"{hf_seconds / (vllm_seconds + engine_start):.2f}x"
    )
    print(
        f"same verdict {sum(a == b for a, b in verdicts)}/{len(verdicts)}, "
        f"same critique {sum(a == b for a, b in texts)}/{len(texts)}"
    )
    for name, column in (("transformers", 0), ("vLLM", 1)):
        parsed = [v[column] for v in verdicts]
        correct = sum(v == label for v, label in zip(parsed, right))
        print(f"{name:12s} verdict accuracy {correct / len(right):.1%}, unparseable {parsed.count(None)}")


if __name__ == "__main__":
    main()
