"""Write the shapes world's files: judge SFT train and held-out shards, the tiny base model's
pretraining shards, held-out records in the two benchmarks' formats (bench/vlrewardbench,
bench/mllm_judge), DPO preference groups (groups/, groups-heldout/) and a questions file for
curation (questions.jsonl, the input of `tools/curate.py ingest`).

    python -m carevl.standins.world --out runs/demo/world --questions 2000
"""

from __future__ import annotations

import argparse
import random
from functools import partial
from pathlib import Path

from carevl.benchmarks import MLLM_JUDGE, VLREWARDBENCH
from carevl.images import png_bytes
from carevl.schema import BenchmarkSample, InstructSample, PreferenceGroupSample, SFTSample, ShardWriter, question_line
from carevl.standins import shapes


def write_world(
    out_dir: str,
    train: int = 2000,
    heldout: int = 200,
    captions: int = 2000,
    shard_size: int = 500,
    seed: int = 0,
    attributes: tuple[str, ...] = shapes.JUDGE_ATTRIBUTES,
    quotes: int | None = None,
    quote_checks: int = 0,
    answers_in_view: float = 0.0,
    reading_checks: int = 0,
) -> dict[str, int]:
    """Write the world's shards: ``train`` and ``heldout`` judge SFT samples, and ``pretrain``
    instruct samples for the tiny base model: ``captions`` captions, as many questions about the
    image answered in one sentence (what the candidate models do, and what lets SFT find the asked
    attribute's value fast: docs/shapes-world.md), and ``quotes`` quoting tasks (default: as many
    as captions), in a seeded random order; and ``quote_checks`` quoting tasks with images of their
    own (`quotes-check`), which tell by exact match whether pretraining has taught the skill
    (`val/exact_match`, configs/demo/pretrain.yaml). The world has 108 quoting prompts, so these
    check the skill on pretraining's own tasks, not on unseen ones. A share ``answers_in_view`` of
    the questions is asked with two answers in view (`shapes.reading_task`), as the judge's prompt
    has them. ``reading_checks`` such reading tasks per attribute, on fresh images
    (`reading-check/<attribute>`), tell by exact match how well pretraining taught the base to read
    each attribute in that prompt: the judge's SFT builds on that skill (docs/results.md).

    Seeds differ per split, so held-out images never appear in training.
    """
    out = Path(out_dir)
    for split, n, split_seed in (("train", train, seed), ("heldout", heldout, seed + 1)):
        with ShardWriter(out / split, prefix=split, max_count=shard_size, kind="sft") as writer:
            for item in shapes.judge_items(n, split_seed, prefix=f"shapes-{split}", attributes=attributes):
                writer.write(SFTSample(**item.fields(), target=item.critique(), source="shapes-world"))
    rng = random.Random(seed + 2)
    tasks = ["caption"] * captions + ["question"] * captions + ["quote"] * (captions if quotes is None else quotes)
    rng.shuffle(tasks)
    with ShardWriter(out / "pretrain", prefix="pretrain", max_count=shard_size, kind="instruct") as writer:
        for index, task in enumerate(tasks):
            scene = shapes.random_scene(rng)
            if task == "caption":
                prompt, target = shapes.CAPTION_PROMPT, shapes.caption_target(scene)
            elif task == "question":
                # no draw without the option, so such worlds are the ones written before it
                in_view = answers_in_view > 0 and rng.random() < answers_in_view
                attribute = rng.choice(attributes)
                if in_view:
                    prompt, target = shapes.reading_task(attribute, scene.value(attribute), rng)
                else:
                    prompt, target = shapes.QUESTIONS[attribute], shapes.answer(attribute, scene.value(attribute))
            else:
                prompt, target = shapes.quote_task(rng)
            writer.write(instruct_sample(f"shapes-pretrain-{index:06d}", prompt, target, scene, rng))
    if quote_checks:
        write_checks(out / "quotes-check", "quotes", quote_checks, random.Random(seed + 3), shard_size, quote)
    rng = random.Random(seed + 5)
    for attribute in attributes if reading_checks else ():
        task = partial(read, attribute)
        write_checks(out / "reading-check" / attribute, f"reading-{attribute}", reading_checks, rng, shard_size, task)
    return {
        "train": train,
        "heldout": heldout,
        "pretrain": len(tasks),
        "quotes-check": quote_checks,
        "reading-check": reading_checks * len(attributes),
    }


