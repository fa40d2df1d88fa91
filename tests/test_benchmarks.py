"""Benchmark records, answer order and official scoring, checked on the real VL-RewardBench and
MLLM-as-a-Judge records in ../shared/benchmarks (skipped when that folder is absent)."""

import json

import pytest
import torch

from carevl import benchmarks
from carevl.metrics import MLLMJudgePairAccuracy, PositionConsistency, VLRewardBenchAccuracy, resolve
from tests.helpers import SHARED_BENCHMARKS

VLRB = SHARED_BENCHMARKS / "vl_rewardbench.jsonl"
MLLM = SHARED_BENCHMARKS / "mllm_judge_pair_samples.jsonl"
needs_vlrb = pytest.mark.skipif(not VLRB.exists(), reason="../shared/benchmarks/vl_rewardbench.jsonl not present")
needs_mllm = pytest.mark.skipif(
    not MLLM.exists(), reason="../shared/benchmarks/mllm_judge_pair_samples.jsonl not present"
)


@pytest.fixture(scope="module")
def vlrb_records():
    return [benchmarks.vlrb_fields(r) for r in benchmarks.read_jsonl(VLRB)]


def shown(record, order="odd_length"):
    """(responses, label) as the judge sees the record's single view under `order`."""
    (swap,) = benchmarks.views(record["id"], record["responses"], order, seed=0)
    return benchmarks.swapped(record["responses"], record["label"], swap)


def vlrb_scores(records, predict, order="odd_length", policy="wrong"):
    metric = VLRewardBenchAccuracy(unparseable=policy)
    labels = [shown(r, order)[1] for r in records]
    predictions = [predict(r, label) for r, label in zip(records, labels)]
    metric.update(predictions, labels, [r["category"] for r in records], [r["id"] for r in records])
    return {k: round(float(v), 2) for k, v in metric.compute().items()}


@needs_vlrb
def test_vlrewardbench_categories_and_labels(vlrb_records):
    sizes = {c: sum(r["category"] == c for r in vlrb_records) for c in benchmarks.VLRB_CATEGORIES}
    assert sizes == {"general": 183, "hallucination": 749, "reasoning": 318}
    assert sum(r["label"] == 1 for r in vlrb_records) == 1245  # the trap: the preferred answer listed first
    assert not any(r["question"].startswith("<image>") for r in vlrb_records)


@needs_vlrb
@pytest.mark.parametrize("constant, overall, macro", [(1, 47.76, 46.61), (2, 52.24, 53.39)])
def test_constant_judges_under_the_odd_length_rule(vlrb_records, constant, overall, macro):
    scores = vlrb_scores(vlrb_records, lambda record, label: constant)
    assert (scores["overall"], scores["macro"]) == (overall, macro)


@needs_vlrb
def test_stored_order_rewards_a_constant_answer_1_judge(vlrb_records):
    assert vlrb_scores(vlrb_records, lambda record, label: 1, order="as_stored")["overall"] == 99.6


@needs_vlrb
def test_published_category_accuracies_give_the_published_summary(vlrb_records):
    # IXC-2.5-Reward: 84.7 / 62.5 / 62.9 per category -> 65.8 overall, 70.0 macro. A scripted judge
    # right on the first k records of each category reproduces those accuracies.
    targets = {"general": 0.847, "hallucination": 0.625, "reasoning": 0.629}
    quota = {c: round(targets[c] * sum(r["category"] == c for r in vlrb_records)) for c in targets}
    seen = dict.fromkeys(targets, 0)

    def scripted(record, label):
        seen[record["category"]] += 1
        return label if seen[record["category"]] <= quota[record["category"]] else 3 - label

    scores = vlrb_scores(vlrb_records, scripted)
    assert (round(scores["general"], 1), round(scores["hallucination"], 1), round(scores["reasoning"], 1)) == (
        84.7,
        62.5,
        62.9,
    )
    assert (round(scores["overall"], 1), round(scores["macro"], 1)) == (65.8, 70.0)


@needs_vlrb
def test_unparseable_policies(vlrb_records):
    def half_unparseable(record, label):
        return None if record["id"] < "m" else label  # ids sort case-sensitively: upper-case prefixes parse

    wrong = vlrb_scores(vlrb_records, half_unparseable, policy="wrong")
    excluded = vlrb_scores(vlrb_records, half_unparseable, policy="exclude")
    random = vlrb_scores(vlrb_records, half_unparseable, policy="random")
    unparseable = sum(r["id"] < "m" for r in vlrb_records)
    assert wrong["unparseable"] == excluded["unparseable"] == random["unparseable"] == unparseable
    assert wrong["overall"] == round(100 * (1250 - unparseable) / 1250, 2)
    assert excluded["overall"] == 100.0
    assert wrong["overall"] < random["overall"] < excluded["overall"]
    # The random pick is fixed by the record key: the same in every process and every run.
    assert resolve(None, "k", "random", (1, 2)) == resolve(None, "k", "random", (1, 2))
    with pytest.raises(ValueError, match="policy"):
        VLRewardBenchAccuracy(unparseable="ignore")


@needs_vlrb
def test_random_order_is_seeded_and_balanced(vlrb_records):
    first = [shown(r, "random")[1] for r in vlrb_records]
    assert first == [shown(r, "random")[1] for r in vlrb_records]
    assert 0.45 < sum(label == 1 for label in first) / len(first) < 0.55


