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


def engine_spec(model: str, base_url: str) -> dict:
    return {
        "class_path": "carevl.backends.openai_api.OpenAIChat",
        "init_args": {"model": model, "base_url": base_url, "max_attempts": 2, "max_backoff": 0.1},
    }


def test_an_engine_writes_the_critiques_in_place_of_the_loaded_weights(tiny_qwen, bench, tmp_path, monkeypatch):
    """`engine`: every view goes to the endpoint as the prompt the judge would read (its text, the
    record's image), greedy with the critique budget, and each reply is scored as that view's
    critique: an endpoint that answers every view rightly scores 100% on both answer orders, which it
    could not if replies were matched to the wrong views. The checkpoint's weights are never loaded."""
    import base64

    from carevl.backbone import Backbone
    from carevl.prompts import verdict_line
    from carevl.schema import read_shard_samples
    from carevl.standins.loopback import LoopbackEndpoint

    shards = bench / benchmarks.VLREWARDBENCH
    records = list(read_shard_samples(shards, "benchmark"))
    right = {}  # (image, prompt) -> the answer a right critique prefers
    for record in records:
        for swap in (False, True):
            responses, label = benchmarks.swapped(record.responses, record.label, swap)
            right[record.image, benchmarks.judge_request(record.benchmark, record.question, responses)] = label
    assert len(right) == 2 * len(records)

    def judge(body: dict) -> str:
        (message,) = body["messages"]
        image, text = message["content"]
        assert body["temperature"] == 0 and body["max_tokens"] == 8
        image = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
        return "The first answer is wrong. " + verdict_line(right[image, text["text"]])

    def never(self, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Backbone, "build", never)
    with LoopbackEndpoint(responder=judge) as endpoint:
        results, table, predictions = evaluate(
            tmp_path, tiny_qwen, shards, data={"prompt": "carevl"}, engine=engine_spec("judge", endpoint.base_url)
        )
        assert len(endpoint.requests) == len(records) == len(predictions)
    scores = results["results"][benchmarks.VLREWARDBENCH]
    assert scores["overall"] == 100.0 and scores["unparseable"] == 0
    assert {p["swapped"] for p in predictions} == {False, True}
    assert all(p["output"].startswith("The first answer is wrong.") for p in predictions)
    assert results["settings"]["engine"] == "OpenAIChat(judge)"


def test_an_engine_that_fails_a_view_stops_the_evaluation(tiny_qwen, bench, tmp_path):
    from carevl.standins.loopback import LoopbackEndpoint

    with LoopbackEndpoint(faults=["400"]) as endpoint, pytest.raises(RuntimeError, match="failed on 1 of 5 views"):
        evaluate(tmp_path, tiny_qwen, bench / benchmarks.VLREWARDBENCH, engine=engine_spec("judge", endpoint.base_url))
    with pytest.raises(ValueError, match="eval_mode must be 'generate'"):
        evaluate(tmp_path, tiny_qwen, bench, eval_mode="score", engine=engine_spec("judge", "http://127.0.0.1:9/v1"))


@pytest.mark.vllm_serve
def test_carevl_test_through_vllm_serve_writes_what_transformers_writes(bench, tmp_path):
    """The same `carevl test` on a trained tiny judge, once generating with transformers and once
    through `vllm serve` of the same checkpoint: the same critique, verdict line included, for every
    view, so the same table."""
    from carevl.backends.vllm import served
    from tests.helpers import ROOT, train_tiny_judge

    judge = str(train_tiny_judge(tmp_path / "judge"))
    shards = bench / benchmarks.VLREWARDBENCH
    settings = {"data": {"prompt": "carevl"}, "max_new_tokens": 120}
    here, *_, expected = evaluate(tmp_path / "transformers", judge, shards, **settings)
    python = str(ROOT / ".venv-vllm" / "bin" / "python")
    with served(judge, python=python, dtype="float32", max_model_len=2048, gpu_memory_utilization=0.1) as url:
        there, *_, written = evaluate(tmp_path / "vllm", judge, shards, engine=engine_spec(judge, url), **settings)
    assert sum(p["verdict"] in (1, 2) for p in expected) >= len(expected) // 2, "the judge writes verdicts"
    assert [p["output"] for p in written] == [p["output"] for p in expected]
    assert there["results"] == here["results"]
