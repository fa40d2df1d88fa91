"""`carevl test` and validation on benchmark shards: tables, per-record predictions, both verdict
modes, both answer orders, and benchmark metrics logged during SFT."""

import json
from pathlib import Path

import pytest
import yaml

from carevl import benchmarks, evaluation
from carevl.cli import run
from carevl.metrics import MLLMJudgePairAccuracy, VLRewardBenchAccuracy
from tests.helpers import fit, metrics


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from carevl.standins.world import write_benchmarks

    out = tmp_path_factory.mktemp("bench")
    write_benchmarks(str(out), n=24, seed=3)
    return out


def evaluate(tmp_path, model, shards, order="odd_length", data=None, **module):
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "carevl.judge.JudgeEvaluator",
            "init_args": {
                "backbone": {"class_path": "carevl.backbone.Backbone", "init_args": {"model": model}},
                "max_new_tokens": 8,
                "results_dir": str(tmp_path / "results"),
                **module,
            },
        },
        "data": {
            "class_path": "datamodules.JudgeDataModule",
            "init_args": {"test": str(shards), "order": order, "val_batch_size": 5, "num_workers": 1, **(data or {})},
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["test", "--config", str(path)])
    out = tmp_path / "results"
    predictions = [json.loads(line) for line in (out / "predictions-test-rank0.jsonl").read_text().splitlines()]
    return (
        json.loads((out / "test" / "results.json").read_text()),
        (out / "test" / "results.md").read_text(),
        predictions,
    )


def rescore(predictions, metric):
    """The benchmark metric recomputed from the per-record predictions file."""
    metric.update(
        [p["verdict"] for p in predictions],
        [p["label"] for p in predictions],
        [p["category"] for p in predictions],
        [f"{p['id']}:{int(p['swapped'])}:{p['run']}" for p in predictions],
    )
    return {k: float(v) for k, v in metric.compute().items()}


def test_score_mode_table_matches_its_predictions(tiny_qwen, bench, tmp_path):
    results, table, predictions = evaluate(tmp_path, tiny_qwen, bench / benchmarks.VLREWARDBENCH, eval_mode="score")
    scores = results["results"][benchmarks.VLREWARDBENCH]
    assert len(predictions) == 24 and all(p["verdict"] in (1, 2) for p in predictions)
    assert all(len(p["output"]) == 2 for p in predictions)  # the two candidate verdicts' log-probs
    assert all(p["verdict"] == 1 + int(p["output"][1] > p["output"][0]) for p in predictions)
    assert scores == pytest.approx(rescore(predictions, VLRewardBenchAccuracy()))
    assert scores["unparseable"] == 0
    assert "| Judge | General | Hallucination | Reasoning | Overall Accuracy | Macro Average Accuracy |" in table
    # Odd-length order: the labels the judge saw are those of the rule, not the stored ones.
    stored = {p["id"]: p for p in predictions}
    assert any(p["swapped"] for p in stored.values()) and any(not p["swapped"] for p in stored.values())


def test_generate_mode_with_runs_and_both_orders(tiny_qwen, bench, tmp_path):
    results, table, predictions = evaluate(
        tmp_path,
        tiny_qwen,
        bench / benchmarks.MLLM_JUDGE,
        order="both",
        eval_runs=2,
        eval_sample=True,
        unparseable="random",
    )
    scores = results["results"][benchmarks.MLLM_JUDGE]
    assert len(predictions) == 24 * 2 * 2  # records x orders x runs
    assert {p["run"] for p in predictions} == {0, 1} and all(isinstance(p["output"], str) for p in predictions)
    # A random tiny model writes no verdict: the random policy fills in a fixed pick per record.
    assert scores["unparseable"] == 48
    runs = [
        rescore([p for p in predictions if p["run"] == run], MLLMJudgePairAccuracy(unparseable="random"))
        for run in (0, 1)
    ]
    for key in runs[0]:  # the table holds the mean over runs of each run's metric, recomputed from its predictions
        assert scores[key] == pytest.approx((runs[0][key] + runs[1][key]) / 2), key
    assert "pair_w_tie_std" in scores and "position_consistency" in scores
    assert "Pair w. Tie" in table and "| coco |" in table and "Position consistency" in table
    assert "_std" not in table, "a spread is shown beside its mean, never as a row of its own"
    coco = next(line for line in table.splitlines() if line.startswith("| coco |"))
    assert coco.count(" ± ") == (2 if "wo_tie/coco" in scores else 1)
    assert results["settings"]["order"] == "both" and results["settings"]["eval_runs"] == 2


