"""GPU smoke and throughput check: SFT and DPO steps of a Qwen2-VL-2B- or 7B-shaped judge with
random weights (built from a config, nothing downloaded), through the real CLI, modules, data
pipeline and DeepSpeed. Prints tokens/s, peak memory and MFU, and checks that a run resumed from a
saved checkpoint continues from its step.

    python tools/gpu_smoke.py --shape 2b --strategy zero2            # full fine-tuning
    python tools/gpu_smoke.py --shape 7b --strategy zero3 --lora      # 7B on one 80 GB GPU
    python tools/gpu_smoke.py --shape tiny --strategy ddp --accelerator cpu --steps 2   # CPU dry run

MFU counts the FLOPs the step really does: 6 per trainable weight and token (forward, input and
weight gradients), 4 per frozen language-model weight and token (forward and input gradients;
LoRA), 2 per vision weight and image patch (frozen: forward only), 2 per reference weight and token
with reference 'copy', the language-model head only at response positions (where carevl computes
it), and attention (QK^T and AV) as 4 x layers x width x length^2 per sequence forward, three times
that with backward.
Gradient-checkpointing recomputation is not counted. Peak: 989 TFLOP/s bf16 dense on H100/H200,
312 on A100 (--peak-tflops otherwise).
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from carevl import shapes
from carevl.cli import run
from carevl.encoding import IGNORE_INDEX
from carevl.schema import PreferenceGroupSample, SFTSample, ShardWriter
from carevl.tiny import build_tiny_model

# Qwen2-VL-2B/7B-Instruct language-model and vision-tower shapes (their config.json files).
SHAPES = {
    "tiny": None,
    "2b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
}
VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}


def shaped_checkpoint(out: Path, shape: str) -> Path:
    """The tiny checkpoint's processor with a config of the requested size (weights come from random_init)."""
    build_tiny_model(out, family="qwen2_vl")
    if SHAPES[shape] is None:
        return out
    config = json.loads((out / "config.json").read_text())
    text = {**config["text_config"], **SHAPES[shape], "max_position_embeddings": 32768, "rope_theta": 1000000.0}
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
    config["text_config"] = text
    config["vision_config"] = {**config["vision_config"], **VISION, "hidden_size": SHAPES[shape]["hidden_size"]}
    config.update({k: v for k, v in SHAPES[shape].items() if k in ("hidden_size", "vocab_size", "tie_word_embeddings")})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "model.safetensors").unlink(missing_ok=True)
    return out


def write_data(out: Path, groups: int, image_size: int, repeat: int) -> None:
    """SFT samples and preference groups of the shapes world, with large images and long critiques."""
    rng = random.Random(0)
    items = shapes.judge_items(groups, seed=0)
    with ShardWriter(out / "sft", prefix="sft", max_count=256, kind="sft") as sft, ShardWriter(out / "groups", prefix="groups", max_count=256, kind="preference_group") as dpo:
        for item in items:
            image = shapes.png_bytes(shapes.render(item.scene, rng, size=image_size))
            fields = {**item.fields(), "image": image}
            long = lambda text: " ".join([text.rsplit(" Overall", 1)[0]] * repeat + ["Overall" + text.rsplit(" Overall", 1)[1]])  # noqa: E731
            sft.write(SFTSample(**fields, target=long(item.critique()), source="smoke"))
            dpo.write(PreferenceGroupSample(**fields, chosen=long(item.critique()), rejected=[long(t) for t in shapes.worse_critiques(item)]))


class Throughput(Callback):
    """Step times after `warmup` steps, tokens and image patches per step, peak memory."""

    def __init__(self, warmup: int):
        self.warmup, self.steps = warmup, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        inputs = batch["inputs"]
        if trainer.global_step > self.warmup:
            lengths = inputs["attention_mask"].sum(dim=1)
            self.steps.append(
                {
                    "seconds": time.perf_counter() - self.start,
                    "tokens": int(lengths.sum()),
                    "squares": float((lengths.float() ** 2).sum()),
                    "response_tokens": int((inputs["labels"] != IGNORE_INDEX).sum()),
                    "patches": int(inputs["pixel_values"].shape[0]),  # the vision tower runs once per image
                }
            )


