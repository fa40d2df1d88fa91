"""Verdict metrics against hand counts."""

import pytest
import torch

from carevl.metrics import (
    CategoryVerdictAccuracy,
    ExactMatch,
    VerdictAccuracy,
    exact_match_counts,
    paired_changes,
    sign_test,
)


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


def test_paired_changes_count_items_fixed_and_broken_and_the_sign_test_is_exact():
    reference = {"a": True, "b": False, "c": False, "d": True, "e": False}
    other = {"a": True, "b": True, "c": True, "d": False, "e": False}
    assert paired_changes(reference, other) == (2, 1)
    assert paired_changes(other, reference) == (1, 2)
    with pytest.raises(ValueError, match="same items: 1 only in the reference, 0 only in the other"):
        paired_changes(reference, {k: v for k, v in other.items() if k != "e"})
    # by hand: 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 2 * (1 + 10) / 1024; 2 * (1 + 16 + 120 + 560 + 1820) / 65536
    assert sign_test(1, 9) == sign_test(9, 1) == 22 / 1024
    assert sign_test(12, 4) == 2 * 2517 / 65536
    assert sign_test(0, 5) == 2 / 32
    assert sign_test(5, 5) == sign_test(0, 0) == 1.0
