"""Verdict metrics: pure functions, and torchmetrics classes that only accumulate them."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def verdict_counts(predictions: list[int | None], labels: list[int]) -> tuple[int, int, int]:
    """(correct, total, unparseable) of parsed verdicts against labels; None counts as wrong."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    correct = sum(int(p is not None and p == y) for p, y in zip(predictions, labels))
    return correct, len(labels), sum(int(p is None) for p in predictions)


def paired_changes(reference: dict[str, bool], other: dict[str, bool]) -> tuple[int, int]:
    """(fixed, broken): items `other` gets right that `reference` gets wrong, and the reverse; both
    map the same item ids to whether their verdict was right. The items both get right or both
    wrong say nothing about which judge is better."""
    if reference.keys() != other.keys():
        raise ValueError(
            f"paired judges must judge the same items: {len(reference.keys() - other.keys())} only in the "
            f"reference, {len(other.keys() - reference.keys())} only in the other"
        )
    fixed = sum(other[item] and not reference[item] for item in reference)
    broken = sum(reference[item] and not other[item] for item in reference)
    return fixed, broken


def sign_test(fixed: int, broken: int) -> float:
    """Exact two-sided p-value of `fixed` against `broken` under no difference between two judges
    (McNemar's exact test: each changed item goes either way with probability 1/2)."""
    changed = fixed + broken
    tail = sum(math.comb(changed, k) for k in range(min(fixed, broken) + 1)) / 2**changed
    return min(1.0, 2 * tail)


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


class CategoryVerdictAccuracy(Metric):
    """Verdict accuracy per named category of held-out samples (e.g. the shapes world's coarse and
    fine questions); an unparseable output counts as wrong. A sample without a category (None) counts
    in none; one outside `names` is an error, so a typo in a config cannot hide a category."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, names: list[str] | tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"categories must be distinct and at least one, got {names}")
        self.names = tuple(names)
        for state in ("correct", "counted"):
            self.add_state(state, default=torch.zeros(len(self.names)), dist_reduce_fx="sum")

    def update(self, predictions: list[int | None], labels: list[int], categories: list[str | None]) -> None:
        named = [i for i, category in enumerate(categories) if category is not None]
        correct, counted, _ = grouped_counts(
            [predictions[i] for i in named],
            [labels[i] for i in named],
            [categories[i] for i in named],
            [""] * len(named),
            self.names,
            "wrong",
            (1, 2),
        )
        self.correct += correct
        self.counted += counted

    def compute(self) -> dict[str, torch.Tensor]:
        """Accuracy of each category that had samples (a fraction, like `VerdictAccuracy`)."""
        return {name: self.correct[i] / self.counted[i] for i, name in enumerate(self.names) if self.counted[i] > 0}


def exact_match_counts(texts: list[str], targets: list[str]) -> tuple[int, int]:
    """(matched, total): outputs equal to their target once surrounding whitespace is stripped."""
    if len(texts) != len(targets):
        raise ValueError(f"{len(texts)} outputs for {len(targets)} targets")
    return sum(int(text.strip() == target.strip()) for text, target in zip(texts, targets)), len(targets)


class ExactMatch(Metric):
    """Fraction of generated outputs that equal their target text (surrounding whitespace aside):
    whether a skill an instruction set teaches is there, e.g. the base model's quoting task. States
    are sums, so the result is exact across processes."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("matched", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, texts: list[str], targets: list[str]) -> None:
        matched, total = exact_match_counts(texts, targets)
        self.matched += matched
        self.total += total

    def compute(self) -> torch.Tensor:
        return self.matched.float() / self.total.clamp_min(1)


# -- benchmark scoring ----------------------------------------------------------------------------

UNPARSEABLE_POLICIES = ("wrong", "exclude", "random")


def resolve(prediction: int | str | None, key: str, policy: str, choices: tuple) -> int | str | None:
    """The prediction a metric scores for one record, given the policy for unparseable outputs.

    "wrong" keeps None (never matches a label); "exclude" also keeps None, and the caller drops the
    record; "random" replaces None by a choice fixed by the record key, identical in every process.
    """
    if policy not in UNPARSEABLE_POLICIES:
        raise ValueError(f"unparseable policy must be one of {UNPARSEABLE_POLICIES}, got {policy!r}")
    if prediction is not None or policy != "random":
        return prediction
    from carevl.benchmarks import keyed_choice

    return keyed_choice(key, choices)


