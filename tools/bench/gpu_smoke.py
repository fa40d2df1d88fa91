"""GPU smoke and throughput check: SFT and DPO steps of a Qwen2-VL-2B- or 7B-shaped judge with
random weights (built from a config and saved as a checkpoint, nothing downloaded), through the
real CLI, modules, data pipeline and DeepSpeed, loading that checkpoint the way a user's run loads
theirs. Prints tokens/s, peak memory and MFU, and checks that a run resumed from a saved
checkpoint continues from its step.

    python -m tools.bench.gpu_smoke --shape 2b --strategy zero2            # full fine-tuning
    python -m tools.bench.gpu_smoke --shape 7b --strategy zero3 --lora      # 7B on one 80 GB GPU
    python -m tools.bench.gpu_smoke --shape tiny --strategy ddp --accelerator cpu --steps 2   # CPU dry run
    python -m tools.bench.gpu_smoke --shape 2b --narrow --strategy ddp --accelerator cpu --batch-size 4 \
        --steps 3 --warmup 2 --count-ops [--compile]   # a 2B step's kernel-sized operations, on CPU

The DPO reference is, by default, what the configs use: a frozen copy under DDP and ZeRO-2; under
ZeRO-3 and FSDP the policy with its adapters off (LoRA) or log-probs precomputed by
`tools/reference_logps.py` (timed apart). Gradient checkpointing is on (--no-gradient-checkpointing
turns it off). Each phase (timed steps, resume) runs in its own process: a finished DeepSpeed run
keeps its GPU memory until its process ends. --profile prints torch.profiler's top operators over
three steps. --count-ops counts each step's kernel-sized operations by phase; with --narrow (the
shape's depth and images, small widths) a CPU counts what a real-size step launches. --compile
compiles the decoder layers. Run it from the repository's root.

MFU is the model FLOPs of the work each step really computes (`carevl.flops`: a DPO group's prompt
once when prompts are packed, reference forwards and the frozen vision tower included,
gradient-checkpointing recomputation not) over the GPU's dense bf16 peak (`carevl.flops.PEAK_TFLOPS`;
--peak-tflops for others). Training runs log the same figures through `carevl.callbacks.Throughput`.
"""

import argparse
import functools
import gc
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from carevl.cli import run
from carevl.flops import peak_flops
from carevl.images import png_bytes
from carevl.schema import PreferenceGroupSample, SFTSample, ShardWriter
from carevl.standins import shapes
from carevl.standins.tiny import build_tiny_model
from tools.reference_logps import precompute_reference

# Qwen2-VL-2B/7B-Instruct language-model and vision-tower shapes (their config.json files).
SHAPES = {
    "tiny": None,
    "2b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}
QWEN2_VL_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}  # Qwen2-VL's min_pixels and max_pixels
VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
}
# --narrow: the same depth, heads' sizes and images with small widths. A step then dispatches the
# same operators as the real shape (their number follows layers, sequences and images, not width),
# so a CPU run counts the host-side work that bounds small-batch GPU steps.
NARROW_TEXT = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1}
NARROW_VISION = {"embed_dim": 128, "num_heads": 2}


def shaped_checkpoint(out: Path, shape: str, device: str, narrow: bool = False) -> Path:
    """A checkpoint of the requested size with random weights: the tiny checkpoint's processor, the
    shape's config (`narrow`: its small-width twin), and weights drawn on `device` and saved in bf16
    (runs then load it like a real one)."""
    build_tiny_model(out, family="qwen2_vl")
    if SHAPES[shape] is None:
        return out
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = json.loads((out / "config.json").read_text())
    sizes = {**SHAPES[shape], **(NARROW_TEXT if narrow else {})}
    text = {**config["text_config"], **sizes, "max_position_embeddings": 32768, "rope_theta": 1000000.0}
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
    config["text_config"] = text
    config["vision_config"] = {
        **config["vision_config"],
        **VISION,
        **(NARROW_VISION if narrow else {}),
        "hidden_size": sizes["hidden_size"],
    }
    config.update({k: v for k, v in sizes.items() if k in ("hidden_size", "vocab_size", "tie_word_embeddings")})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    processor = json.loads((out / "processor_config.json").read_text())
    processor["image_processor"]["size"] = QWEN2_VL_PIXELS  # the tiny processor shrinks images to 56 x 56
    (out / "processor_config.json").write_text(json.dumps(processor, indent=1))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    model.save_pretrained(out)
    print(
        f"{shape}-shaped{' (narrow)' if narrow else ''} checkpoint: "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters",
        flush=True,
    )
    del model
    return out


