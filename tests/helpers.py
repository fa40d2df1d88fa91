"""What many tests share: a training run through the real CLI and its logged metrics, shard sets
with planted defects, world items ingested for curation, tools loaded from their files, and
`carevl` (or another module of the project) run in a child process, for the tests that start
several processes (gloo on CPU) or run the shipped configs from a working directory of their own.
Code run inside those processes (callbacks, strategies, scripts) lives in tests/workers/."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def fit(tmp_path, model, train, val=None, trainer=None, module="carevl.sft.SFTJudge", module_args=None, **overrides):
    """`carevl fit` in-process from a config written to `tmp_path`, CSV-logged there: `module` on
    the checkpoint `model` and the shards `train` (and `val`), CPU, 3 steps unless said. `trainer`
    and `module_args` update those sections; `backbone`, `lr`, `max_steps` and `limit_val_batches`
    are read from `overrides`, the rest of which go to the datamodule."""
    from carevl.cli import run

    return run(
        ["fit", "--config", str(fit_config(tmp_path, model, train, val, trainer, module, module_args, **overrides))]
    )


def fit_config(
    tmp_path, model, train, val=None, trainer=None, module="carevl.sft.SFTJudge", module_args=None, **overrides
):
    """The config `fit` runs, written to `tmp_path`/config.yaml; its path."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": overrides.pop("max_steps", 3),
            "precision": "32-true",
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "limit_val_batches": overrides.pop("limit_val_batches", 1),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "run"},
            },
            **(trainer or {}),
        },
        "model": {
            "class_path": module,
            "init_args": {
                "backbone": {
                    "class_path": "carevl.backbone.Backbone",
                    "init_args": {"model": model, **overrides.pop("backbone", {})},
                },
                "lr": overrides.pop("lr", 1e-3),
                "warmup_ratio": 0.0,
                "max_new_tokens": 8,
                **(module_args or {}),
            },
        },
        "data": {
            "class_path": "datamodules.JudgeDataModule",
            "init_args": {
                "train": str(train),
                "val": [str(v) for v in val] if isinstance(val, list) else str(val) if val else None,
                "batch_size": 4,
                "num_workers": 1,
                "max_length": 256,
                **overrides,
            },
        },
    }
    path = Path(tmp_path) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(tmp_path) -> list[dict]:
    with open(next(Path(tmp_path).rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def write_bad_shards(directory, n_good=20):
    """Good samples plus one corrupt image, one record missing a field and one over-length sample."""
    from carevl import schema
    from carevl.standins import shapes

    items = shapes.judge_items(n_good + 2, seed=3)
    with schema.ShardWriter(directory, prefix="bad", max_count=8, kind="sft") as writer:
        for index, it in enumerate(items):
            sample = schema.SFTSample(**it.fields(), target=it.critique(), source="test")
            if index == 1:
                sample.image = b"\x89PNG\r\n\x1a\n not really a png"
            if index == 2:
                sample.target = "word " * 600
            writer.write(sample)
            if index == 3:  # a record without 'target', written straight to the tar
                raw = schema.encode(sample)
                record = json.loads(raw["json"])
                del record["target"]
                raw.update(__key__="missing-target", json=json.dumps(record).encode())
                writer._writer.write(raw)  # planted past the contract check, and counted
                writer._count += 1
    return n_good


def ingest_world(workdir: str | Path, items: int, seed: int) -> dict:
    """`items` shapes-world questions written as a questions file under `workdir`/input and ingested
    into `workdir`, as the demo pipeline does."""
    from carevl.curation.stages import ingest
    from carevl.standins.world import write_questions

    source = write_questions(Path(workdir) / "input" / "questions.jsonl", items, seed=seed)
    return ingest(str(workdir), source=str(source))


def split_world(workdir: str, items: int, seed: int) -> None:
    """Curation I up to the confidence split on `items` world items, with simulated models: two
    candidates, a captioner, a 70%-right judge and three experts (tau 2), so that some pairs are
    low-confidence."""
    from carevl.curation import labels, stages
    from carevl.standins.simulated import SimulatedAnswerer, SimulatedCaptioner, SimulatedExpert, SimulatedJudge

    ingest_world(workdir, items, seed)
    stages.candidates(
        workdir, {f"m{e}": (lambda e=e: SimulatedAnswerer(f"m{e}", workdir, error_rate=e / 10)) for e in (2, 5)}
    )
    stages.captions(workdir, lambda: SimulatedCaptioner("cap", workdir))
    stages.pairs(workdir, max_pairs_per_item=3)
    labels.judge(workdir, model=lambda: SimulatedJudge("judge", workdir, accuracy=0.7))
    labels.votes(workdir, {f"e{i}": (lambda i=i: SimulatedExpert(f"e{i}", error_rate=0.25)) for i in range(3)})
    labels.split(workdir, tau=2)


def image_of(item):
    """The RGB image of a shapes-world item."""
    from carevl.images import load_image

    return load_image(item.image)


def compiled_graph(output: torch.Tensor) -> bool:
    """Whether a compiled region (torch.compile's autograd function) produced part of `output`."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in type(node).__name__:
            return True
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return False


def load_tool(path: str):
    """A script under tools/ (e.g. "export_checkpoint" or "bench/gpu_smoke") loaded as a module."""
    spec = importlib.util.spec_from_file_location(Path(path).name, ROOT / "tools" / f"{path}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def environment(**env: str) -> dict[str, str]:
    """The environment of a child process: the project importable, offline, outside any SLURM job
    the tests themselves run in (whose ranks it must not take), with `env` on top."""
    variables = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    variables.pop("SLURM_JOB_ID", None)
    return {**variables, **env}


def python_module(module: str, *arguments: str, cwd: Path = ROOT, fails: bool = False, **env: str) -> str:
    """`python -m MODULE ARGUMENTS...` in `cwd`, on its own rendezvous port; its stderr. Fails the
    test with the end of its stderr when it fails (with `fails`: when it succeeds)."""
    variables = environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), **env)
    done = subprocess.run(
        [sys.executable, "-m", module, *arguments], cwd=cwd, env=variables, capture_output=True, text=True, timeout=600
    )
    assert (done.returncode != 0) == fails, done.stderr[-3000:]
    return done.stderr


def carevl(command: str, config: Path | str, *arguments: str, cwd: Path = ROOT, fails: bool = False, **env: str) -> str:
    """`carevl COMMAND --config CONFIG ARGUMENTS...` (see `python_module`)."""
    return python_module("carevl.cli", command, "--config", str(config), *arguments, cwd=cwd, fails=fails, **env)


def with_qwen2_vl_decoding_defaults(checkpoint: str | Path, out: Path, repetition_penalty: float = 1.05) -> Path:
    """A copy of a tiny checkpoint whose generation_config.json holds Qwen2-VL-7B-Instruct's decoding
    defaults (top_k 1, top_p 0.001, temperature 0.01, repetition_penalty 1.05, or stronger to see it
    on a tiny model's few tokens), which transformers merges into every generate call that does not
    set them."""
    import json
    import shutil

    shutil.copytree(checkpoint, out)
    config = json.loads((out / "generation_config.json").read_text())
    config.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.01, repetition_penalty=repetition_penalty)
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


def photo_like(seed: int, size: tuple[int, int] = (320, 240), fmt: str = "PNG") -> bytes:
    """A textured picture (smooth colour field, discs, grain) whose perceptual hash behaves like a
    photograph's: pictures of different seeds are 16 or more of 64 bits apart."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    picture = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(10, 60)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    grain = rng.normal(0, 8, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(picture, dtype=float) + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def reencoded(image: bytes, scale: float = 1.0, quality: int = 85) -> bytes:
    """The picture resized by `scale` and saved again as JPEG."""
    import io

    from PIL import Image

    picture = Image.open(io.BytesIO(image)).convert("RGB")
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=quality)
    return out.getvalue()


def train_tiny_judge(path: Path, steps: int = 150) -> Path:
    """A tiny Qwen2-VL judge saved at `path` after `steps` plain AdamW steps on shapes-world critiques
    (~10 s): it has learnt the critique template and the verdict line, so greedy decoding is decided
    by clear margins, which engines that round differently still agree on. A random model is no
    test of agreement: its near-equal logits let rounding pick different tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from carevl.encoding import Encoder
    from carevl.images import load_image
    from carevl.prompts import judge_prompt, user_turn
    from carevl.standins.shapes import judge_items
    from carevl.standins.tiny import build_tiny_model

    build_tiny_model(path, family="qwen2_vl", hidden=128, layers=2)
    model, processor = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    encoder = Encoder(processor)
    samples = [
        encoder.encode(load_image(item.image), user_turn(judge_prompt(item.question, item.responses)), item.critique())
        for item in judge_items(32, seed=0)
    ]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        model(**{k: v for k, v in samples[step % len(samples)].items() if k != "prompt_length"}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
