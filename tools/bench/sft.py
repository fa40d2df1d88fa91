"""SFT speed: padding-free (packed) batches against padded ones and TRL's SFTTrainer, on the same
tiny Qwen2-VL, samples, batch size and machine.

Modes, each one epoch in its own process (so peak memory is its own):
  trl      TRL's SFTTrainer (prompt-completion conversations, loss on the completion), padded
  padded   carevl, batches cut in shuffled order and padded to their longest sample
  grouped  carevl, `group_by_length: 16` (batches of similar lengths, still padded)
  packed   carevl, `pack_samples: true` (each batch's samples end to end in one row, no padding)
Samples come from VL-RewardBench's records (`--records`: real questions, answer pairs and human
rationales as critiques, shapes-world images at `--image-size`), or from the shapes world
(`--world N`: the demo's critiques). The epoch's wall time is the training loop (loaders, steps,
optimizer), model loading left out on both sides; tokens/s counts each system's own real tokens
(padding left out), so the ratios are in tokens per second.

    python -m tools.bench.sft --records ../shared/benchmarks/vl_rewardbench.jsonl --samples 96
    python -m tools.bench.sft --world 192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.bench.epoch import peak_memory_mb, read_samples, timed_epoch

MODES = ("trl", "padded", "grouped", "packed")


def write_world(out: Path, count: int, image_size: int) -> None:
    """SFT shards of `count` shapes-world items with their critiques."""
    import io

    from PIL import Image

    from carevl import schema
    from carevl.images import png_bytes
    from carevl.standins import shapes

    with schema.ShardWriter(out, prefix="world", max_count=10_000, kind="sft") as writer:
        for item in shapes.judge_items(count, seed=0):
            image = Image.open(io.BytesIO(item.image)).resize((image_size, image_size))
            writer.write(
                schema.SFTSample(
                    id=item.id,
                    question=item.question,
                    responses=list(item.responses),
                    label=item.label,
                    target=item.critique(),
                    source="shapes",
                    image=png_bytes(image),
                )
            )


def run_trl(model_dir: str, shards: Path, batch_size: int) -> tuple[float, int, int]:
    """(epoch seconds, real tokens, computed tokens) of TRL's SFTTrainer over the shards."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from carevl.standins.baselines import trl_completion

    rows = [
        trl_completion(sample.image, sample.question, sample.responses, sample.target)
        for sample in read_samples(shards, "sft")
    ]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    for name, param in model.named_parameters():  # the same frozen vision encoder as carevl's
        if name.startswith("model.visual.") and not name.startswith("model.visual.merger."):
            param.requires_grad_(False)
    gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=1e-5,
        report_to="none",
        use_cpu=not gpu,
        bf16=gpu,
        max_length=None,
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=1,
        lr_scheduler_type="constant",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
    )
    real = computed = 0
    for batch in trainer.get_train_dataloader():  # the epoch's batches, counted outside the timing
        real += int(batch["attention_mask"].sum())
        computed += batch["attention_mask"].numel()
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, real, computed


def run_carevl(model_dir: str, shards: Path, batch_size: int, group: int, pack: bool) -> tuple[float, int, int]:
    """(epoch seconds, real tokens, computed tokens) of carevl's SFT over the shards."""
    from lightning import Callback

    from carevl.backbone import Backbone
    from carevl.sft import SFTJudge
    from datamodules import JudgeDataModule

    class Tokens(Callback):
        real = computed = 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            mask = batch["inputs"]["attention_mask"]
            self.real += int(mask.sum())
            self.computed += int(mask.sum()) if pack else mask.numel()

    tokens = Tokens()
    module = SFTJudge(Backbone(model=model_dir), lr=1e-5, warmup_ratio=0.0, val_generate=False, pack_samples=pack)
    data = JudgeDataModule(
        processor=model_dir,
        train=str(shards),
        batch_size=batch_size,
        num_workers=1,
        group_by_length=group,
        max_length=16384,
    )
    return timed_epoch(module, data, [tokens]), tokens.real, tokens.computed


def child(mode: str, model_dir: str, shards: Path, batch_size: int) -> None:
    import torch

    torch.manual_seed(0)
    if mode == "trl":
        seconds, real, computed = run_trl(model_dir, shards, batch_size)
    else:
        seconds, real, computed = run_carevl(
            model_dir, shards, batch_size, 16 if mode == "grouped" else 0, mode == "packed"
        )
    print(json.dumps({"epoch_s": seconds, "real": real, "computed": computed, "peak_mb": peak_memory_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", help="VL-RewardBench data.jsonl (query, response, human_ranking, rationale)")
    source.add_argument("--world", type=int, help="shapes-world items instead")
    parser.add_argument("--samples", type=int, default=96, help="records used (--records)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (224: 64 image tokens)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per optimizer step, every mode")
    parser.add_argument("--model", help="a Qwen2-VL checkpoint; default: a tiny random one built here")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    if args.child:
        child(args.child, args.model, Path(args.shards), args.batch_size)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    if args.model is None:
        from carevl.standins.tiny import build_tiny_model

        args.model = str(build_tiny_model(work / "model", hidden=64, layers=2))
    if args.records:
        from tools.bench.padding import read_rows, write_shards

        write_shards(read_rows(Path(args.records))[: args.samples], work / "shards", args.image_size)
    else:
        write_world(work / "shards", args.world, args.image_size)
    results = {}
    print(f"{'mode':8s} {'epoch s':>8} {'tokens/s':>9} {'padding':>8} {'peak MB':>8}")
    for mode in args.modes.split(","):
        command = [sys.executable, "-m", "tools.bench.sft", "--child", mode, "--model", args.model]
        command += ["--shards", str(work / "shards"), "--batch-size", str(args.batch_size), "--world", "0"]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{mode} failed:\n{out.stderr[-4000:]}")
        result = results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        result["tokens_per_s"] = result["real"] / result["epoch_s"]
        padding = 1 - result["real"] / result["computed"]
        print(
            f"{mode:8s} {result['epoch_s']:8.2f} {result['tokens_per_s']:9.0f} {padding:8.1%} {result['peak_mb']:8.0f}",
            flush=True,
        )
    for slow, fast in (("padded", "packed"), ("grouped", "packed"), ("trl", "packed"), ("trl", "padded")):
        if slow in results and fast in results:
            ratio = results[fast]["tokens_per_s"] / results[slow]["tokens_per_s"]
            print(f"carevl {fast} vs {'TRL SFTTrainer' if slow == 'trl' else f'carevl {slow}'}: {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
