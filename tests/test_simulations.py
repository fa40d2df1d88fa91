"""The simulated curation models of the shapes world err the way real ones do (captions blur fine
detail, a judge that sees the image, shared answer errors, position bias), measured through the
real curation stages."""

from collections import Counter
from pathlib import Path

import pytest
import yaml

from carevl.backends.interface import Sampling
from carevl.curation import labels, stages
from carevl.curation.records import Records
from carevl.standins.shapes import KINDS, mentioned_value, scene_of, true_label
from carevl.standins.simulated import SimulatedAnswerer, SimulatedJudge
from tests.helpers import ingest_world

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_world_errs_where_real_curation_models_do(tmp_path):
    """With the shipped simulations (configs/curation/shapes.yaml), captions leave counts out, so the
    experts are unsure on fine-detail questions and the low-confidence split is enriched for them,
    while the judge, which sees the image, stays better than the experts there. Measured, not
    scripted: the split only sees votes and verdicts."""
    import importlib

    workdir = str(tmp_path / "cur")
    config = yaml.safe_load((ROOT / "configs" / "curation" / "shapes.yaml").read_text())

    def build(spec):
        module, _, name = spec["class_path"].rpartition(".")
        args = spec["init_args"]
        return getattr(importlib.import_module(module), name)(
            **{**args, **({"world": workdir} if "world" in args else {})}
        )

    ingest_world(workdir, 300, 5)
    models = {name: (lambda spec=spec: build(spec)) for name, spec in config["candidates"]["models"].items()}
    decodings = {name: Sampling(**spec) for name, spec in config["candidates"]["decodings"].items()}
    stages.candidates(workdir, models, decodings)
    stages.captions(workdir, lambda: build(config["captions"]["captioner"]))
    stages.pairs(workdir, max_pairs_per_item=config["pairs"]["max_pairs_per_item"])
    labels.judge(workdir, model=lambda: build(config["judge"]["model"]))
    labels.votes(workdir, {name: (lambda spec=spec: build(spec)) for name, spec in config["votes"]["experts"].items()})
    labels.split(workdir, tau=config["split"]["tau"])

    items = {row["id"]: row for row in Records(Path(workdir) / "items.jsonl").ok()}
    counts = {
        kind: {"pairs": 0, "low": 0, "judge": [0, 0], "experts": [0, 0], "high": [0, 0]} for kind in ("coarse", "fine")
    }
    for row in Records(Path(workdir) / "split.jsonl").ok():
        item = items[row["item"]]
        kind = KINDS[item["meta"]["truth"]["attribute"]]
        tally = counts[kind]
        tally["pairs"] += 1
        tally["low"] += row["confidence"] == "low"
        truth = true_label(item, row["responses"])
        if truth is None:
            continue
        majority = 1 if row["votes"][0] > row["votes"][1] else 2 if row["votes"][1] > row["votes"][0] else None
        for name, verdict in (("judge", row["judge"]), ("experts", majority)):
            if verdict is not None:
                tally[name][0] += verdict == truth
                tally[name][1] += 1
        if row["confidence"] == "high":
            tally["high"][0] += row["label"] == truth
            tally["high"][1] += 1
    coarse, fine = counts["coarse"], counts["fine"]
    share = {kind: counts[kind]["low"] / counts[kind]["pairs"] for kind in counts}
    assert share["fine"] > share["coarse"] + 0.15, share
    fine_share_all = fine["pairs"] / (fine["pairs"] + coarse["pairs"])
    fine_share_high = fine["high"][1] / (fine["high"][1] + coarse["high"][1])
    assert fine_share_high < fine_share_all / 2, (fine_share_high, fine_share_all)  # SFT is thin on fine detail
    precision = {k: {n: counts[k][n][0] / counts[k][n][1] for n in ("judge", "experts", "high")} for k in counts}
    assert precision["fine"]["judge"] > precision["fine"]["experts"] + 0.05, precision
    assert precision["coarse"]["high"] > 0.95 and precision["fine"]["high"] > 0.9, precision


def test_candidates_with_shared_errors_give_one_wrong_answer_per_item(tmp_path):
    """Models that err on an item with `shared_errors` say the same wrong value, so the item's pairs
    hold one right answer; with independent errors two wrong values meet in some pairs, and
    `shared_errors: fine` shares them on fine-detail questions only."""
    no_right_answer = {}
    for shared in (True, False, "fine"):
        workdir = str(tmp_path / str(shared))
        ingest_world(workdir, 90, 8)
        models = {
            f"m{e}": (
                lambda e=e, w=workdir, s=shared: SimulatedAnswerer(f"m{e}", w, error_rate=e / 10, shared_errors=s)
            )
            for e in (1, 2, 3)
        }
        stages.candidates(workdir, models, {"t1": Sampling(temperature=1.0, n=3)})
        stages.pairs(workdir)
        items = {row["id"]: row for row in Records(Path(workdir) / "items.jsonl").ok()}
        pairs = list(Records(Path(workdir) / "pairs.jsonl").ok())
        counts = Counter()
        for pair in pairs:
            item = items[pair["item"]]
            if true_label(item, pair["responses"]) is None:
                counts[KINDS[item["meta"]["truth"]["attribute"]]] += 1
        no_right_answer[shared] = counts
        assert len(pairs) > 40
    assert not no_right_answer[True], no_right_answer
    assert no_right_answer[False]["coarse"] > 5 and no_right_answer[False]["fine"] > 2, no_right_answer
    assert no_right_answer["fine"]["fine"] == 0 and no_right_answer["fine"]["coarse"] > 5, no_right_answer
    with pytest.raises(ValueError, match="shared_errors must be"):
        SimulatedAnswerer("m", str(tmp_path / "True"), shared_errors="counts")


