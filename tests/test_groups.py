"""Group construction strategies on hand-made critique tables."""

import pytest

from carevl.curation.groups import Critique, form_group

# label 1; (verdict, score) per sample
TABLE = [
    Critique(0, "c0", 1, 70.0),  # correct
    Critique(1, "c1", 2, 90.0),  # incorrect, highest score overall
    Critique(2, "c2", 1, 85.0),  # correct, best
    Critique(3, "c3", None, 40.0),  # unparseable verdict: incorrect
    Critique(4, "c4", 1, 85.0),  # correct, ties the best: the earlier sample (2) is chosen
    Critique(5, "c5", 2, 10.0),  # incorrect, lowest
    Critique(6, "c6", 1, None),  # no score: left out
    Critique(7, "c7", 2, 10.0),  # incorrect, ties the lowest
]


def indices(group):
    return group.chosen.index, [c.index for c in group.rejected]


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("best_to_worse", (2, [0, 1, 3, 5, 7])),  # 4 scored as high as the chosen: not worse
        ("all_incorrect", (2, [1, 3, 5, 7])),
        ("lowest_incorrect", (2, [5])),  # 5 and 7 tie: the earlier
        ("highest_incorrect", (2, [1])),
    ],
)
def test_strategies(strategy, expected):
    group, reason = form_group(TABLE, label=1, strategy=strategy)
    assert reason == "ok" and indices(group) == expected


def test_random_incorrect_draws_one_incorrect_critique_fixed_by_the_pair():
    draws = {}
    for pair in (f"pair-{i}" for i in range(40)):
        group, reason = form_group(TABLE, 1, "random_incorrect", seed=pair)
        assert reason == "ok" and group.chosen.index == 2 and len(group.rejected) == 1
        assert form_group(TABLE, 1, "random_incorrect", seed=pair) == (group, reason)  # a rerun draws the same
        draws[pair] = group.rejected[0].index
    assert set(draws.values()) == {1, 3, 5, 7}  # every incorrect one, none of the correct ones


def test_relabeled_label_decides_correctness():
    group, _ = form_group(TABLE, label=2, strategy="best_to_worse")
    assert indices(group) == (1, [0, 2, 3, 4, 5, 7])  # now 1 is the best correct; 5, 7 correct but worse


def test_a_best_correct_critique_below_the_floor_forms_no_group():
    for strategy in ("best_to_worse", "lowest_incorrect", "random_incorrect"):
        dropped = form_group(TABLE, 1, strategy, min_chosen_score=85.5)
        assert dropped == (None, "best correct critique below min_chosen_score")
    assert indices(form_group(TABLE, 1, "best_to_worse", min_chosen_score=85.0)[0]) == (2, [0, 1, 3, 5, 7])  # inclusive


def test_no_correct_critique_gives_no_group():
    table = [Critique(0, "a", 2, 50.0), Critique(1, "b", None, 20.0), Critique(2, "c", 1, None)]
    assert form_group(table, 1, "best_to_worse") == (None, "no correct critique")


def test_only_correct_critiques():
    table = [Critique(0, "a", 1, 50.0), Critique(1, "b", 1, 80.0), Critique(2, "c", 1, 80.0)]
    assert indices(form_group(table, 1, "best_to_worse")[0]) == (1, [0])
    for strategy in ("lowest_incorrect", "highest_incorrect", "all_incorrect", "random_incorrect"):
        assert form_group(table, 1, strategy) == (None, "nothing to reject")


def test_a_duplicate_of_the_chosen_text_is_never_rejected():
    table = [Critique(0, "same", 1, 90.0), Critique(1, "same", 2, 30.0), Critique(2, "other", 2, 20.0)]
    assert indices(form_group(table, 1, "all_incorrect")[0]) == (0, [2])


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy must be one of"):
        form_group(TABLE, 1, "best")
