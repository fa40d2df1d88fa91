"""Run by tests/test_deepspeed.py in its own process (DeepSpeed's CPU accelerator, gloo, world size 1):
a judge module's `configure_model` inside Lightning's ZeRO-3 context, as `carevl fit` runs it under
`configs/strategies/zero3.yaml`. Prints what the test checks, as JSON."""

import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

import carevl.cli  # noqa: E402,F401  (what `carevl fit` has imported before it builds the model)
from carevl.backbone import Backbone, LoraSettings  # noqa: E402
from carevl.dpo import DPOJudge  # noqa: E402


def main(checkpoint: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1}
    # The checkpoint loaded plainly, before anything registers the ZeRO-3 config with transformers.
    saved = dict(AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.bfloat16).named_parameters())
    strategy = DeepSpeedStrategy(config=config)
    module = DPOJudge(Backbone(checkpoint, lora=LoraSettings(dropout=0.0), dtype="bfloat16"), reference="lora_disabled")
    module._trainer = SimpleNamespace(strategy=strategy)
    with deepspeed.zero.Init(config_dict_or_path=config):  # what strategy.model_sharded_context() enters
        module.configure_model()
    params = dict(module.backbone.hf.named_parameters())
    compared = equal = 0
    lora_b = []
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param]):
            if "lora_B" in name:
                lora_b.append(float(param.data.abs().max()))
            key = name.replace(".base_layer", "")
            if key in saved:
                compared += 1
                equal += torch.equal(param.data, saved[key])
    print(
        json.dumps(
            {
                "parameters": len(params),
                "partitioned": sum(hasattr(p, "ds_id") for p in params.values()),
                "compared": compared,
                "equal": equal,
                "lora_b": len(lora_b),
                "lora_b_max": max(lora_b),
                "trainable_dtypes": sorted({str(p.dtype) for p in params.values() if p.requires_grad}),
            }
        )
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
