"""Preference groups from scored critiques (paper §3.5), as pure functions.

A sampled critique is *correct* when its parsed verdict equals the pair's (re)label. Strategies:

- ``best_to_worse`` (CAREVL): chosen = the highest-scoring correct critique; rejected = every
  incorrect critique and every correct one that scored lower than the chosen.
- ``lowest_incorrect``: chosen as above; rejected = the lowest-scoring incorrect critique.
- ``highest_incorrect``: chosen as above; rejected = the highest-scoring incorrect critique.
- ``all_incorrect``: chosen as above; rejected = every incorrect critique.
- ``random_incorrect``: chosen as above; rejected = one incorrect critique drawn at random, the
  draw seeded by the pair (the paper's Table 3 ablation without Best-to-Worse).

With `min_chosen_score`, a pair whose best correct critique scores below it forms no group under any
strategy: nothing in its samples is worth raising.

Ties break deterministically: among equal scores the earlier sample wins the chosen place (and,
for one-rejected strategies, the earlier sample is rejected). A critique whose text equals the
chosen one is never rejected. Critiques without a score are left out before any strategy runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STRATEGIES = ("best_to_worse", "lowest_incorrect", "highest_incorrect", "all_incorrect", "random_incorrect")


@dataclass(frozen=True)
class Critique:
    index: int  # position among the pair's samples (the tie break)
    text: str
    verdict: int | None
    score: float | None


@dataclass(frozen=True)
class Group:
    chosen: Critique
    rejected: tuple[Critique, ...]


def form_group(
    critiques: list[Critique], label: int, strategy: str, seed: str = "", min_chosen_score: float | None = None
) -> tuple[Group | None, str]:
    """(group, reason): the group of one pair, or None with why ("no correct critique", ...).
    `seed` (the pair's key) fixes random_incorrect's draw; `min_chosen_score` is the lowest score the
    chosen critique may have."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    scored = [c for c in critiques if c.score is not None]
    correct = [c for c in scored if c.verdict == label]
    incorrect = [c for c in scored if c.verdict != label]
    if not correct:
        return None, "no correct critique"
    chosen = min(correct, key=lambda c: (-c.score, c.index))
    if min_chosen_score is not None and chosen.score < min_chosen_score:
        return None, "best correct critique below min_chosen_score"
    if strategy == "best_to_worse":
        rejected = [c for c in scored if c is not chosen and (c.verdict != label or c.score < chosen.score)]
    elif strategy == "all_incorrect":
        rejected = incorrect
    elif not incorrect:
        rejected = []
    elif strategy == "random_incorrect":
        rejected = [random.Random(seed).choice(sorted(incorrect, key=lambda c: c.index))]
    elif strategy == "lowest_incorrect":
        rejected = [min(incorrect, key=lambda c: (c.score, c.index))]
    else:
        rejected = [min(incorrect, key=lambda c: (-c.score, c.index))]
    rejected = [c for c in rejected if c.text != chosen.text]
    if not rejected:
        return None, "nothing to reject"
    return Group(chosen, tuple(sorted(rejected, key=lambda c: c.index))), "ok"
