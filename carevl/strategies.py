"""Helpers for the distributed strategies in configs/strategies/.

FSDP wraps each transformer block of the language model and of the vision tower on its own (the
unit that is gathered, run and freed); `transformer_blocks` is that policy for every family in the
backbone's table, found by class name so one config serves them all.

`DeepSpeed` is Lightning's DeepSpeed strategy that resumes on another number of processes through
DeepSpeed's universal checkpoints, and says so when a plain ZeRO checkpoint cannot.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

# Names FSDP's wrappers add inside the modules they wrap.
WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Block classes of the supported families: Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision (Qwen2 + SigLIP), Mllama.
BLOCK_SUFFIXES = ("DecoderLayer", "VisionBlock", "EncoderLayer", "CrossAttentionDecoderLayer")


def _is(strategy: object, name: str) -> bool:
    """Whether `strategy` is Lightning's `name` strategy or a subclass of it (by class name: no import)."""
    return any(cls.__name__ == name for cls in type(strategy).__mro__)


def deepspeed_config(strategy: object) -> dict | None:
    """The config of a DeepSpeed strategy (or a subclass), None for any other strategy or none."""
    return getattr(strategy, "config", None) if _is(strategy, "DeepSpeedStrategy") else None


def zero_stage(config: dict | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config (under stage 3 parameters are partitioned as modules are built)."""
    return (config or {}).get("zero_optimization", {}).get("stage")


def is_fsdp(strategy: object) -> bool:
    """Whether `strategy` is Lightning's FSDP strategy (carevl's included)."""
    return _is(strategy, "FSDPStrategy")


def offloads_optimizer(config: dict | None) -> bool:
    """Whether a DeepSpeed config keeps the optimizer on the CPU (or NVMe): DeepSpeed then refuses
    a torch optimizer and steps with its own CPU Adam."""
    return (config or {}).get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"


def sharded_strategy(strategy: object) -> str | None:
    """The name of a strategy that shards parameters (DeepSpeed ZeRO-3, FSDP), None for the others."""
    if strategy is None:
        return None
    if zero_stage(deepspeed_config(strategy)) == 3:
        return "DeepSpeed ZeRO-3"
    if is_fsdp(strategy):
        return "FSDP"
    return None


def float32_weights(strategy: object) -> str:
    """Which weights a model loaded in a half dtype holds in float32 to train under `strategy`
    (`Backbone.build`): DeepSpeed keeps float32 master weights of its own ("none"); FSDP flattens
    each shard unit's weights into one dtype and computes in half through its mixed precision
    ("all"); any other strategy lets the optimizer step the model's own weights ("trainable")."""
    if deepspeed_config(strategy) is not None:
        return "none"
    return "all" if is_fsdp(strategy) else "trainable"


def whole_weights(strategy: object, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under a strategy that shards parameters (ZeRO-3, FSDP): `module`'s weights gathered whole
    onto rank 0's CPU, by their names in `module` (without FSDP's wrapper names). None on the other
    ranks and under strategies that do not shard. Collective: every rank must call it. ZeRO-3
    gathers one module's weights at a time; FSDP gathers them all onto rank 0's CPU at once."""
    if sharded_strategy(strategy) is None:
        return None
    on_rank0 = strategy.global_rank == 0
    weights: dict[str, torch.Tensor] = {}
    if is_fsdp(strategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(
            strategy.model, writeback=False, rank0_only=True, offload_to_cpu=True
        ):
            if on_rank0:
                for name, param in module.named_parameters():
                    for wrapper in WRAPPER_NAMES:
                        name = name.replace(wrapper, "")
                    weights[name] = param.detach().clone()
    else:  # ZeRO-3
        import deepspeed

        for prefix, submodule in module.named_modules():
            params = list(submodule.named_parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters([param for _, param in params], modifier_rank=None):
                if on_rank0:
                    for name, param in params:
                        weights[f"{prefix}.{name}" if prefix else name] = param.detach().to("cpu", copy=True)
    return weights if on_rank0 else None


def transformer_blocks(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: descend everywhere; wrap a module when its class is a transformer block."""
    if recurse:
        return True
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


