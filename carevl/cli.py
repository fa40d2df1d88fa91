"""`carevl`: the Lightning command line (fit / validate / test / predict) for judge training.

Models and data are chosen in YAML by `class_path`/`init_args`; `carevl fit --help` and
`carevl fit --config X --print_config` show every option with its documentation.

What the model and the data share is stated once and linked here, never read from one another at
run time: the processor is the backbone's, and so is `trust_remote_code`; benchmark batches carry
candidate verdict lines when the model scores verdicts by likelihood; the global batch
(`global_batch_size`, samples or DPO groups per optimizer step over every process) sets
`trainer.accumulate_grad_batches` from the micro batch (`data.batch_size`) and the number of
processes.
"""

from __future__ import annotations

from typing import Any

from lightning import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from carevl.judge import JudgeModule
from datamodules.judge import EpochPosition, JudgeDataModule


def scores_verdicts(eval_mode: str) -> bool:
    """Whether the module's `eval_mode` needs candidate verdict lines in benchmark batches."""
    return eval_mode == "score"


def accumulation(global_batch_size: int, batch_size: int, processes: int) -> int:
    """Micro batches per optimizer step that make `global_batch_size`; raises when it does not divide."""
    per_step = batch_size * processes
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a positive multiple of data.batch_size {batch_size} x "
            f"{processes} processes = {per_step}: change one of them"
        )
    return global_batch_size // per_step


class CarevlCLI(LightningCLI):
    """LightningCLI over judge modules and `JudgeDataModule`, with their shared settings linked."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.backbone.init_args.model", "data.init_args.processor")
        parser.link_arguments(
            "model.init_args.backbone.init_args.trust_remote_code", "data.init_args.trust_remote_code"
        )
        parser.link_arguments(
            "model.init_args.eval_mode", "data.init_args.verdict_candidates", compute_fn=scores_verdicts
        )
        parser.add_argument(
            "--global_batch_size",
            type=int | None,
            default=None,
            help="Samples (DPO: groups) per optimizer step over all processes. trainer.accumulate_grad_batches is "
            "derived from it as global_batch_size / (data.batch_size x devices x nodes): leave that unset. "
            "None: accumulate_grad_batches as the trainer says.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(EpochPosition())
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        global_batch_size = config.get("global_batch_size")
        if global_batch_size is not None:
            if trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    f"both global_batch_size ({global_batch_size}) and trainer.accumulate_grad_batches "
                    f"({trainer.accumulate_grad_batches}) are set: state the global batch once"
                )
            trainer.accumulate_grad_batches = accumulation(
                global_batch_size, self.datamodule.batch_size, trainer.world_size
            )
        return trainer


def run(args: list[str] | None = None, subcommand: bool = True) -> LightningCLI:
    """Run the CLI in-process and return it (tests inspect `.model` and `.trainer`). With
    `subcommand=False` it only builds model, data and trainer from `args` (no fit/validate/test)."""
    return CarevlCLI(
        JudgeModule,
        JudgeDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        run=subcommand,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the `carevl` console script. Returns None: the script exits with status 0."""
    run(args)


if __name__ == "__main__":
    main()