def lengthened(critique: str, repeat: int) -> str:
    """A critique with its analysis said `repeat` times before the verdict line."""
    analysis, verdict = critique.rsplit(" Overall", 1)
    return " ".join([analysis] * repeat + ["Overall" + verdict])


def write_data(out: Path, groups: int, image_size: int, repeat: int) -> None:
    """SFT samples and preference groups of the shapes world, with large images and long critiques."""
    rng = random.Random(0)
    items = shapes.judge_items(groups, seed=0)
    with (
        ShardWriter(out / "sft", prefix="sft", max_count=256, kind="sft") as sft,
        ShardWriter(out / "groups", prefix="groups", max_count=256, kind="preference_group") as dpo,
    ):
        for item in items:
            image = png_bytes(shapes.render(item.scene, rng, size=image_size))
            fields = {**item.fields(), "image": image}
            sft.write(SFTSample(**fields, target=lengthened(item.critique(), repeat), source="smoke"))
            dpo.write(
                PreferenceGroupSample(
                    **fields,
                    chosen=lengthened(item.critique(), repeat),
                    rejected=[lengthened(t, repeat) for t in shapes.worse_critiques(item)],
                )
            )


class StepTimes(Callback):
    """Step times after `warmup` steps, each with the work the step asked of the model
    (`carevl.flops`: counted by the loader) and whether a reference forward ran."""

    def __init__(self, warmup: int):
        self.warmup, self.steps = warmup, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step > self.warmup:
            work, reference_forward = module.step_work(batch)
            self.steps.append(
                {"seconds": time.perf_counter() - self.start, "work": work, "reference_forward": reference_forward}
            )


class Profile(Callback):
    """torch.profiler over `steps` steps after `warmup`: the top operators by GPU and by CPU time."""

    def __init__(self, warmup: int, steps: int = 3):
        self.first, self.last, self.profiler = warmup + 1, warmup + steps, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.profiler is not None and trainer.global_step == self.last:
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            for key in (["cuda_time_total"] if torch.cuda.is_available() else []) + ["cpu_time_total"]:
                print(events.table(sort_by=key, row_limit=15, max_name_column_width=60), flush=True)
            self.profiler = None