class FSDP(FSDPStrategy):
    """Lightning's FSDPStrategy with the settings a judge needs spelled out, so YAML can set them
    (the base class takes FSDP's own options as **kwargs, which a config cannot reach).

    Args:
        sharding_strategy: FULL_SHARD (ZeRO-3-like), SHARD_GRAD_OP (ZeRO-2-like), HYBRID_SHARD
            (full shard within a node, replicate across nodes) or NO_SHARD.
        cpu_offload: keep parameters (and gradients) on the CPU between uses.
        state_dict_type: "sharded" (a torch.distributed.checkpoint directory, a file per rank,
            fast) or "full" (one consolidated file, gathered on rank 0). Both resume on any
            number of processes.
        process_group_backend: None picks nccl on GPUs, gloo on CPU.
    """

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        cpu_offload: bool = False,
        state_dict_type: str = "sharded",
        process_group_backend: str | None = None,
        activation_checkpointing: bool = False,
        **kwargs,
    ):
        super().__init__(
            auto_wrap_policy=transformer_blocks,
            activation_checkpointing_policy=_BlockSet() if activation_checkpointing else None,
            cpu_offload=cpu_offload,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            process_group_backend=process_group_backend,
            use_orig_params=True,  # frozen (vision) and trainable parameters share flat parameters
            **kwargs,
        )


class _BlockSet:
    """Activation-checkpointing policy: the same transformer blocks FSDP wraps."""

    def __call__(self, module: nn.Module) -> bool:
        return type(module).__name__.endswith(BLOCK_SUFFIXES)


def zero_tag(checkpoint: str | Path) -> str | None:
    """The tag (subdirectory) a DeepSpeed checkpoint directory's `latest` file names; None when
    `checkpoint` is not one."""
    latest = Path(checkpoint) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def zero_partitions(checkpoint: str | Path, tag: str) -> int:
    """How many data-parallel processes saved the ZeRO checkpoint `checkpoint`/`tag` (each writes
    its optimizer partition)."""
    names = (path.name for path in (Path(checkpoint) / tag).glob("*optim_states.pt"))
    return len({match.group(1) for name in names if (match := re.search(r"zero_pp_rank_(\d+)_", name))})


def is_universal(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` is a DeepSpeed universal checkpoint (written by `ds_to_universal`)."""
    return (Path(checkpoint) / "latest_universal").is_file()


class DeepSpeed(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy (same arguments) that resumes a fit on any number of processes.

    A ZeRO checkpoint holds one optimizer partition per process (and under ZeRO-3 one weight
    partition), and DeepSpeed cannot re-partition it: resuming with another number of processes
    fails inside DeepSpeed (under ZeRO-3 with a tensor size mismatch). This strategy stops first
    with the way out: convert the checkpoint with DeepSpeed's `ds_to_universal`, whose output holds
    each weight and its optimizer state whole, and resume from that. A universal checkpoint given
    as `--ckpt_path` is loaded as one, with no change to the DeepSpeed config.
    """

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        from lightning.pytorch.trainer.states import TrainerFn

        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if is_universal(checkpoint_path):
            if not fitting:
                raise ValueError(
                    f"{checkpoint_path} is a universal checkpoint, which only `fit` resumes from: export the "
                    "checkpoint it was converted from (tools/export_checkpoint.py) and evaluate that"
                )
            # DeepSpeed reads the setting only while loading (the engine's parsed config; no public setter)
            self.deepspeed_engine._config.load_universal_checkpoint = True
        else:
            tag = zero_tag(checkpoint_path)
            saved = zero_partitions(checkpoint_path, tag) if tag is not None else 0
            if saved and saved != self.world_size and (fitting or self.zero_stage_3):
                universal = f"{str(checkpoint_path).rstrip('/')}-universal"
                raise ValueError(
                    f"{checkpoint_path} was saved by {saved} processes and this run has {self.world_size}: DeepSpeed "
                    "cannot "
                    f"re-partition a ZeRO checkpoint. Resume with {saved} processes, or convert it to a universal "
                    f"checkpoint, which resumes on any number:\n  python -m deepspeed.checkpoint.ds_to_universal "
                    f"--inject_missing_state --input_folder {checkpoint_path}/{tag} --output_folder {universal}/{tag}\n"
                    f"and resume with --ckpt_path {universal}"
                )
        return super().load_checkpoint(checkpoint_path, weights_only)
