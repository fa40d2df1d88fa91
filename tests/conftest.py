"""Shared fixtures: tiny local checkpoints and shapes-world shards, built once per test session."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    from carevl.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2vl"), family="qwen2_vl", hidden=64, layers=2))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from carevl.shapes import write_world

    out = tmp_path_factory.mktemp("world")
    write_world(str(out), train=96, heldout=16, captions=32, shard_size=32, seed=0)
    return out


def image_of(item) -> "Image.Image":
    from PIL import Image

    return Image.open(io.BytesIO(item.image)).convert("RGB")


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


@pytest.fixture(scope="session", params=["qwen2_vl", "llava_onevision", "mllama"])
def tiny_any(request, tmp_path_factory) -> str:
    """A tiny checkpoint of each family in the backbone's family table."""
    from carevl.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), family=request.param, hidden=64, layers=2))