def write_checks(folder: Path, name: str, n: int, rng: random.Random, shard_size: int, task) -> None:
    """`n` instruct tasks on fresh images, ids ``shapes-<name>-<index>``, `task(scene, rng)` giving
    each (prompt, target): an exact-match check of a pretraining skill."""
    with ShardWriter(folder, prefix="check", max_count=shard_size, kind="instruct") as writer:
        for index in range(n):
            scene = shapes.random_scene(rng)
            prompt, target = task(scene, rng)
            writer.write(instruct_sample(f"shapes-{name}-{index:06d}", prompt, target, scene, rng))


def quote(scene: shapes.Scene, rng: random.Random) -> tuple[str, str]:
    return shapes.quote_task(rng)


def read(attribute: str, scene: shapes.Scene, rng: random.Random) -> tuple[str, str]:
    return shapes.reading_task(attribute, scene.value(attribute), rng)


def instruct_sample(id: str, prompt: str, target: str, scene: shapes.Scene, rng: random.Random) -> InstructSample:
    """A pretraining sample, with the scene's image (drawn from `rng`) whether or not it is asked about."""
    return InstructSample(
        id=id,
        prompt=prompt,
        target=target,
        source="shapes-world",
        image=png_bytes(shapes.render(scene, rng)),
        meta={"scene": scene.__dict__},
    )


# The shapes world in the benchmarks' formats, so `carevl test` runs on the demo judge. The
# categories are a stated mapping, not the benchmarks' own: colour questions stand for
# VL-RewardBench "general", shape for "hallucination" (object recognition), count for "reasoning";
# every MLLM-as-a-Judge record stands for the "coco" subset, and a third of them are ties (two
# answers that are both wrong).
BENCHMARK_CATEGORIES = {"colour": "general", "shape": "hallucination", "count": "reasoning", "position": "general"}


def write_benchmarks(
    out_dir: str, n: int = 120, seed: int = 7, attributes: tuple[str, ...] = shapes.JUDGE_ATTRIBUTES
) -> dict[str, int]:
    """Write `vlrewardbench/` and `mllm_judge/` benchmark shards of fresh shapes-world items."""
    out = Path(out_dir)
    rng = random.Random(seed)
    with (
        ShardWriter(out / VLREWARDBENCH, prefix="benchmark", kind="benchmark") as vlrb,
        ShardWriter(out / MLLM_JUDGE, prefix="benchmark", kind="benchmark") as mllm,
    ):
        for item in shapes.judge_items(n, seed, prefix="shapes-bench", attributes=attributes):
            fields = item.fields()
            vlrb.write(
                BenchmarkSample(**fields, benchmark=VLREWARDBENCH, category=BENCHMARK_CATEGORIES[item.attribute])
            )
            if rng.random() < 1 / 3:
                truth = item.scene.value(item.attribute)
                wrong = [v for v in shapes.attribute_values(item.attribute) if v != truth]
                fields.update(
                    responses=[shapes.ANSWERS[item.attribute].format(v) for v in rng.sample(wrong, 2)], label="tie"
                )
            mllm.write(BenchmarkSample(**fields, benchmark=MLLM_JUDGE, category="coco"))
    return {VLREWARDBENCH: n, MLLM_JUDGE: n}


# An id prefix of VL-RewardBench's for each category (carevl.benchmarks.vlrb_category reads it back).
RELEASE_PREFIXES = {"general": "wildvision", "hallucination": "hallucination_pair", "reasoning": "mathverse"}


