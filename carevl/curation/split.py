"""The confidence split and relabeling of paper §3.3-3.4, as pure functions over vote counts.

Each of M experts votes for the answer it scores higher; an expert that scores both the same casts
no vote and is counted as a tie, so v1 + v2 + ties = M. With threshold tau (default M - 1):

- high confidence: max(v1, v2) >= tau and the judge's verdict is the majority      (rule "agree")
- low confidence, relabeled:
  - the experts reached tau but their majority differs from the judge: the majority  ("experts_override")
  - the experts did not reach tau (or reached it tied): the judge's verdict           ("judge_kept")
  - the judge gave no verdict but the experts reached tau: the majority               ("experts_only")
- no label at all: no judge verdict and no expert majority at tau                      ("no_label")
"""

from __future__ import annotations

from dataclasses import dataclass

HIGH, LOW, NONE = "high", "low", "none"


@dataclass(frozen=True)
class Votes:
    v1: int
    v2: int
    ties: int = 0

    @property
    def experts(self) -> int:
        return self.v1 + self.v2 + self.ties

    @property
    def majority(self) -> int | None:
        return 1 if self.v1 > self.v2 else 2 if self.v2 > self.v1 else None


@dataclass(frozen=True)
class Decision:
    confidence: str  # "high", "low" or "none"
    label: int | None
    rule: str


def count_votes(scores: list[tuple[float, float]]) -> Votes:
    """Votes from each expert's (score of answer 1, score of answer 2)."""
    v1 = sum(a > b for a, b in scores)
    v2 = sum(b > a for a, b in scores)
    return Votes(v1, v2, len(scores) - v1 - v2)


def check_tau(tau: int, experts: int) -> None:
    if not 1 <= tau <= experts:
        raise ValueError(f"tau must be between 1 and the number of experts ({experts}), got {tau}")


def decide(votes: Votes, judge: int | None, tau: int) -> Decision:
    """The confidence and (re)label of one pair."""
    check_tau(tau, votes.experts)
    reached = max(votes.v1, votes.v2) >= tau and votes.majority is not None
    if judge is None:
        return Decision(LOW, votes.majority, "experts_only") if reached else Decision(NONE, None, "no_label")
    if reached and votes.majority == judge:
        return Decision(HIGH, judge, "agree")
    if reached:
        return Decision(LOW, votes.majority, "experts_override")
    return Decision(LOW, judge, "judge_kept")