def test_a_judge_that_reads_says_what_it_sees_where_neither_answer_is_right(tmp_path):
    """`reads_when_neither`: on pairs with no right answer the explanation states the image's value
    (accuracy 1) or a misreading (accuracy 0) instead of the picked answer's, naming an answer only
    where one says that value; pairs with one right answer are judged exactly as before.
    `reading_accuracy` sets how well it reads there apart from how often its verdicts are sure."""
    workdir = str(tmp_path / "cur")
    ingest_world(workdir, 120, 10)
    stages.candidates(
        workdir,
        {f"m{e}": lambda e=e: SimulatedAnswerer(f"m{e}", workdir, error_rate=e / 10) for e in (2, 3, 4)},
        {"t1": Sampling(temperature=1.0, n=3)},
    )
    stages.pairs(workdir)
    items = {row["id"]: row for row in Records(Path(workdir) / "items.jsonl").ok()}
    pairs = {row["key"]: row for row in Records(Path(workdir) / "pairs.jsonl").ok()}
    judged = {}
    runs = {
        "plain": {"accuracy": 1.0},
        "reads": {"accuracy": 1.0, "reads_when_neither": True},
        "misreads": {"accuracy": 0.0, "reads_when_neither": True},
        "unsure, reads": {"accuracy": 0.0, "reads_when_neither": True, "reading_accuracy": 1.0},
        "sure, misreads": {"accuracy": 1.0, "reads_when_neither": True, "reading_accuracy": 0.0},
    }
    for name, options in runs.items():
        out = Path(workdir) / "judgments.jsonl"
        out.unlink(missing_ok=True)
        labels.judge(workdir, model=lambda o=options: SimulatedJudge("j", workdir, **o))
        judged[name] = {row["pair"]: row for row in Records(out).ok()}
    kinds = Counter()
    for key, pair in pairs.items():
        item = items[pair["item"]]
        attribute = item["meta"]["truth"]["attribute"]
        truth = scene_of(item["meta"]["truth"]["scene"]).value(attribute)
        values = [mentioned_value(r, attribute) for r in pair["responses"]]
        if truth in values:
            assert judged["reads"][key] == judged["plain"][key] == judged["sure, misreads"][key]
            continue
        kinds["neither"] += 1
        assert judged["unsure, reads"][key] == judged["reads"][key]
        assert judged["sure, misreads"][key] == judged["misreads"][key]
        assert judged["plain"][key]["explanation"].endswith(f"as Answer {judged['plain'][key]['verdict']} says.")
        assert judged["reads"][key]["explanation"].endswith(f"The image has {truth}, as neither answer says.")
        misread = judged["misreads"][key]
        seen = misread["explanation"].rsplit("The image has ", 1)[1].split(",")[0]
        assert seen != truth
        if seen in values:
            kinds["misread as an answer"] += 1
            assert misread["explanation"].endswith(f"as Answer {values.index(seen) + 1} says.")
            assert misread["verdict"] == values.index(seen) + 1
        else:
            assert misread["explanation"].endswith("as neither answer says.")
    assert kinds["neither"] > 10 and 0 < kinds["misread as an answer"] < kinds["neither"], kinds


def test_a_position_biased_judge_errs_only_by_naming_the_first_answer(tmp_path):
    """`unsure: first`: right on every pair whose better answer comes first; on the others right at
    the rate `accuracy` sets (0.3; the bounds leave the binomial spread of ~100 pairs room)."""
    workdir = str(tmp_path / "cur")
    ingest_world(workdir, 200, 9)
    stages.candidates(
        workdir,
        {"m": lambda: SimulatedAnswerer("m", workdir, error_rate=0.25, shared_errors=True)},
        {"t1": Sampling(temperature=1.0, n=4)},
    )
    stages.pairs(workdir)
    labels.judge(workdir, model=lambda: SimulatedJudge("j", workdir, accuracy=0.3, unsure="first"))
    items = {row["id"]: row for row in Records(Path(workdir) / "items.jsonl").ok()}
    pairs = {row["key"]: row for row in Records(Path(workdir) / "pairs.jsonl").ok()}
    right = {1: [], 2: []}
    for row in Records(Path(workdir) / "judgments.jsonl").ok():
        pair = pairs[row["pair"]]
        truth = true_label(items[pair["item"]], pair["responses"])
        right[truth].append(row["verdict"] == truth)
    assert all(right[1]) and len(right[1]) > 40
    assert 0.15 < sum(right[2]) / len(right[2]) < 0.45, (sum(right[2]), len(right[2]))
    with pytest.raises(ValueError, match="unsure must be"):
        SimulatedJudge("j", workdir, unsure="last")
