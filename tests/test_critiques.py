"""Curation II on the shapes world: critiques sampled for the low-confidence pairs, scored by the
simulated evaluator, grouped by every strategy into preference-group shards."""

import shutil
from pathlib import Path

import pytest
import webdataset as wds

from carevl.curation import critiques
from carevl.curation.groups import STRATEGIES
from carevl.curation.records import Records
from carevl.prompts import SCORE_ASPECTS, parse_verdict
from carevl.schema import decode, read_manifest
from carevl.standins.simulated import (
    SimulatedEvaluator,
    SimulatedJudge,
)
from tests.helpers import split_world


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("cur") / "w")
    split_world(workdir, 40, 8)
    # the simulated judge stands in for the SFT judge: it is right 60% of the time on pairs with one right answer
    critiques.critiques(workdir, lambda: SimulatedJudge("sft", workdir, accuracy=0.6), name="sim-sft", samples=6)
    critiques.evaluate(
        workdir, lambda: SimulatedEvaluator("eval", unparseable_rate=0.05), name="sim-eval", max_failed=0.2
    )
    return workdir


def test_critiques_cover_every_low_confidence_pair(curated):
    low = critiques.low_confidence(curated)
    found = Records(Path(curated) / critiques.CRITIQUES).ok()
    assert len(low) > 10 and {r["pair"] for r in found} == {r["key"] for r in low}
    for record in found:
        assert len(record["samples"]) == 6
        assert all(s["verdict"] == parse_verdict(s["text"]) for s in record["samples"])
    assert sum(len({s["text"] for s in r["samples"]}) > 1 for r in found) > len(found) / 2  # samples differ


def test_unparseable_scores_are_recorded_excluded_and_counted(curated):
    evaluations = Records(Path(curated) / critiques.EVALUATIONS)
    n_distinct = len(evaluations.latest())  # equal critiques of equal pairs are scored once
    assert n_distinct > 50
    unscored = evaluations.failures()["unparseable"]
    failed = [r for r in evaluations.latest() if "error" in r]  # what the evaluator wrote is kept
    assert failed and all(r["replies"][0].startswith("Relevance") and "Score" not in r["replies"][0] for r in failed)
    assert 0 < unscored < n_distinct // 5
    assert all(0 <= r["score"] <= 100 for r in evaluations.ok())
    summary = critiques.groups(curated, out=str(Path(curated) / "groups-check"))
    assert summary["critiques without a score"] >= unscored


def read_groups(directory: Path) -> list:
    manifest = read_manifest(directory)
    return [
        decode(raw, "preference_group") for url in manifest["urls"] for raw in wds.WebDataset(url, shardshuffle=False)
    ]


def test_every_strategy_writes_groups_that_follow_its_rule(curated, tmp_path):
    summary = critiques.groups(curated, strategies=list(STRATEGIES), out=str(tmp_path / "groups"))
    labels = {r["key"][:32]: r["label"] for r in critiques.low_confidence(curated)}
    sizes = {}
    for strategy in STRATEGIES:
        written = read_groups(tmp_path / "groups" / strategy)
        sizes[strategy] = len(written)
        assert summary[f"{strategy}: written"] == len(written) > 0
        for group in written:
            label = labels[group.id.rsplit("-", 1)[0]]
            assert group.label == label and parse_verdict(group.chosen) == label and group.strategy == strategy
            assert all(s <= group.chosen_score for s in group.rejected_scores)
            if strategy == "best_to_worse":
                assert all(
                    parse_verdict(r) != label or s < group.chosen_score
                    for r, s in zip(group.rejected, group.rejected_scores)
                )
            else:
                assert all(parse_verdict(r) != label for r in group.rejected)
            if strategy in ("lowest_incorrect", "highest_incorrect", "random_incorrect"):
                assert len(group.rejected) == 1
    assert summary["best_to_worse: no correct critique"] > 0  # dropped and counted
    one_each = {sizes[s] for s in ("all_incorrect", "lowest_incorrect", "highest_incorrect", "random_incorrect")}
    assert len(one_each) == 1 and sizes["best_to_worse"] >= one_each.pop()
    # the simulated evaluator rewards correct critiques (a wrong verdict costs 15 points of accuracy, and
    # more where the reasoning does not hold): Best-to-Worse chosen beat incorrect rejected by a margin
    b2w = read_groups(tmp_path / "groups" / "best_to_worse")
    gaps = [
        group.chosen_score - s
        for group in b2w
        for r, s in zip(group.rejected, group.rejected_scores)
        if parse_verdict(r) != group.label
    ]
    assert sum(gaps) / len(gaps) > 15


def test_a_floor_on_the_chosen_score_keeps_exactly_the_groups_whose_chosen_reaches_it(curated, tmp_path):
    """The shapes world's evaluator takes 10 points from a critique whose value the caption
    contradicts, so a floor of 93 drops such best critiques and leaves the other groups as they were."""
    every = critiques.groups(curated, out=str(tmp_path / "every"))
    floored = critiques.groups(curated, out=str(tmp_path / "floored"), min_chosen_score=93)
    before = read_groups(tmp_path / "every" / "best_to_worse")
    after = read_groups(tmp_path / "floored" / "best_to_worse")
    assert [g.id for g in after] == [g.id for g in before if g.chosen_score >= 93]
    assert [(g.chosen, g.rejected) for g in after] == [(g.chosen, g.rejected) for g in before if g.chosen_score >= 93]
    dropped = floored["best_to_worse: best correct critique below min_chosen_score"]
    assert dropped >= len(before) - len(after) > 0
    assert floored["best_to_worse: written"] == every["best_to_worse: written"] - (len(before) - len(after))


