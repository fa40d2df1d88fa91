"""Verdict metrics against hand counts."""

import pytest
import torch

from carevl.metrics import CategoryVerdictAccuracy, ExactMatch, VerdictAccuracy, exact_match_counts


def test_category_accuracy_counts_each_category_apart_and_refuses_unknown_ones():
    overall, by_category = VerdictAccuracy(), CategoryVerdictAccuracy(["coarse", "fine"])
    batches = [
        ([1, 2, None, 1], [1, 1, 2, 1], ["coarse", "fine", "fine", None]),  # None: no category, overall only
        ([2, 1], [2, 2], ["fine", "coarse"]),
    ]
    for predictions, labels, categories in batches:
        overall.update(predictions, labels)
        by_category.update(predictions, labels, categories)
    assert overall.compute().item() == pytest.approx(3 / 6)
    assert {k: v.item() for k, v in by_category.compute().items()} == pytest.approx({"coarse": 1 / 2, "fine": 1 / 3})
    empty = CategoryVerdictAccuracy(["coarse", "fine"])
    empty.update([1], [1], ["fine"])
    assert empty.compute() == {"fine": torch.tensor(1.0)}  # a category without samples is left out, not 0
    with pytest.raises(ValueError, match="unknown group 'medium'"):
        by_category.update([1], [1], ["medium"])
    with pytest.raises(ValueError, match="distinct"):
        CategoryVerdictAccuracy(["fine", "fine"])


def test_exact_match_counts_outputs_equal_to_their_target_whitespace_aside():
    texts = ["Answer 1 says red. ", "Answer 1 says red.", "answer 1 says red.", ""]
    targets = ["Answer 1 says red.", "Answer 1 says red", "Answer 1 says red.", "Answer 1 says red."]
    assert exact_match_counts(texts, targets) == (1, 4)  # a missing full stop or capital is a miss
    metric = ExactMatch()
    metric.update(texts, targets)
    metric.update(["\nYes."], ["Yes."])
    assert metric.compute().item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="2 outputs for 1 targets"):
        exact_match_counts(["a", "b"], ["a"])