def test_every_record_is_judged_and_scored_or_reported_skipped(tiny_qwen, tmp_path):
    """An over-length record never reaches the judge: results say so, by reason, beside the counts
    of views judged and views in the accuracies."""
    from carevl.schema import BenchmarkSample, ShardWriter
    from carevl.standins.shapes import judge_items

    with ShardWriter(tmp_path / "bench", prefix="benchmark", kind="benchmark") as writer:
        for i, item in enumerate(judge_items(6, seed=8)):
            fields = item.fields()
            if i == 2:
                fields["responses"] = [fields["responses"][0] + " and more" * 600, fields["responses"][1]]
            writer.write(BenchmarkSample(**fields, benchmark=benchmarks.VLREWARDBENCH, category="general"))
    results, table, predictions = evaluate(
        tmp_path, tiny_qwen, tmp_path / "bench", data={"max_length": 768}, unparseable="exclude"
    )
    scores = results["results"][benchmarks.VLREWARDBENCH]
    assert results["skipped"] == {"too_long": 1} and len(predictions) == 5
    assert (scores["seen"], scores["seen/general"]) == (5, 5)
    assert scores["scored"] == 5 - scores["unparseable"]  # excluded: unparseable views leave the denominators
    assert "Views judged: 5, in the accuracies:" in table and "too_long 1" in table


@pytest.mark.parametrize("prompt", ["carevl", "benchmark"])
def test_one_judge_under_both_prompts_greedy_and_sampled(tiny_qwen, bench, tmp_path, prompt):
    """The prompt is stated in the results; greedy runs repeat, sampled runs differ (the checkpoint's
    generation config does not make sampling greedy); every record is counted in every run."""
    outputs = {}
    for mode, sample in (("greedy", False), ("sampled", True)):
        results, table, predictions = evaluate(
            tmp_path / mode,
            tiny_qwen,
            bench / benchmarks.VLREWARDBENCH,
            data={"prompt": prompt},
            eval_runs=2,
            eval_sample=sample,
            eval_temperature=1.0,
            max_new_tokens=12,
        )
        scores = results["results"][benchmarks.VLREWARDBENCH]
        assert results["settings"]["prompt"] == prompt and results["skipped"] == {}
        assert scores["seen"] == 24 and len(predictions) == 24 * 2  # records x runs, none dropped
        assert table.startswith(f"Prompt: {evaluation.PROMPT_NAMES[prompt]}")
        assert ("sampled run(s)" in table) == sample and ("greedy decoding" in table) == (not sample)
        runs = [[p["output"] for p in sorted(predictions, key=lambda p: p["id"]) if p["run"] == run] for run in (0, 1)]
        assert (runs[0] == runs[1]) == (not sample)
        outputs[mode] = runs[0]
    assert outputs["greedy"] != outputs["sampled"]


def test_the_two_prompts_give_the_judge_different_requests(tiny_qwen, bench, tmp_path):
    greedy = {}
    for prompt in ("carevl", "benchmark"):
        _, _, predictions = evaluate(
            tmp_path / prompt, tiny_qwen, bench / benchmarks.VLREWARDBENCH, data={"prompt": prompt}
        )
        greedy[prompt] = {p["id"]: p["output"] for p in predictions}
    assert greedy["carevl"].keys() == greedy["benchmark"].keys()
    assert greedy["carevl"] != greedy["benchmark"]  # the same greedy judge, asked differently


def test_test_without_benchmark_shards_is_a_clear_error(tiny_qwen, world, tmp_path):
    with pytest.raises(ValueError, match="benchmark"):
        evaluate(tmp_path, tiny_qwen, world / "heldout")


def test_sft_validation_logs_benchmark_metrics(tiny_qwen, world, bench, tmp_path):
    fit(
        tmp_path,
        tiny_qwen,
        world / "train",
        bench / benchmarks.VLREWARDBENCH,
        trainer={"limit_train_batches": 2},
        max_steps=2,
        limit_val_batches=2,
        val_batch_size=6,
    )
    logged = [row for row in metrics(tmp_path) if row.get("val/vlrewardbench/overall")]
    assert logged, "no VL-RewardBench metrics in the validation logs"
    assert 0.0 <= float(logged[-1]["val/vlrewardbench/overall"]) <= 100.0
    assert list(Path(tmp_path).rglob("predictions-val-step*-rank0.jsonl"))
