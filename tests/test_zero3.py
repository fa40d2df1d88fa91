"""DeepSpeed ZeRO-3 on CPU (DeepSpeed's CPU accelerator, one gloo process): the judge is built
inside Lightning's `zero.Init` context the way `carevl fit` builds it under
configs/strategies/zero3.yaml. Lightning refuses DeepSpeed training without CUDA, so the training
steps themselves are checked on a GPU by tools/gpu_smoke.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_zero3_loads_the_checkpoint_into_partitioned_weights_and_starts_lora_at_zero(tiny_qwen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "zero3_probe.py"), tiny_qwen, free_port()], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Every weight is a ZeRO-3 partition, and every checkpoint weight arrived intact.
    assert report["partitioned"] == report["parameters"]
    assert report["compared"] > 0 and report["equal"] == report["compared"]
    # Adapters start as a no-op (B = 0), so the policy starts at the reference.
    assert report["lora_b"] > 0 and report["lora_b_max"] == 0.0
    # One dtype for DeepSpeed's flat buffer: the adapters are bf16 like the model, not peft's float32.
    assert report["trainable_dtypes"] == [str(torch.bfloat16)]
