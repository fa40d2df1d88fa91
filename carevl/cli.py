"""`carevl`: the Lightning command line (fit / validate / test / predict) for judge training.

Models and data are chosen in YAML by `class_path`/`init_args`; `carevl fit --help` and
`carevl fit --config X --print_config` show every option with its documentation.
"""

from __future__ import annotations

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def run(args: list[str] | None = None, subcommand: bool = True) -> LightningCLI:
    """Run the CLI in-process and return it (tests inspect `.model` and `.trainer`). With
    `subcommand=False` it only builds model, data and trainer from `args` (no fit/validate/test)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
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