@needs_mllm
def test_mllm_judge_records_and_scoring():
    records = [benchmarks.mllm_judge_fields(json.loads(line)) for line in MLLM.read_text().splitlines() if line.strip()]
    assert len(records) == 20 and all(r["category"] in benchmarks.MLLM_JUDGE_SUBSETS for r in records)
    labels = [r["label"] for r in records]
    assert set(labels) <= {1, 2, "tie"}
    metric = MLLMJudgePairAccuracy()
    metric.update(labels, labels, [r["category"] for r in records], [r["id"] for r in records])
    perfect = metric.compute()
    assert float(perfect["pair_w_tie"]) == 1.0 and float(perfect["pair_wo_tie"]) == 1.0


def test_mllm_judge_tie_rules_against_hand_computation():
    # Subset coco: labels A, B, tie, A with predictions A, tie, tie, None.
    # w. Tie: 2 of 4 right (0.5). w.o. Tie: records A, B, A -> A right, predicted tie wrong, None wrong: 1/3.
    # Subset mm-vet: label B predicted B: 1.0 in both. Means over the two subsets: 0.75 and 2/3.
    metric = MLLMJudgePairAccuracy()
    metric.update([1, "tie", "tie", None, 2], [1, 2, "tie", 1, 2], ["coco"] * 4 + ["mm-vet"], list("abcde"))
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result["w_tie/coco"] == 0.5 and result["wo_tie/coco"] == pytest.approx(1 / 3)
    assert result["pair_w_tie"] == 0.75 and result["pair_wo_tie"] == pytest.approx(2 / 3)
    assert result["unparseable"] == 1 and "w_tie/WIT" not in result


def test_position_consistency_against_hand_computation():
    metric = PositionConsistency()
    # Verdicts as positions seen: stored order then swapped order.
    # (1, 2): same response both times -> consistent. (1, 1): always the first slot -> not.
    # (2, None): unparseable -> not consistent.
    metric.update([1, 1, 2], [2, 1, None])
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result["position_consistency"] == pytest.approx(1 / 3)
    assert result["first_position_rate"] == pytest.approx(3 / 5)  # five parsed verdicts, three name slot 1


def test_bad_records_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown prefix"):
        benchmarks.vlrb_category("Foo-1")
    with pytest.raises(ValueError, match="not A, B or C"):
        benchmarks.mllm_judge_fields({"pair_id": 1, "human": "D"})
    with pytest.raises(ValueError, match="order"):
        benchmarks.views("x", ["a", "b"], "sorted")


def test_metric_rejects_unknown_categories():
    with pytest.raises(ValueError, match="unknown group"):
        VLRewardBenchAccuracy().update([1], [1], ["vision"], ["k"])
    assert torch.equal(VLRewardBenchAccuracy().compute()["overall"], torch.tensor(0.0))


@needs_vlrb
def test_each_prompt_protocol_asks_for_a_verdict_its_parser_reads(vlrb_records):
    record = vlrb_records[0]
    official = benchmarks.judge_request(benchmarks.VLREWARDBENCH, record["question"], record["responses"], "benchmark")
    ours = benchmarks.judge_request(benchmarks.VLREWARDBENCH, record["question"], record["responses"], "carevl")
    assert official.startswith(" You are a highly capable multimodal AI assistant") and official != ours
    assert f"\n\nAnswer 1: {record['responses'][0]}\n\nAnswer 2: {record['responses'][1]}\n\n" in official
    assert "Overall Judgment: Answer X is better." in official and ours.endswith("where X is 1 or 2.")
    # MLLM-as-a-Judge: its own format allows a tie; carevl's prompt asks for the verdict line, which its parser reads
    pair = benchmarks.judge_request(benchmarks.MLLM_JUDGE, "q", ["a", "b"], "benchmark")
    assert "[[C]]" in pair and "[[C]]" not in benchmarks.judge_request(benchmarks.MLLM_JUDGE, "q", ["a", "b"], "carevl")
    assert [v for v, _ in benchmarks.verdict_choices(benchmarks.MLLM_JUDGE, "benchmark")] == [1, 2, "tie"]
    assert [v for v, _ in benchmarks.verdict_choices(benchmarks.MLLM_JUDGE, "carevl")] == [1, 2]
    for name in benchmarks.BENCHMARKS:
        for prompt in ("carevl", "benchmark"):
            for verdict, line in benchmarks.verdict_choices(name, prompt):
                assert benchmarks.parse(name, f"Both answers are short.\n{line}") == verdict


def test_auto_prompt_is_carevls_for_carevl_judges_and_the_benchmarks_otherwise(tmp_path):
    from carevl.prompts import write_trained_prompt

    assert benchmarks.resolve_prompt("auto", "Qwen/Qwen2-VL-7B-Instruct", training=False) == "benchmark"
    assert benchmarks.resolve_prompt("auto", str(tmp_path), training=False) == "benchmark"
    assert benchmarks.resolve_prompt("auto", str(tmp_path), training=True) == "carevl"  # validation while training
    write_trained_prompt(tmp_path)
    assert benchmarks.resolve_prompt("auto", str(tmp_path), training=False) == "carevl"
    assert benchmarks.resolve_prompt("benchmark", str(tmp_path), training=False) == "benchmark"
    with pytest.raises(ValueError, match="prompt must be one of"):
        benchmarks.resolve_prompt("official", str(tmp_path), training=False)
