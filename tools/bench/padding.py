"""How much of an SFT batch is padding, shuffled and grouped by length, and what that costs a step.

Judge samples are built from a VL-RewardBench JSONL: its real questions, answer pairs and human
rationales (as critiques, with the preferred answer's verdict line), each with a shapes-world image
scaled to `--image-size` (the file holds no images). The datamodule reads one epoch of them both
ways; the tiny judge then trains on each epoch's batches (the same samples, cut differently).
The tiny judge's tokenizer, trained on the shapes world's words, splits English into ~1.6
characters per token where real ones take ~4, which inflates the text's share of a sample; an
estimate from character counts at 4 per token and a fixed image token count is printed beside it.

    python -m tools.bench.padding --records ../shared/benchmarks/vl_rewardbench.jsonl
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from carevl import schema
from carevl.backbone import Backbone
from carevl.images import png_bytes
from carevl.losses import sft_loss
from carevl.prompts import verdict_line
from carevl.standins import shapes
from carevl.standins.tiny import build_tiny_model
from datamodules import JudgeDataModule
from datamodules.stream import cut_batches


def read_rows(records: Path) -> list[dict]:
    """The records that have a rationale (the critique a judge would be trained to write)."""
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("rationale")]


def write_shards(rows: list[dict], out: Path, image_size: int) -> int:
    """SFT shards of the records; returns how many."""
    items = shapes.judge_items(len(rows), seed=0)
    with schema.ShardWriter(out, prefix="vlrb", max_count=256, kind="sft") as writer:
        for row, item in zip(rows, items):
            image = Image.open(io.BytesIO(item.image)).resize((image_size, image_size))
            label = 1 if row["human_ranking"][0] == 0 else 2
            writer.write(
                schema.SFTSample(
                    id=row["id"],
                    question=row["query"],
                    responses=list(row["response"]),
                    label=label,
                    target=f"{row['rationale'].strip()} {verdict_line(label)}",
                    source="vl_rewardbench",
                    image=png_bytes(image),
                )
            )
    return len(rows)


def estimate(rows: list[dict], batch_size: int, group: int, image_tokens: int, chars_per_token: float = 4.0) -> float:
    """Padding share of one shuffled pass cut like the datamodule, from character counts (prompt,
    answers and rationale at `chars_per_token`, plus the judge template's ~200 tokens) and a fixed
    image token count: what a real tokenizer would see, without one."""
    items = [
        {"length": image_tokens + 200 + len(r["query"] + "".join(r["response"]) + r["rationale"]) / chars_per_token}
        for r in rows
    ]
    random.Random(0).shuffle(items)
    pool = batch_size * max(1, group)
    batches = [
        b
        for i in range(0, len(items) - pool + 1, pool)
        for b in cut_batches(items[i : i + pool], batch_size, group, random.Random(i))
    ]
    real = sum(item["length"] for b in batches for item in b)
    return 1 - real / sum(max(item["length"] for item in b) * len(b) for b in batches)


def run_epoch(
    model: str, shards: Path, batch_size: int, group: int, max_length: int, backbone: Backbone | None = None
) -> tuple[int, int, float]:
    """(real tokens, computed tokens, seconds in training steps) of one epoch read by the datamodule;
    with a backbone, each batch also takes an SFT step (forward, backward, AdamW)."""
    data = JudgeDataModule(
        processor=model,
        train=str(shards),
        batch_size=batch_size,
        num_workers=1,
        group_by_length=group,
        max_length=max_length,
    )
    data.setup("fit")
    real = computed = 0
    seconds = 0.0
    if backbone is not None:
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-5)
    for batch in data.train_dataloader():
        inputs = batch["inputs"]
        real += int(inputs["attention_mask"].sum())
        computed += inputs["input_ids"].numel()
        if backbone is not None:
            start = time.perf_counter()
            logps, rows = backbone.response_logprobs(inputs)
            sft_loss(logps, batch["weights"], rows).backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds += time.perf_counter() - start
    return real, computed, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records", required=True, help="VL-RewardBench data.jsonl (query, response, human_ranking, rationale)"
    )
    parser.add_argument("--model", help="judge checkpoint and processor; default: a tiny random Qwen2-VL built here")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--group", type=int, default=16, help="group_by_length: batches' worth of samples sorted together"
    )
    parser.add_argument("--image-size", type=int, default=448, help="image side in pixels (448: 256 image tokens)")
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument(
        "--image-tokens",
        type=int,
        nargs="*",
        default=[256, 1000],
        help="image token counts for the estimate from character counts",
    )
    parser.add_argument(
        "--train", action="store_true", help="also time an epoch of SFT steps on each cut (the first batch size)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_model(Path(tmp) / "model", hidden=64, layers=2))
        rows = read_rows(Path(args.records))
        count = write_shards(rows, Path(tmp) / "shards", args.image_size)
        lines = []
        for batch_size in args.batch_size:
            plain, grouped = (
                run_epoch(model, Path(tmp) / "shards", batch_size, group, args.max_length) for group in (0, args.group)
            )
            lines.append(
                f"| {batch_size} | read by the datamodule | {1 - plain[0] / plain[1]:.1%} | "
                f"{1 - grouped[0] / grouped[1]:.1%} | {plain[1] / grouped[1]:.2f}x |"
            )
            for image_tokens in args.image_tokens:
                shuffled, sorted_ = (estimate(rows, batch_size, group, image_tokens) for group in (0, args.group))
                lines.append(
                    f"| {batch_size} | estimated, {image_tokens} image tokens | {shuffled:.1%} | {sorted_:.1%} | "
                    f"{(1 - sorted_) / (1 - shuffled):.2f}x |"
                )
        print(
            f"{count} samples of {plain[0] / count:.0f} tokens on average as read (image tokens included); padding: "
            "the share of the language model's computed tokens"
        )
        print(
            f"| batch | lengths | padding, shuffled | padding, grouped over {args.group} batches | computed tokens, "
            "shuffled / grouped |",
            "|---|---|---|---|---|",
            *lines,
            sep="\n",
        )
        if args.train:
            batch_size = args.batch_size[0]
            seconds = {}
            for group in (0, args.group):
                backbone = Backbone(model)
                backbone.build()
                seconds[group] = run_epoch(model, Path(tmp) / "shards", batch_size, group, args.max_length, backbone)[2]
            print(
                f"an epoch of SFT steps of the tiny judge, batch {batch_size}: shuffled {seconds[0]:.1f} s, grouped "
                f"{seconds[args.group]:.1f} s "
                f"({seconds[0] / seconds[args.group]:.2f}x faster grouped)"
            )


if __name__ == "__main__":
    main()
