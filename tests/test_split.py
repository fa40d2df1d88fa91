"""The confidence split and relabeling rule on hand-made vote tables."""

import pytest

from carevl.curation.split import Decision, Votes, count_votes, decide


def test_count_votes_counts_expert_ties():
    scores = [(2.0, 1.0), (0.5, 0.7), (3.0, 3.0), (-1.0, -2.0), (1.0, 1.0)]
    assert count_votes(scores) == Votes(2, 1, 2)
    assert count_votes(scores).experts == 5


@pytest.mark.parametrize(
    "votes, judge, tau, expected",
    [
        # M = 5 (odd), tau = M - 1 = 4
        (Votes(5, 0), 1, 4, Decision("high", 1, "agree")),
        (Votes(4, 1), 1, 4, Decision("high", 1, "agree")),  # exactly tau
        (Votes(1, 4), 2, 4, Decision("high", 2, "agree")),
        (Votes(3, 2), 1, 4, Decision("low", 1, "judge_kept")),  # one below tau: the judge's label stays
        (Votes(2, 3), 1, 4, Decision("low", 1, "judge_kept")),  # below tau even against the judge
        (Votes(4, 1), 2, 4, Decision("low", 1, "experts_override")),  # tau reached against the judge
        (Votes(0, 5), 1, 4, Decision("low", 2, "experts_override")),
        (Votes(3, 1, 1), 1, 4, Decision("low", 1, "judge_kept")),  # a tie keeps the majority below tau
        (Votes(4, 0, 1), 1, 4, Decision("high", 1, "agree")),
        (Votes(4, 1), None, 4, Decision("low", 1, "experts_only")),  # no judge verdict
        (Votes(3, 2), None, 4, Decision("none", None, "no_label")),
        # M = 4 (even), tau = 3
        (Votes(3, 1), 1, 3, Decision("high", 1, "agree")),
        (Votes(2, 2), 1, 3, Decision("low", 1, "judge_kept")),
        (Votes(1, 3), 1, 3, Decision("low", 2, "experts_override")),
        # M = 4 with tau = 2: a 2-2 split reaches tau on both sides but has no majority
        (Votes(2, 2), 2, 2, Decision("low", 2, "judge_kept")),
        (Votes(2, 2), None, 2, Decision("none", None, "no_label")),
        (Votes(2, 1, 1), 2, 2, Decision("low", 1, "experts_override")),
        # M = 2, tau = 1 (the loosest threshold)
        (Votes(1, 1), 1, 1, Decision("low", 1, "judge_kept")),
        (Votes(0, 1, 1), 2, 1, Decision("high", 2, "agree")),
        # every expert tied
        (Votes(0, 0, 5), 2, 4, Decision("low", 2, "judge_kept")),
    ],
)
def test_decide(votes, judge, tau, expected):
    assert decide(votes, judge, tau) == expected


@pytest.mark.parametrize("tau", [0, 6])
def test_tau_out_of_range_is_refused(tau):
    with pytest.raises(ValueError, match="tau must be between 1 and the number of experts"):
        decide(Votes(5, 0), 1, tau)
