"""Run by tests/test_deepspeed.py in its own process (DeepSpeed's CPU accelerator, gloo, world size 1):
training steps of the judge modules through DeepSpeed's engine under ZeRO stage 2 or 3, bf16,
gradient checkpointing on, the head in chunks of 7 response tokens: DPO with LoRA and the
adapters-off reference, SFT with LoRA, and DPO of the whole language model against log-probs
precomputed by `tools/reference_logps.py` (configs/dpo.yaml's setting) and against a frozen copy (under
ZeRO-3 loaded again, partitioned, in its own inference engine). Lightning refuses DeepSpeed without
CUDA, so the engine is driven directly, on the modules' own step functions (`DPOJudge.group_step`,
`SFTJudge`'s loss). Prints what the test checks, as JSON.

With `checkpoint` as its first argument it saves a ZeRO checkpoint of full SFT at step 2 the way
Lightning's DeepSpeed strategy does (`engine.save_checkpoint(path, tag="checkpoint")`), trains on to
step 4, then loads the checkpoint into a fresh engine and trains steps 3 and 4 again; it writes the
step-2 weights for the test to compare an export with."""

import dataclasses
import json
import math
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402

import carevl.cli  # noqa: E402,F401  (what `carevl fit` has imported before it builds the model)
from carevl.backbone import Backbone, LoraSettings  # noqa: E402
from carevl.dpo import DPOJudge  # noqa: E402
from carevl.flops import ModelFlops  # noqa: E402
from carevl.losses import sft_loss  # noqa: E402
from carevl.sft import SFTJudge  # noqa: E402
from datamodules import JudgeDataModule  # noqa: E402
from tools.reference_logps import precompute_reference  # noqa: E402


def gathered(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            out[name] = param.data.clone()
    return out


def engine_config(stage: str) -> dict:
    return {
        "zero_optimization": {"stage": int(stage)},
        "bf16": {"enabled": True},
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
    }


def built(module, config: dict):
    """`configure_model` as Lightning runs it: inside `zero.Init` under ZeRO-3."""
    module._trainer = SimpleNamespace(strategy=DeepSpeedStrategy(config=config))
    if config["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):  # what strategy.model_sharded_context() enters
            module.configure_model()
    else:
        module.configure_model()
    return module


def checkpoint_round_trip(checkpoint: str, sft: str, stage: str, out: str) -> None:
    config = engine_config(stage)
    data = JudgeDataModule(processor=checkpoint, train=sft, kind="sft", batch_size=2, num_workers=0, max_length=512)
    data.setup("fit")
    batches = [b for b, _ in zip(data.train_dataloader(), range(4))]

    def engine_for():
        module = built(SFTJudge(Backbone(checkpoint, dtype="bfloat16", gradient_checkpointing=True)), config)
        trainable = [p for p in module.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=module, model_parameters=trainable, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config
        )
        return module, engine

    def step(module, engine, batch) -> float:
        logps, rows = module.backbone.response_logprobs(batch["inputs"])
        loss = sft_loss(logps, batch.get("weights"), rows)
        engine.backward(loss)
        engine.step()
        return float(loss)

    module, engine = engine_for()
    first = [step(module, engine, b) for b in batches[:2]]
    path = os.path.join(out, "last.ckpt")
    engine.save_checkpoint(path, client_state={"global_step": 2}, tag="checkpoint")
    torch.save(gathered(dict(module.backbone.hf.named_parameters())), os.path.join(out, "step2.pt"))
    uninterrupted = [step(module, engine, b) for b in batches[2:]]
    module, engine = engine_for()
    _, client = engine.load_checkpoint(path, tag="checkpoint")
    resumed = [step(module, engine, b) for b in batches[2:]]
    print(
        json.dumps(
            {"first": first, "uninterrupted": uninterrupted, "resumed": resumed, "client_step": client["global_step"]}
        )
    )


def main(checkpoint: str, groups: str, sft: str, stage: str) -> None:
    config = engine_config(stage)
    # The reference, computed once in the training dtype, as `python tools/reference_logps.py` does: before
    # any ZeRO-3 model exists (transformers then builds every model partitioned).
    precompute_reference(checkpoint, groups, batch_size=2, max_length=512, dtype="bfloat16", device="cpu")
    report = {}
    runs = (
        ("dpo", DPOJudge, groups, "preference_group", {"reference": "lora_disabled", "beta": 0.1}),
        ("sft", SFTJudge, sft, "sft", {}),
        ("dpo_full", DPOJudge, groups, "preference_group", {"reference": "precomputed", "beta": 0.1}),
        ("dpo_copy", DPOJudge, groups, "preference_group", {"reference": "copy", "beta": 0.1}),
    )
    for name, module_class, directory, kind, arguments in runs:
        full = name in ("dpo_full", "dpo_copy")
        lora = None if full else LoraSettings(dropout=0.0)
        # adapters start at zero and need a large step to move the loss in three; the whole model
        # overshoots at that rate on the shapes world's close chosen/rejected critiques
        lr = 2e-3 if full else 1e-2
        backbone = Backbone(
            checkpoint, lora=lora, freeze_projector=full, dtype="bfloat16", gradient_checkpointing=True, logit_chunk=7
        )
        module = built(module_class(backbone, **arguments), config)
        reference = {}
        if name == "dpo_copy":
            if int(stage) == 3:
                module.start_reference_engine(config)  # what on_fit_start does under ZeRO-3
            reference = dict(module.reference_model.named_parameters())
        reference_before = gathered(reference)
        data = JudgeDataModule(
            processor=checkpoint, train=directory, kind=kind, batch_size=2, num_workers=0, max_length=512
        )
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        params = dict(backbone.hf.named_parameters())
        before = gathered(params)
        trainable = [p for p in module.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=module, model_parameters=trainable, optimizer=torch.optim.AdamW(trainable, lr=lr), config=config
        )
        losses = []
        for _ in range(3):
            if kind == "preference_group":
                loss, _ = module.group_step(batch)
            else:
                logps, rows = backbone.response_logprobs(batch["inputs"])
                loss = sft_loss(logps, batch.get("weights"), rows)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        after = gathered(params)
        reference_after = gathered(reference)
        moved = [n for n in params if not torch.equal(before[n], after[n])]
        report[name] = {
            "losses": losses,
            "finite": all(math.isfinite(v) for v in losses),
            "head_chunk": backbone.head_chunk,
            "moved": len(moved),
            "moved_outside_lora": [n for n in moved if "lora_" not in n],
            "lora": sum("lora_" in n for n in params),
            "trainable": sum(p.requires_grad for p in params.values()),
            "moved_frozen": [n for n in moved if not params[n].requires_grad],
            "reference_partitioned": bool(reference) and all(hasattr(p, "ds_id") for p in reference.values()),
            "model_flops": dataclasses.asdict(ModelFlops.of(backbone.hf)),  # ZeRO-3 partitions: counted by ds_numel
            "reference_moved": [n for n in reference if not torch.equal(reference_before[n], reference_after[n])],
        }
    print(json.dumps(report))


if __name__ == "__main__":
    *arguments, port = sys.argv[1:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    if arguments[0] == "checkpoint":
        checkpoint_round_trip(*arguments[1:])
    else:
        main(*arguments)
    torch.distributed.destroy_process_group()