def write_release_benchmarks(
    out_dir: str | Path, n: int = 24, seed: int = 7, attributes: tuple[str, ...] = shapes.JUDGE_ATTRIBUTES
) -> dict[str, int]:
    """Fresh shapes-world items as the two benchmarks are published, the input of
    tools/convert_benchmark.py: `vl-rewardbench/test-00000-of-00001.parquet` (the Hugging Face
    release's columns, images embedded, meta as a JSON string) and `mllm-judge/pair.jsonl` with its
    images beside it (MLLM-as-a-Judge's pair records, human verdict A or B)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    (out / "vl-rewardbench").mkdir(parents=True, exist_ok=True)
    (out / "mllm-judge").mkdir(parents=True, exist_ok=True)
    rows, pairs = [], []
    for index, item in enumerate(shapes.judge_items(n, seed, prefix="release", attributes=attributes)):
        category = BENCHMARK_CATEGORIES[item.attribute]
        rows.append(
            {
                "id": f"{RELEASE_PREFIXES[category]}-{item.id}",
                "query": item.question,
                "response": list(item.responses),
                "human_ranking": [0, 1] if item.label == 1 else [1, 0],
                "models": ["shapes-a", "shapes-b"],
                "judge": "human",
                "rationale": None,
                "query_source": "shapes-world",
                "meta": json.dumps({"attribute": item.attribute}),
                "human_error_analysis": [],
                "image": {"bytes": item.image, "path": None},
            }
        )
        (out / "mllm-judge" / f"{index}.png").write_bytes(item.image)
        pairs.append(
            {
                "id": index,
                "pair_id": index,
                "image_path": f"{index}.png",
                "original_dataset": "coco",
                "instruction": item.question,
                "answer1": {"name": "shapes-a", "answer": item.responses[0]},
                "answer2": {"name": "shapes-b", "answer": item.responses[1]},
                "human": "A" if item.label == 1 else "B",
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), out / "vl-rewardbench" / "test-00000-of-00001.parquet")
    (out / "mllm-judge" / "pair.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return {"vl-rewardbench": n, "mllm-judge": n}


def write_preference_groups(
    out_dir: str,
    n: int = 400,
    seed: int = 11,
    attributes: tuple[str, ...] = shapes.JUDGE_ATTRIBUTES,
    shard_size: int = 200,
) -> int:
    """Preference-group shards of the shapes world: the correct critique against 1-4 simulated worse ones."""
    rng = random.Random(seed)
    with ShardWriter(out_dir, prefix="groups", max_count=shard_size, kind="preference_group") as writer:
        for item in shapes.judge_items(n, seed, prefix="shapes-groups", attributes=attributes):
            rejected = shapes.worse_critiques(item)[: rng.randint(1, 4)]
            writer.write(
                PreferenceGroupSample(**item.fields(), chosen=item.critique(), rejected=rejected, strategy="simulated")
            )
    return n


def write_questions(
    path: str | Path, n: int, seed: int = 0, attributes: tuple[str, ...] = shapes.JUDGE_ATTRIBUTES
) -> Path:
    """A questions file of `n` world items for curation (`carevl.schema.QUESTION_FIELDS`), images
    beside it under ``<name>-images/``. Each item's `meta.truth` holds its scene and the asked
    attribute: what the simulated curation models read and the report's precision checks against."""
    out = Path(path)
    images = out.parent / f"{out.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in shapes.judge_items(n, seed, prefix="curation", attributes=attributes):
        (images / f"{item.id}.png").write_bytes(item.image)
        meta = {"truth": {"scene": item.scene.__dict__, "attribute": item.attribute}}
        lines.append(question_line(item.id, f"{images.name}/{item.id}.png", item.question, meta))
    out.write_text("".join(lines))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (train/, heldout/, pretrain/ go under it)")
    parser.add_argument("--train", type=int, default=2000, help="judge training samples")
    parser.add_argument("--heldout", type=int, default=200, help="held-out judge samples")
    parser.add_argument(
        "--captions",
        type=int,
        default=2000,
        help="caption samples (and as many answered questions and quoting tasks) for base-model pretraining",
    )
    parser.add_argument(
        "--quotes", type=int, help="quoting tasks for base-model pretraining (default: as many as captions)"
    )
    parser.add_argument(
        "--quote-checks",
        type=int,
        default=0,
        help="quoting tasks on fresh images (quotes-check/): pretraining's exact-match check of the quoting skill",
    )
    parser.add_argument(
        "--reading-checks",
        type=int,
        default=0,
        help="reading tasks per judge attribute on fresh images (reading-check/<attribute>): pretraining's "
        "exact-match check of reading the image with two answers in view",
    )
    parser.add_argument(
        "--answers-in-view",
        type=float,
        default=0.0,
        help="share of the pretraining questions asked with two answers in view, as in the judge's prompt "
        "(the target still says what the image shows)",
    )
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument(
        "--benchmark", type=int, default=120, help="records of the world in each benchmark format (bench/)"
    )
    parser.add_argument(
        "--groups", type=int, default=800, help="DPO preference groups (correct vs simulated worse critiques, groups/)"
    )
    parser.add_argument(
        "--questions",
        type=int,
        default=0,
        help="curation items (questions.jsonl and its images, the ingest stage's input)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_world(
        args.out,
        args.train,
        args.heldout,
        args.captions,
        args.shard_size,
        args.seed,
        quotes=args.quotes,
        quote_checks=args.quote_checks,
        answers_in_view=args.answers_in_view,
        reading_checks=args.reading_checks,
    )
    counts.update(write_benchmarks(f"{args.out}/bench", args.benchmark, seed=args.seed + 7))
    counts["groups"] = write_preference_groups(f"{args.out}/groups", args.groups, seed=args.seed + 11)
    counts["groups-heldout"] = write_preference_groups(
        f"{args.out}/groups-heldout", args.groups // 8, seed=args.seed + 13
    )
    if args.questions:
        write_questions(f"{args.out}/questions.jsonl", args.questions, seed=args.seed)
        counts["questions"] = args.questions
    print(f"wrote {counts} to {args.out}")


if __name__ == "__main__":
    main()
