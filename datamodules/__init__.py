"""LightningDataModules over carevl's WebDataset shards."""

from datamodules.judge import JudgeDataModule

__all__ = ["JudgeDataModule"]