def flops_per_step(step: dict, model: torch.nn.Module, reference_copy: bool) -> float:
    text = model.config.text_config
    head_size = text.vocab_size * text.hidden_size
    vision = merger = body = body_weights = 0.0
    head_trainable = False
    for name, param in model.named_parameters():
        n = param.numel()
        if "visual" in name and "merger" not in name:
            vision += 2 * n  # frozen: forward only, per patch
        elif "merger" in name:
            merger += (6 if param.requires_grad else 2) * n  # per merged image token (4 patches)
        elif "embed_tokens" in name or "lm_head" in name:
            head_trainable |= param.requires_grad  # a lookup, and the head counted below
        else:
            body += (6 if param.requires_grad else 4) * n  # frozen weights still pass input gradients
            body_weights += n
    flops = body * step["tokens"] + (6 if head_trainable else 4) * head_size * step["response_tokens"]
    flops += vision * step["patches"] + merger * step["patches"] / 4
    attention = 2 * text.num_hidden_layers * text.hidden_size * step["squares"]  # QK^T and AV, forward
    flops += 6 * attention
    if reference_copy:
        flops += 2 * body_weights * step["tokens"] + 2 * head_size * step["response_tokens"] + 2 * attention
    return flops


def peak_flops(override: float | None) -> float:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return 989e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else float("nan")


def fit(stage: str, args, checkpoint: Path, data: Path, root: Path, max_steps: int, ckpt_path: Path | None = None):
    strategy = "ddp" if args.strategy == "ddp" else {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"config": str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"{args.strategy}.json")}}
    lora = {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}} if args.lora else {}
    gpu = args.accelerator == "gpu"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": args.accelerator, "devices": 1, "strategy": strategy, "max_steps": max_steps,
            "precision": "bf16-mixed" if gpu else "32-true", "logger": False, "enable_progress_bar": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0, "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "every_n_train_steps": max_steps}},
                {"class_path": "__main__.Throughput", "init_args": {"warmup": args.warmup}},
            ],
        },
        "model": {
            "class_path": {"sft": "carevl.sft.SFTJudge", "dpo": "carevl.dpo.DPOJudge"}[stage],
            "init_args": {
                "backbone": {"class_path": "carevl.backbone.Backbone", "init_args": {
                    "model": str(checkpoint), "random_init": True, "gradient_checkpointing": args.gradient_checkpointing,
                    "freeze_projector": stage == "dpo", "dtype": "bfloat16" if gpu else "float32", **lora}},
                "lr": 1e-5, "global_batch_size": None, "val_generate": False,
                **({"reference": args.reference} if stage == "dpo" else {}),
            },
        },
        "data": {"class_path": "datamodules.JudgeDataModule", "init_args": {
            "train": str(data / ("sft" if stage == "sft" else "groups")), "kind": "sft" if stage == "sft" else "preference_group",
            "batch_size": args.batch_size, "num_workers": 2, "max_length": 8192}},
    }
    path = root / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return run(["fit", "--config", str(path)] + ([f"--ckpt_path={ckpt_path}"] if ckpt_path else []))


def measure(stage: str, args, checkpoint: Path, data: Path, work: Path) -> None:
    root = work / stage
    root.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cli = fit(stage, args, checkpoint, data, root, max_steps=args.steps)
    steps = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput)).steps
    if not steps:
        print(f"{stage}: no timed steps (raise --steps above --warmup)")
        return
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    flops = sum(flops_per_step(s, cli.model.backbone.hf, stage == "dpo" and args.reference == "copy") for s in steps)
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"{stage}: {len(steps)} timed steps, {tokens / seconds:,.0f} tokens/s, {seconds / len(steps):.3f} s/step, peak memory {memory:.1f} GiB, MFU {flops / seconds / peak_flops(args.peak_tflops):.1%}", flush=True)
    resumed = fit(stage, args, checkpoint, data, root, max_steps=args.steps + 2, ckpt_path=root / "ckpt" / "last.ckpt")
    ok = resumed.trainer.global_step == args.steps + 2
    print(f"{stage}: resumed from step {args.steps} to step {resumed.trainer.global_step}: {'ok' if ok else 'FAILED'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    parser.add_argument("--strategy", default="zero2", help="zero2, zero3, zero2_offload, zero3_offload (configs/deepspeed) or ddp")
    parser.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    parser.add_argument("--reference", default="copy", choices=["copy", "lora_disabled"], help="DPO reference (precomputed needs a pass of its own)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the full language model")
    parser.add_argument("--batch-size", type=int, default=4, help="SFT samples or DPO groups per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--image-size", type=int, default=448, help="image side in pixels (448: 256 image tokens)")
    parser.add_argument("--repeat", type=int, default=8, help="critique length multiplier (8: ~500 response tokens)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="carevl-smoke-"))
    checkpoint = shaped_checkpoint(work / "model", args.shape)
    write_data(work / "data", groups=max(64, 2 * args.batch_size * (args.steps + 2)), image_size=args.image_size, repeat=args.repeat)
    print(f"{args.shape}-shaped Qwen2-VL, {args.strategy}, {'LoRA' if args.lora else 'full'}, batch {args.batch_size}, work dir {work}")
    for stage in args.stages:
        measure(stage, args, checkpoint, work / "data", work)


if __name__ == "__main__":
    main()
