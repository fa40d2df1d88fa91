"""Shared fixtures: tiny local checkpoints and shapes-world shards, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    from carevl.standins.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2vl"), family="qwen2_vl", hidden=64, layers=2))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from carevl.standins.world import write_world

    out = tmp_path_factory.mktemp("world")
    write_world(str(out), train=96, heldout=16, captions=32, shard_size=32, seed=0)
    return out


@pytest.fixture(scope="session", params=["qwen2_vl", "llava_onevision", "mllama"])
def tiny_any(request, tmp_path_factory) -> str:
    """A tiny checkpoint of each family in the backbone's family table."""
    from carevl.standins.tiny import build_tiny_model

    return str(
        build_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), family=request.param, hidden=64, layers=2)
    )