def test_rerun_skips_finished_work(curated):
    again = critiques.critiques(
        curated, lambda: pytest.fail("the judge must not be built: nothing is left to do"), name="sim-sft", samples=6
    )
    assert "done" not in again
    assert again["skipped"] == len(critiques.low_confidence(curated))


def test_a_retrained_checkpoint_is_sampled_afresh_and_only_its_critiques_are_grouped(curated, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(curated, workdir)
    checkpoint = tmp_path / "sft"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"first weights")
    pairs = len(critiques.low_confidence(workdir))

    def run(accuracy: float) -> dict:
        return critiques.critiques(
            workdir,
            lambda: SimulatedJudge("sft", workdir, accuracy=accuracy),
            name="sim-sft",
            checkpoint=str(checkpoint),
            samples=6,
        )

    assert run(0.0)["done"] == pairs
    assert run(0.0)["skipped"] == pairs  # same weights: nothing to do
    old = critiques.checkpoint_revision(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"retrained weights")
    assert run(1.0)["done"] == pairs
    # both checkpoints' critiques stay on disk; only the retrained one's reach the evaluator and the groups
    records = Records(Path(workdir) / critiques.CRITIQUES).ok()
    revision = critiques.checkpoint_revision(checkpoint)
    texts = {
        rev: {s["text"] for r in records if r.get("revision") == rev for s in r["samples"]}
        for rev in {r.get("revision") for r in records}
    }
    stale = texts[old] - texts[revision]  # what only the old checkpoint wrote
    assert len(texts) == 3 and revision != old and stale
    assert {r["key"] for r in critiques.selected_critiques(workdir)} == {
        r["key"] for r in records if r.get("revision") == revision
    }
    # one distinct critique to grade: an evaluator that may forget its score would fail the stage by chance
    critiques.evaluate(workdir, lambda: SimulatedEvaluator("eval", unparseable_rate=0.0), name="sim-eval")
    critiques.groups(workdir, strategies=["best_to_worse"], out=str(tmp_path / "groups"))
    grouped = {
        text for group in read_groups(tmp_path / "groups" / "best_to_worse") for text in [group.chosen, *group.rejected]
    }
    assert grouped and grouped <= texts[revision] and not grouped & stale


def test_a_structured_evaluator_scores_the_sum_of_its_aspects_and_groups_read_them(curated, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(curated, workdir)
    summary = critiques.evaluate(workdir, lambda: SimulatedEvaluator("eval"), name="sim-eval", structured=True)
    evaluations = critiques.selected(Records(Path(workdir) / critiques.EVALUATIONS))
    free = {r["context"]: r["score"] for r in Records(Path(curated) / critiques.EVALUATIONS).ok()}
    assert summary["done"] == len(evaluations) and not [k for k in summary if k.startswith("failed")]
    assert {r["context"] for r in evaluations} > set(free)  # the same critiques, the unscored ones too
    for record in evaluations:
        assert record["score"] == sum(record["aspects"].values()) and set(record["aspects"]) == set(SCORE_ASPECTS)
    assert critiques.groups(workdir, out=str(tmp_path / "groups"))["best_to_worse: written"] > 0


def test_checkpoint_revision_needs_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight files"):
        critiques.checkpoint_revision(tmp_path)


def test_the_simulated_evaluator_grades_each_flaw_on_its_aspect():
    """The four aspects by hand for the correct critique of a shapes-world item and each simulated flaw."""
    from carevl.standins import shapes
    from carevl.standins.simulated import grade

    item = next(i for i in shapes.judge_items(20, seed=4) if i.attribute == "colour")
    fields = {
        "Answer 1": item.responses[0],
        "Answer 2": item.responses[1],
        "Reference decision": f"Answer {item.label} is better",
        "Image description": shapes.caption_target(item.scene),
    }
    right, named_other, misread, swapped, verdict_flipped = (
        tuple(grade(c, fields, item.attribute).values()) for c in [item.critique(), *shapes.worse_critiques(item)]
    )
    assert right == (25, 25, 25, 25)
    assert named_other == (25, 10, 10, 25)  # wrong verdict; names an answer that does not say the value
    assert misread == (25, 0, 25, 25)  # wrong verdict; the value contradicts the caption
    assert swapped == (0, 10, 25, 25)  # the quotes are wrong; the verdict too
    assert verdict_flipped == (25, 10, 15, 25)  # right analysis, verdict against it
    counted = next(i for i in shapes.judge_items(20, seed=4) if i.attribute == "count")
    silent = {  # a caption that leaves the number out: the value can be neither confirmed nor refuted
        "Answer 1": counted.responses[0],
        "Answer 2": counted.responses[1],
        "Reference decision": f"Answer {counted.label} is better",
        "Image description": shapes.caption_target(counted.scene, count=False),
    }
    assert tuple(grade(counted.critique(), silent, "count").values()) == (25, 20, 25, 25)
    assert tuple(grade("Answer one. Overall Judgment: Answer 1 is better.", fields, "colour").values())[3] == 5
    unseen = next(v for v in shapes.attribute_values("colour") if v not in item.values)
    neither = shapes.critique(item.values, unseen, None, item.label)
    assert neither.endswith(f"as neither answer says. Overall Judgment: Answer {item.label} is better.")
    # the value contradicts the caption; "neither" is true of the quotes, but names no answer to follow
    assert tuple(grade(neither, fields, "colour").values()) == (25, 15, 15, 25)
    false_neither = shapes.critique(item.values, item.values[0], None, item.label)
    assert tuple(grade(false_neither, fields, "colour").values())[2] == 0