class OperatorCount(Callback):
    """Kernel-sized operations per step after `warmup`, by phase (forward, backward, optimizer),
    from torch.profiler's events: on a CPU the innermost operators (views, allocations and type
    queries left out: they launch nothing) and the kernels torch.compile generated; on a GPU the
    kernel launches themselves. Their number bounds how fast a step can be issued when the host,
    not the GPU, is the limit, and follows depth, sequences and images, not width (see --narrow)."""

    PHASES = ("forward", "backward", "optimizer")
    # return tensors but launch nothing: allocation and metadata
    NO_KERNEL = {
        "empty",
        "empty_strided",
        "empty_like",
        "resize_",
        "set_",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "_reshape_alias",
        "_unsafe_view",
        "alias",
        "detach_",
        "as_strided_",
    }

    def __init__(self, warmup: int):
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True  # compiled CPU kernels become profiler events
        self.warmup, self.steps, self.profiler = warmup, [], None

    @staticmethod
    def mark(phase: str) -> None:
        """An empty profiler range whose start time marks where `phase` begins."""
        with torch.autograd.profiler.record_function(f"phase::{phase}"):
            pass

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.warmup:
            cuda = (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )  # launches show as runtime calls
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, *cuda])
            self.profiler.__enter__()
            self.mark("forward")

    def on_before_backward(self, trainer, module, loss):
        if self.profiler is not None:
            self.mark("backward")

    def on_after_backward(self, trainer, module):
        if self.profiler is not None:
            self.mark("optimizer")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.steps.append(self.count(self.profiler.events()))
            self.profiler = None

    @staticmethod
    def kernel(name: str) -> bool:
        """A compiled CPU kernel (graph_<n>_cpp_fused_...) or, on a GPU, the runtime call of any launch."""
        return "cpp_fused" in name or name.startswith(
            ("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync", "cudaMemsetAsync")
        )

    @classmethod
    @functools.cache
    def launches(cls, name: str) -> bool:
        """Whether an event stands for work on the device: a compiled kernel, a host read of a device
        scalar (a sync), or an operator that computes a tensor (not a view, allocation or a type query)."""
        if cls.kernel(name) or name == "aten::_local_scalar_dense":
            return True
        if not name.startswith("aten::") or name[6:] in cls.NO_KERNEL:
            return False
        packet = getattr(torch.ops.aten, name[6:], None)
        if packet is None:
            return True
        overloads = [getattr(packet, overload) for overload in packet.overloads()]
        computes = any(str(r.type) == "Tensor" for o in overloads for r in o._schema.returns)
        return computes and not any(o.is_view for o in overloads)

    @classmethod
    def count(cls, events) -> dict[str, dict[str, int]]:
        """{phase: {operator: count}} of the innermost events that launch: an operator built from
        others (linear from mm, to from copy_) counts through them, once."""
        below: dict[int, bool] = {}

        def launches_below(event) -> bool:  # whether anything under `event` launches
            if id(event) not in below:
                below[id(event)] = any(
                    cls.launches(child.name) or launches_below(child) for child in event.cpu_children
                )
            return below[id(event)]

        counts = {phase: {} for phase in cls.PHASES}
        marks = sorted(
            (e.time_range.start, e.name.removeprefix("phase::")) for e in events if e.name.startswith("phase::")
        )
        for event in events:
            if not cls.launches(event.name) or launches_below(event):
                continue
            phase = next((name for start, name in reversed(marks) if start <= event.time_range.start), cls.PHASES[0])
            name = (
                ("launches" if event.name.startswith("cu") else "compiled kernels")
                if cls.kernel(event.name)
                else event.name.removeprefix("aten::")
            )
            counts[phase][name] = counts[phase].get(name, 0) + 1
        return counts

    def report(self, label: str) -> None:
        if not self.steps:
            return
        n = len(self.steps)
        lines, total = [], 0.0
        for phase in self.PHASES:
            ops: dict[str, int] = {}
            for step in self.steps:
                for name, count in step[phase].items():
                    ops[name] = ops.get(name, 0) + count
            top = ", ".join(
                f"{name} {count / n:,.0f}" for name, count in sorted(ops.items(), key=lambda kv: -kv[1])[:8]
            )
            lines.append(f"  {phase} {sum(ops.values()) / n:,.0f}: {top}")
            total += sum(ops.values()) / n
        print(f"{label}: {total:,.0f} kernel-sized operations/step\n" + "\n".join(lines), flush=True)


def reference_mode(args) -> str:
    """The DPO reference the configs would use with this strategy (or the one asked for)."""
    if args.reference != "auto":
        return args.reference
    if args.strategy.startswith("zero3") or args.strategy == "fsdp":  # parameters sharded: no copy
        return "lora_disabled" if args.lora else "precomputed"
    return "copy"


def per_step(stage: str, args) -> int:
    """SFT samples or DPO groups per step (a child process times one size)."""
    return (args.batch_size if stage == "sft" else args.groups_per_step)[0]