def grouped_counts(
    predictions: list,
    labels: list,
    groups: list[str],
    keys: list[str],
    names: tuple[str, ...],
    policy: str,
    choices: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correct, counted, unparseable) per group, as float tensors indexed like `names`."""
    if not len(predictions) == len(labels) == len(groups) == len(keys):
        raise ValueError("predictions, labels, groups and keys must have the same length")
    correct, counted, unparseable = (torch.zeros(len(names)) for _ in range(3))
    for prediction, label, group, key in zip(predictions, labels, groups, keys):
        if group not in names:
            raise ValueError(f"unknown group {group!r}; expected one of {names}")
        g = names.index(group)
        unparseable[g] += prediction is None
        scored = resolve(prediction, key, policy, choices)
        if scored is None and policy == "exclude":
            continue
        counted[g] += 1
        correct[g] += scored is not None and scored == label
    return correct, counted, unparseable


def record_counts(
    counted: torch.Tensor, unparseable: torch.Tensor, names: tuple[str, ...], policy: str
) -> dict[str, torch.Tensor]:
    """`seen` (views that reached the judge; a record shown in both orders counts twice) and
    `scored` (views in the accuracy's denominators: all of them, unless the unparseable ones are
    excluded), in total and per group present."""
    seen = counted + unparseable if policy == "exclude" else counted
    counts = {"seen": seen.sum(), "scored": counted.sum()}
    for i, name in enumerate(names):
        if seen[i] > 0:
            counts[f"seen/{name}"], counts[f"scored/{name}"] = seen[i], counted[i]
    return counts


class VLRewardBenchAccuracy(Metric):
    """VL-RewardBench accuracy per category (general, hallucination, reasoning), overall (correct /
    all records) and macro (mean of the category accuracies), in percent.

    Args:
        unparseable: "wrong" (default: an output without a verdict is a wrong answer), "exclude"
            (left out of every denominator), or "random" (a pick fixed by the record key).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, unparseable: str = "wrong", **kwargs):
        super().__init__(**kwargs)
        from carevl.benchmarks import VLRB_CATEGORIES

        resolve(None, "", unparseable, (1, 2))  # validates the policy name
        self.policy = unparseable
        self.names = VLRB_CATEGORIES
        for state in ("correct", "counted", "unparseable"):
            self.add_state(state, default=torch.zeros(len(self.names)), dist_reduce_fx="sum")

    def update(self, predictions: list, labels: list, categories: list[str], keys: list[str]) -> None:
        correct, counted, unparseable = grouped_counts(
            predictions, labels, categories, keys, self.names, self.policy, (1, 2)
        )
        self.correct += correct
        self.counted += counted
        self.unparseable += unparseable

    def compute(self) -> dict[str, torch.Tensor]:
        per_category = 100 * self.correct / self.counted.clamp_min(1)
        present = self.counted > 0
        result = {name: per_category[i] for i, name in enumerate(self.names)}
        result["overall"] = 100 * self.correct.sum() / self.counted.sum().clamp_min(1)
        result["macro"] = per_category[present].mean() if present.any() else torch.tensor(0.0)
        result["unparseable"] = self.unparseable.sum()
        result.update(record_counts(self.counted, self.unparseable, self.names, self.policy))
        return result


class MLLMJudgePairAccuracy(Metric):
    """MLLM-as-a-Judge pair comparison: accuracy per subset and the unweighted mean over subsets,
    "w. Tie" (three-way, every record) and "w.o. Tie" (records whose human label is not a tie; a
    predicted tie counts wrong). Fractions in [0, 1], as the benchmark reports them.

    Args:
        unparseable: "wrong" (default), "exclude" or "random" (A, B or C fixed by the record key).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, unparseable: str = "wrong", **kwargs):
        super().__init__(**kwargs)
        from carevl.benchmarks import MLLM_JUDGE_SUBSETS

        resolve(None, "", unparseable, (1, 2))
        self.policy = unparseable
        self.names = MLLM_JUDGE_SUBSETS
        for state in ("tie_correct", "tie_counted", "notie_correct", "notie_counted", "unparseable"):
            self.add_state(state, default=torch.zeros(len(self.names)), dist_reduce_fx="sum")

    def update(self, predictions: list, labels: list, subsets: list[str], keys: list[str]) -> None:
        choices = (1, 2, "tie")
        correct, counted, unparseable = grouped_counts(
            predictions, labels, subsets, keys, self.names, self.policy, choices
        )
        self.tie_correct += correct
        self.tie_counted += counted
        self.unparseable += unparseable
        decided = [i for i, label in enumerate(labels) if label != "tie"]
        correct, counted, _ = grouped_counts(
            *([xs[i] for i in decided] for xs in (predictions, labels, subsets, keys)), self.names, self.policy, choices
        )
        self.notie_correct += correct
        self.notie_counted += counted

    def compute(self) -> dict[str, torch.Tensor]:
        result = {}
        for prefix, correct, counted in (
            ("w_tie", self.tie_correct, self.tie_counted),
            ("wo_tie", self.notie_correct, self.notie_counted),
        ):
            accuracy = correct / counted.clamp_min(1)
            present = counted > 0
            result[f"pair_{prefix}"] = accuracy[present].mean() if present.any() else torch.tensor(0.0)
            for i, name in enumerate(self.names):
                if present[i]:
                    result[f"{prefix}/{name}"] = accuracy[i]
        result["unparseable"] = self.unparseable.sum()
        result.update(record_counts(self.tie_counted, self.unparseable, self.names, self.policy))
        return result


class PositionConsistency(Metric):
    """For judges shown each record in both orders: how often the same response wins in both
    (position consistency) and how often a parsed verdict names the first position (0.5 means
    no position bias). `update` takes the verdict on the stored order and on the swapped order,
    each in the positions the judge saw."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for state in ("pairs", "consistent", "parsed", "first"):
            self.add_state(state, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, stored: list, swapped: list) -> None:
        if len(stored) != len(swapped):
            raise ValueError("stored and swapped verdict lists differ in length")
        flip = {1: 2, 2: 1, "tie": "tie"}
        for a, b in zip(stored, swapped):
            self.pairs += 1
            self.consistent += a is not None and b is not None and a == flip.get(b)
            for verdict in (a, b):
                self.parsed += verdict is not None
                self.first += verdict == 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "position_consistency": self.consistent / self.pairs.clamp_min(1),
            "first_position_rate": self.first / self.parsed.clamp_min(1),
        }
