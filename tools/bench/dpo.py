"""DPO speed: TRL's DPOTrainer against carevl on the same tiny Qwen2-VL, data and machine.

Three runs, one after the other, each in its own process (so peak memory is its own):
  trl     TRL's DPOTrainer on the groups expanded into (chosen, rejected) pairs
  pairs   carevl on the same pairs (groups of one rejected)
  groups  carevl on the groups (one chosen against `--rejected` rejected, image and prompt shared)
  groups-unpacked  (optional) the same with `pack_prompts: false`: the image is encoded once, but the
          prompt tokens run through the language model once per critique
  pairs-precomputed, groups-precomputed  (optional) pairs or groups with `reference: precomputed`:
          `python tools/reference_logps.py` runs first (timed apart, and counted in the ratios that say
          so), then training loads no reference model (TRL cannot do this with images)
Each run trains one epoch over the same pairs with the same number of pairs per optimizer step,
a frozen-copy reference, fp32 on CPU (bf16 on GPU), and reports the epoch's wall time and peak
memory. The epoch's wall time is the training loop alone, loading models, processors and data
left out on both sides: TRL's `trainer.train()` (its optimizer, loaders and steps), carevl's
Lightning run from `on_train_start` to `on_train_end` (its loaders and steps; the model and the
reference copy are built before). Then the ratios are printed.

    python -m tools.bench.dpo --groups 24 --rejected 9 --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.bench.epoch import peak_memory_mb, read_samples, timed_epoch

MODES = ("trl", "pairs", "groups", "groups-unpacked", "pairs-precomputed", "groups-precomputed")


def write_data(out: Path, groups: int, rejected: int, seed: int = 0) -> None:
    from carevl.schema import PreferenceGroupSample, ShardWriter
    from carevl.standins.shapes import distinct_worse_critiques, judge_items

    items = judge_items(groups, seed)
    with (
        ShardWriter(out / "groups", prefix="groups", max_count=10_000, kind="preference_group") as grouped,
        ShardWriter(out / "pairs", prefix="pairs", max_count=10_000, kind="preference_group") as paired,
    ):
        for item in items:
            worse = distinct_worse_critiques(item, rejected)
            common = {
                "question": item.question,
                "responses": list(item.responses),
                "label": item.label,
                "chosen": item.critique(),
                "image": item.image,
            }
            grouped.write(PreferenceGroupSample(id=item.id, rejected=worse, **common))
            for j, text in enumerate(worse):
                paired.write(PreferenceGroupSample(id=f"{item.id}-{j}", rejected=[text], **common))


def run_trl(model_dir: str, data: Path, pairs_per_step: int) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from carevl.standins.baselines import trl_pair

    rows = [
        trl_pair(sample.image, sample.question, sample.responses, sample.chosen, sample.rejected[0])
        for sample in read_samples(data / "pairs", "preference_group")
    ]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    for name, param in model.named_parameters():  # the same frozen vision encoder as carevl's
        if name.startswith("model.visual.") and not name.startswith("model.visual.merger."):
            param.requires_grad_(False)
    gpu = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=pairs_per_step,
        num_train_epochs=1,
        beta=0.1,
        learning_rate=1e-5,
        loss_type=["sigmoid"],
        report_to="none",
        use_cpu=not gpu,
        bf16=gpu,
        max_length=None,
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=1,
        lr_scheduler_type="constant",
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def run_carevl(model_dir: str, shards: Path, groups_per_step: int, pack: bool = True, reference: str = "copy") -> float:
    from carevl.backbone import Backbone
    from carevl.dpo import DPOJudge
    from datamodules import JudgeDataModule

    module = DPOJudge(
        Backbone(model=model_dir), reference=reference, beta=0.1, lr=1e-5, warmup_ratio=0.0, pack_prompts=pack
    )
    data = JudgeDataModule(
        processor=model_dir,
        train=str(shards),
        kind="preference_group",
        batch_size=groups_per_step,
        num_workers=1,
        shuffle_buffer=1,
    )
    return timed_epoch(module, data)


def profile_carevl(model_dir: str, data: Path, rejected: int, pairs_per_step: int, steps: int = 5) -> None:
    """Where a carevl step's time goes (vision features, policy and reference forwards, backward),
    on pairs and on groups, timed outside Lightning on the same batches."""

    from carevl.backbone import Backbone
    from carevl.dpo import DPOJudge
    from datamodules import JudgeDataModule

    module = DPOJudge(Backbone(model=model_dir), reference="copy", beta=0.1)
    module.configure_model()
    for kind, batch_size in (("pairs", pairs_per_step), ("groups", max(1, pairs_per_step // rejected))):
        loader = JudgeDataModule(
            processor=model_dir,
            train=str(data / kind),
            kind="preference_group",
            batch_size=batch_size,
            num_workers=0,
            shuffle_buffer=1,
        )
        loader.setup("fit")
        batches = [batch for _, batch in zip(range(steps), loader.train_dataloader())]
        seconds = dict.fromkeys(("vision", "policy forward", "reference forward", "backward"), 0.0)
        for batch in batches:
            start = time.perf_counter()
            features = module.backbone.image_features(batch["inputs"])
            seconds["vision"] += time.perf_counter() - start
            start = time.perf_counter()
            policy = module.backbone.group_logprobs(batch, features)
            seconds["policy forward"] += time.perf_counter() - start
            start = time.perf_counter()
            module.reference_logprobs(batch, features)
            seconds["reference forward"] += time.perf_counter() - start
            start = time.perf_counter()
            policy.sum().backward()
            seconds["backward"] += time.perf_counter() - start
        total = sum(seconds.values())
        first = batches[0]
        responses = int((first["inputs"]["labels"] != -100).sum())
        prompts = first["prompt_lengths"]
        unpacked = int(prompts.sum()) + responses
        packed = int(prompts[first["chosen_index"]].sum()) + responses  # each group's prompt once
        split = ", ".join(f"{name} {100 * value / total:.0f}%" for name, value in seconds.items())
        print(
            f"profile {kind:6s}: {1000 * total / len(batches):.0f} ms per step of {pairs_per_step} pairs; {split}; "
            f"language-model tokens per step {packed} packed ({unpacked} if every critique repeated its prompt)"
        )


def child(mode: str, model_dir: str, data: Path, rejected: int, pairs_per_step: int) -> None:
    import torch

    torch.manual_seed(0)
    result = {"mode": mode}
    kind, _, variant = mode.partition("-")
    if kind == "trl":
        result["epoch_s"] = run_trl(model_dir, data, pairs_per_step)
    else:
        shards, per_step = (
            (data / "pairs", pairs_per_step)
            if kind == "pairs"
            else (data / "groups", max(1, pairs_per_step // rejected))
        )
        reference = "copy"
        if variant == "precomputed":
            from tools.reference_logps import precompute_reference

            shards, reference = shutil.copytree(shards, data / mode), "precomputed"
            start = time.perf_counter()
            precompute_reference(model_dir, shards, batch_size=per_step)
            result["precompute_s"] = time.perf_counter() - start
        result["epoch_s"] = run_carevl(model_dir, shards, per_step, pack=variant != "unpacked", reference=reference)
    result["peak_mb"] = peak_memory_mb()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=24, help="groups of the epoch")
    parser.add_argument(
        "--rejected", type=int, default=9, help="rejected critiques per group (pairs = groups x rejected)"
    )
    parser.add_argument(
        "--pairs-per-step", type=int, default=9, help="pairs per optimizer step (a multiple of --rejected)"
    )
    parser.add_argument("--model", help="a Qwen2-VL checkpoint; default: a tiny random one built here")
    parser.add_argument("--modes", default="trl,pairs,groups", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--profile", action="store_true", help="also print where carevl's step time goes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    if args.child:
        child(args.child, args.model, Path(args.data), args.rejected, args.pairs_per_step)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    if args.model is None:
        from carevl.standins.tiny import build_tiny_model

        args.model = str(build_tiny_model(work / "model"))
    write_data(work / "data", args.groups, args.rejected)
    results = {}
    for mode in args.modes.split(","):
        command = [
            sys.executable,
            "-m",
            "tools.bench.dpo",
            "--child",
            mode,
            "--model",
            args.model,
            "--data",
            str(work / "data"),
            "--rejected",
            str(args.rejected),
            "--pairs-per-step",
            str(args.pairs_per_step),
        ]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{mode} failed:\n{out.stderr[-4000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        precompute = (
            f"   (+ {results[mode]['precompute_s']:.2f} s precomputing the reference)"
            if "precompute_s" in results[mode]
            else ""
        )
        print(
            f"{mode:18s} epoch {results[mode]['epoch_s']:8.2f} s   peak memory {results[mode]['peak_mb']:8.0f} "
            f"MB{precompute}",
            flush=True,
        )
    pairs = args.groups * args.rejected
    print(f"\n{pairs} pairs ({args.groups} groups x {args.rejected} rejected), {args.pairs_per_step} pairs per step")

    def ratio(slow: str, fast: str, label: str) -> None:
        if slow in results and fast in results:
            print(f"{label}: {results[slow]['epoch_s'] / results[fast]['epoch_s']:.2f}x faster per epoch")
            if "precompute_s" in results[fast]:
                with_precompute = results[fast]["epoch_s"] + results[fast]["precompute_s"]
                print(f"{label}, the precompute counted: {results[slow]['epoch_s'] / with_precompute:.2f}x")

    ratio("trl", "pairs", "carevl pairs vs TRL")
    ratio("pairs", "groups", "carevl groups vs carevl pairs")
    ratio("groups-unpacked", "groups", "carevl groups packed vs unpacked")
    ratio("trl", "groups", "carevl groups vs TRL")
    ratio("trl", "pairs-precomputed", "carevl pairs, precomputed reference, vs TRL")
    ratio("trl", "groups-precomputed", "carevl groups, precomputed reference, vs TRL")
    if args.profile:
        profile_carevl(args.model, work / "data", args.rejected, args.pairs_per_step)


if __name__ == "__main__":
    main()
