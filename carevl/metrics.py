"""Verdict metrics: pure functions, and torchmetrics classes that only accumulate them."""

from __future__ import annotations

import torch
from torchmetrics import Metric


def verdict_counts(predictions: list[int | None], labels: list[int]) -> tuple[int, int, int]:
    """(correct, total, unparseable) of parsed verdicts against labels; None counts as wrong."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    correct = sum(int(p is not None and p == y) for p, y in zip(predictions, labels))
    return correct, len(labels), sum(int(p is None) for p in predictions)


class VerdictAccuracy(Metric):
    """Accuracy of parsed judge verdicts; an unparseable output (None) counts as wrong.

    `compute()` returns the accuracy; `unparseable` holds how many outputs had no verdict.
    States are sums, so the result is exact across processes.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("unparseable", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, predictions: list[int | None], labels: list[int]) -> None:
        correct, total, unparseable = verdict_counts(predictions, labels)
        self.correct += correct
        self.total += total
        self.unparseable += unparseable

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp_min(1)