def fit(
    stage: str,
    args,
    checkpoint: Path,
    data: Path,
    root: Path,
    max_steps: int,
    ckpt_path: Path | None = None,
    save: bool = False,
):
    """`carevl fit` of one stage, resumed from `ckpt_path` if given; `save`: a checkpoint at `max_steps`."""
    if args.strategy == "ddp":
        strategy = "ddp"
    elif args.strategy == "fsdp":
        strategy = {"class_path": "carevl.strategies.FSDP", "init_args": {"sharding_strategy": "FULL_SHARD"}}
    else:
        strategy = {
            "class_path": "carevl.strategies.DeepSpeed",
            "init_args": {
                "config": str(Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / f"{args.strategy}.json")
            },
        }
    lora = {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}} if args.lora else {}
    gpu = args.accelerator == "gpu"
    callbacks = [{"class_path": "__main__.StepTimes", "init_args": {"warmup": args.warmup}}]
    if args.profile and ckpt_path is None:
        callbacks.append({"class_path": "__main__.Profile", "init_args": {"warmup": args.warmup}})
    if args.count_ops and ckpt_path is None:
        callbacks.append({"class_path": "__main__.OperatorCount", "init_args": {"warmup": args.warmup}})
    if save:
        # the configs' checkpoints: written once (Lightning's save_last writes a second full copy)
        callbacks.append(
            {
                "class_path": "carevl.callbacks.Checkpoints",
                "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": max_steps},
            }
        )
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": args.accelerator,
            "devices": 1,
            "strategy": strategy,
            "max_steps": max_steps,
            "precision": "bf16-mixed" if gpu else "32-true",
            "logger": False,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "default_root_dir": str(root),
            "callbacks": callbacks,
            "enable_checkpointing": save,
        },
        "model": {
            "class_path": {"sft": "carevl.sft.SFTJudge", "dpo": "carevl.dpo.DPOJudge"}[stage],
            "init_args": {
                "backbone": {
                    "class_path": "carevl.backbone.Backbone",
                    "init_args": {
                        "model": str(checkpoint),
                        "gradient_checkpointing": args.gradient_checkpointing,
                        "compile_layers": args.compile,
                        "batch_vision_attention": args.batch_vision_attention,
                        "freeze_projector": stage == "dpo",
                        "dtype": "bfloat16" if gpu else "float32",
                        **lora,
                    },
                },
                "lr": 1e-5,
                "val_generate": False,
                **({"reference": reference_mode(args)} if stage == "dpo" else {}),
            },
        },
        "data": {
            "class_path": "datamodules.JudgeDataModule",
            "init_args": {
                "train": str(data / ("sft" if stage == "sft" else "groups")),
                "kind": "sft" if stage == "sft" else "preference_group",
                "batch_size": per_step(stage, args),
                "num_workers": 4,
                "max_length": 8192,
            },
        },
    }
    path = root / f"{stage}{'-resumed' if ckpt_path else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return run(["fit", "--config", str(path)] + ([f"--ckpt_path={ckpt_path}"] if ckpt_path else []))


def time_steps(stage: str, args, checkpoint: Path, data: Path, root: Path, save: bool = False) -> None:
    """Time `args.steps` steps of one stage; `save`: a checkpoint at the last one, for `resume`."""
    reference = reference_mode(args) if stage == "dpo" else None
    if reference == "precomputed":
        for earlier in (data / "groups").glob("reference-logps*"):
            earlier.unlink()  # an earlier child's files would be reused, and the precompute not timed
        start = time.perf_counter()
        device = "cuda" if args.accelerator == "gpu" else "cpu"
        precompute_reference(
            str(checkpoint),
            data / "groups",
            batch_size=per_step(stage, args),
            max_length=8192,
            dtype="bfloat16" if device == "cuda" else "float32",
            device=device,
        )
        print(
            f"dpo: reference log-probs precomputed in {time.perf_counter() - start:.1f} s (not in the step times)",
            flush=True,
        )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    try:
        cli = fit(stage, args, checkpoint, data, root, max_steps=args.steps, save=save)
    except torch.cuda.OutOfMemoryError as error:
        print(
            f"{stage}: out of GPU memory ({str(error).splitlines()[0]}); try a smaller batch, --lora, or an offload "
            "strategy",
            flush=True,
        )
        return
    steps = next(c for c in cli.trainer.callbacks if isinstance(c, StepTimes)).steps
    if not steps:
        print(f"{stage}: no timed steps (raise --steps above --warmup)", flush=True)
        return
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(s["work"]["tokens"] for s in steps)
    model_flops = cli.model.backbone.model_flops
    flops = sum(model_flops.step(s["work"], s["reference_forward"]) for s in steps)
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else peak_flops(torch.cuda.get_device_name(), "bf16-mixed")
        if torch.cuda.is_available()
        else None
    )
    mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a (no known peak: --peak-tflops)"
    size = per_step(stage, args)
    label = (
        f"sft batch {size}" if stage == "sft" else f"dpo {size} group{'s' if size > 1 else ''} (reference {reference})"
    )
    for callback in cli.trainer.callbacks:
        if isinstance(callback, OperatorCount):
            callback.report(label)
    print(
        f"{label}: {len(steps)} timed steps, {tokens / len(steps):,.0f} tokens/step, {tokens / seconds:,.0f} "
        f"tokens/s, {seconds / len(steps):.3f} s/step, peak memory {memory:.1f} GiB, {flops / seconds / 1e12:.3g} "
        f"model TFLOP/s, MFU {mfu}",
        flush=True,
    )


