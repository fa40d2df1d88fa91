"""Export a training checkpoint to a Hugging Face checkpoint (model + processor).

    python tools/export_checkpoint.py --config configs/sft.yaml --ckpt runs/sft/checkpoints/last.ckpt \
        --out runs/sft/hf-last

`--ckpt` may be:
- a Lightning checkpoint file (DDP, or FSDP with state_dict_type "full");
- a DeepSpeed ZeRO checkpoint directory (what Lightning's DeepSpeed strategy saves; its shards are
  consolidated to fp32 with DeepSpeed's own tool, which needs the `deepspeed` package);
- an FSDP "sharded" checkpoint directory (torch.distributed.checkpoint's format): only the model's
  weights are read from it, straight into the model, without the optimizer's state.

The model is built from the same training config on the CPU, the weights are loaded with
`weights_only`, then `Backbone.export` writes them (LoRA merged unless --keep-lora).
"""

import argparse
import tempfile
from pathlib import Path

import torch

from carevl.callbacks import trains_a_judge
from carevl.cli import run


def state_dict_of(checkpoint: Path, module: torch.nn.Module) -> dict:
    """The module's weights saved in `checkpoint` (any of the formats above), by state-dict key."""
    if (checkpoint / ".metadata").is_file():  # FSDP sharded: Lightning saves the weights under "model"
        import torch.distributed.checkpoint as dcp

        saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        wanted = {"model": {k: v for k, v in module.state_dict().items() if f"model.{k}" in saved}}
        dcp.load(wanted, checkpoint_id=str(checkpoint), no_dist=True)
        return wanted["model"]
    if checkpoint.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "consolidated.pt"
            convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(target))
            return torch.load(target, map_location="cpu", weights_only=True)["state_dict"]
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def export(config: str, checkpoint: str, out: str, merge_lora: bool = True) -> Path:
    cli = run(
        [
            "--config",
            config,
            "--trainer.strategy=auto",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.num_nodes=1",
            "--trainer.logger=false",
        ],
        subcommand=False,
    )
    module = cli.model
    module.configure_model()
    missing, unexpected = module.load_state_dict(state_dict_of(Path(checkpoint), module), strict=False)
    trained = [k for k in missing if k.startswith("backbone.")]
    if trained or unexpected:
        raise RuntimeError(f"checkpoint does not match the config: missing {trained[:5]}, unexpected {unexpected[:5]}")
    return module.backbone.export(out, merge_lora=merge_lora, judge=trains_a_judge(cli.datamodule))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training config the checkpoint came from")
    parser.add_argument(
        "--ckpt",
        required=True,
        help="Lightning checkpoint file, DeepSpeed checkpoint directory or FSDP sharded checkpoint directory",
    )
    parser.add_argument("--out", required=True, help="directory for the Hugging Face checkpoint")
    parser.add_argument("--keep-lora", action="store_true", help="write LoRA adapters instead of merging them")
    args = parser.parse_args()
    print(f"exported to {export(args.config, args.ckpt, args.out, merge_lora=not args.keep_lora)}")


if __name__ == "__main__":
    main()