def resume(stage: str, args, checkpoint: Path, data: Path, root: Path) -> None:
    """Resume from the checkpoint `time_steps` saved and train two steps more."""
    if not (root / "ckpt" / "last.ckpt").exists():
        print(f"{stage}: no checkpoint to resume from", flush=True)
        return
    resumed = fit(stage, args, checkpoint, data, root, max_steps=args.steps + 2, ckpt_path=root / "ckpt" / "last.ckpt")
    ok = resumed.trainer.global_step == args.steps + 2
    print(
        f"{stage}: resumed from step {args.steps} to step {resumed.trainer.global_step}: {'ok' if ok else 'FAILED'}",
        flush=True,
    )


PHASES = {"time": time_steps, "time_and_save": functools.partial(time_steps, save=True), "resume": resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    parser.add_argument(
        "--strategy",
        default="zero2",
        help="zero2, zero3, zero2_offload, zero3_offload (configs/deepspeed), fsdp (FULL_SHARD, "
        "carevl.strategies.FSDP) or ddp",
    )
    parser.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    parser.add_argument(
        "--reference",
        default="auto",
        choices=["auto", "copy", "lora_disabled", "precomputed"],
        help="DPO reference (auto: copy, or under ZeRO-3 and FSDP lora_disabled with LoRA and precomputed without)",
    )
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the full language model")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[8],
        help="SFT samples per step; several sizes are timed one after another (MFU against tokens per step), "
        "the last one resumed",
    )
    parser.add_argument(
        "--groups-per-step",
        type=int,
        nargs="+",
        default=[2],
        help="DPO groups (1 chosen + 4 worse critiques each) per step; several like --batch-size",
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--image-size", type=int, default=448, help="image side in pixels (448: 256 image tokens)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=8,
        help="critique length multiplier (8: ~250 response tokens with the tiny tokenizer)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as the 7B configs (on by default)",
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators over three steps")
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="count the kernel-sized operations of each step (see --narrow); slows the timed steps",
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the decoder layers (backbone compile_layers: true)"
    )
    parser.add_argument(
        "--batch-vision-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one vision attention call per image size and layer (backbone batch_vision_attention; the default)",
    )
    parser.add_argument(
        "--narrow",
        action="store_true",
        help="the shape's depth and image sizes at small widths: counts a real shape's operators on CPU",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="save the last size's checkpoint and resume from it (--no-resume: timing only, no checkpoint written)",
    )
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # STAGE:PHASE, run in a child process
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="carevl-smoke-"))
    if args.phase:
        stage, phase = args.phase.split(":")
        (work / stage).mkdir(parents=True, exist_ok=True)
        PHASES[phase](stage, args, work / "model", work / "data", work / stage)
        return
    shaped_checkpoint(work / "model", args.shape, "cuda" if args.accelerator == "gpu" else "cpu", narrow=args.narrow)
    most = max(args.batch_size + args.groups_per_step)
    write_data(
        work / "data", groups=max(64, 2 * most * (args.steps + 2)), image_size=args.image_size, repeat=args.repeat
    )
    print(
        f"{args.shape}-shaped Qwen2-VL, {args.strategy}, {'LoRA' if args.lora else 'full'}, SFT batch "
        f"{'/'.join(map(str, args.batch_size))}, DPO {'/'.join(map(str, args.groups_per_step))} group(s) per step, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"{'compiled' if args.compile else 'eager'} layers, vision attention "
        f"{'by image size' if args.batch_vision_attention else 'per image'}, work dir {work}",
        flush=True,
    )
    for stage in args.stages:
        # One process per phase: a finished DeepSpeed run keeps its GPU memory until its process ends.
        option, sizes = (
            ("--batch-size", args.batch_size) if stage == "sft" else ("--groups-per-step", args.groups_per_step)
        )
        for size in sizes:
            phases = ["time_and_save", "resume"] if args.resume and size == sizes[-1] else ["time"]
            for phase in phases:  # the later option wins in the child's parse
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "tools.bench.gpu_smoke",
                        *sys.argv[1:],
                        option,
                        str(size),
                        "--work",
                        str(work),
                        "--phase",
                        f"{stage}:{phase}",
                    ],
                    check=False,
                )
            shutil.rmtree(work / stage / "ckpt", ignore_errors=True)  # a full-model ZeRO checkpoint is tens of GB


if __name__ == "__main__":
    main()
