"""Benchmark evaluation of a judge: verdicts by generation or by scoring, metrics per run, tables.

Two verdict modes:
- ``generate`` (the reference): the judge writes its critique, the verdict is parsed from it;
  greedy or sampled, N runs whose metrics are averaged (the paper averages 5).
- ``score`` (a fast proxy for judges that answer first): the verdict whose line is most likely
  right after the prompt; one forward over every candidate line, no generation.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carevl import benchmarks
from carevl.metrics import MLLMJudgePairAccuracy, PositionConsistency, VLRewardBenchAccuracy

MODES = ("generate", "score")

VLRB_COLUMNS = {
    "general": "General",
    "hallucination": "Hallucination",
    "reasoning": "Reasoning",
    "overall": "Overall Accuracy",
    "macro": "Macro Average Accuracy",
}
MLLM_COLUMNS = {"pair_w_tie": "Pair w. Tie", "pair_wo_tie": "Pair w.o. Tie"}
CONSISTENCY_COLUMNS = {"position_consistency": "Position consistency", "first_position_rate": "First-position rate"}


def score_verdicts(backbone: Any, batch: dict) -> tuple[list, torch.Tensor]:
    """Verdicts of a benchmark batch by likelihood: for each view, the candidate verdict line with
    the highest summed log-prob right after the prompt. Returns (verdicts, (B, K) log-probs)."""
    if "candidate_inputs" not in batch:
        raise ValueError(
            "score mode needs candidate inputs: the datamodule builds them when the module's eval_mode is 'score'"
        )
    k = batch["num_candidates"]
    logps = backbone.sequence_logprobs(batch["candidate_inputs"]).view(-1, k)
    choices = [[v for v, _ in benchmarks.verdict_choices(b, batch["prompt"])] for b in batch["benchmarks"]]
    best = logps.argmax(dim=1).tolist()
    return [options[i] for options, i in zip(choices, best)], logps


class BenchmarkEvaluation(nn.Module):
    """Metrics of benchmark verdicts: one metric set per run and per benchmark, position consistency
    for views shown in both orders, and the per-record predictions.

    Args:
        runs: independent verdict runs whose metrics are averaged.
        unparseable: policy for outputs without a verdict ("wrong", "exclude", "random").
    """

    def __init__(self, runs: int = 1, unparseable: str = "wrong"):
        super().__init__()
        if runs < 1:
            raise ValueError(f"runs must be at least 1, got {runs}")
        self.metrics = nn.ModuleDict(
            {
                benchmarks.VLREWARDBENCH: nn.ModuleList(VLRewardBenchAccuracy(unparseable) for _ in range(runs)),
                benchmarks.MLLM_JUDGE: nn.ModuleList(MLLMJudgePairAccuracy(unparseable) for _ in range(runs)),
            }
        )
        self.consistency = nn.ModuleDict(
            {name: nn.ModuleList(PositionConsistency() for _ in range(runs)) for name in benchmarks.BENCHMARKS}
        )
        self.predictions: list[dict[str, Any]] = []
        self._waiting: dict[tuple, Any] = {}

    def update(self, run: int, batch: dict, verdicts: list, outputs: list) -> None:
        """Add one run's verdicts on a batch; `outputs` (texts or candidate log-probs) go to the predictions."""
        name = batch["benchmarks"][0]
        labels, ids = batch["labels"], batch["ids"]
        keys = [f"{i}:{int(s)}:{run}" for i, s in zip(ids, batch["swapped"])]
        self.metrics[name][run].update(verdicts, labels, batch["categories"], keys)
        for record_id, swap, verdict in zip(ids, batch["swapped"], verdicts):
            other = self._waiting.pop((name, run, record_id, not swap), _MISSING)
            if other is _MISSING:
                self._waiting[(name, run, record_id, swap)] = verdict
            else:
                stored, flipped = (other, verdict) if swap else (verdict, other)
                self.consistency[name][run].update([stored], [flipped])
        for i, record_id in enumerate(ids):
            self.predictions.append(
                {
                    "id": record_id,
                    "benchmark": name,
                    "category": batch["categories"][i],
                    "swapped": batch["swapped"][i],
                    "label": labels[i],
                    "run": run,
                    "verdict": verdicts[i],
                    "correct": verdicts[i] is not None and verdicts[i] == labels[i],
                    "output": outputs[i],
                }
            )

    def compute(self) -> dict[str, dict[str, float]]:
        """Per benchmark evaluated: each metric's mean over runs (and `<metric>_std` when runs > 1)."""
        results = {}
        for name, per_run in self.metrics.items():
            if not per_run[0].update_called:
                continue
            values = [{k: float(v) for k, v in metric.compute().items()} for metric in per_run]
            consistency = self.consistency[name]
            if consistency[0].update_called:
                for run_values, metric in zip(values, consistency):
                    run_values.update({k: float(v) for k, v in metric.compute().items()})
            results[name] = _mean_over_runs(values)
        return results

    def reset(self) -> None:
        for group in (*self.metrics.values(), *self.consistency.values()):
            for metric in group:
                metric.reset()
        self.predictions.clear()
        self._waiting.clear()


_MISSING = object()


def _mean_over_runs(values: list[dict[str, float]]) -> dict[str, float]:
    result = {}
    for key in values[0]:
        series = [v[key] for v in values if key in v]
        result[key] = statistics.fmean(series)
        if len(series) > 1 and not key.startswith("seen"):  # every run sees the same views
            result[f"{key}_std"] = statistics.stdev(series)
    return result


def markdown_table(name: str, results: dict[str, float], judge: str) -> str:
    """The paper's columns for one benchmark (VL-RewardBench in %, MLLM-as-a-Judge as fractions)."""
    columns = dict(VLRB_COLUMNS if name == benchmarks.VLREWARDBENCH else MLLM_COLUMNS)
    columns.update({k: v for k, v in CONSISTENCY_COLUMNS.items() if k in results})
    columns["unparseable"] = "Unparseable"
    digits = 2 if name == benchmarks.VLREWARDBENCH else 3

    def cell(key: str) -> str:
        if key == "unparseable":
            return f"{results[key]:.0f}"
        std = results.get(f"{key}_std")
        return f"{results[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    lines = [
        f"### {name}",
        "",
        "| Judge | " + " | ".join(columns.values()) + " |",
        "|---" * (len(columns) + 1) + "|",
        f"| {judge} | " + " | ".join(cell(k) for k in columns) + " |",
    ]
    if "seen" in results:
        lines += ["", f"Views judged: {results['seen']:.0f}, in the accuracies: {results['scored']:.0f}."]
    subsets = [k.split("/", 1)[1] for k in results if k.startswith("w_tie/") and not k.endswith("_std")]
    if subsets:
        lines += ["", "| Subset | Pair w. Tie | Pair w.o. Tie |", "|---|---|---|"]
        for subset in subsets:
            wo = f"wo_tie/{subset}"
            lines.append(f"| {subset} | {cell(f'w_tie/{subset}')} | {cell(wo) if wo in results else ''} |")
    return "\n".join(lines) + "\n"


PROMPT_NAMES = {
    "carevl": "carevl's judge prompt",
    "benchmark": "the benchmark's own prompt (VL-RewardBench's official one; MLLM-as-a-Judge's [[A]]/[[B]]/[[C]])",
}


def protocol_line(settings: dict[str, Any]) -> str:
    """How the figures were produced, in words: prompt, answer order, verdict mode and decoding."""
    parts = [f"Prompt: {PROMPT_NAMES.get(settings.get('prompt'), settings.get('prompt'))}"]
    parts.append(f"answer order: {settings.get('order')}")
    if settings.get("eval_mode") == "score":
        parts.append("verdicts by the likelihood of each verdict line")
    elif settings.get("eval_sample"):
        parts.append(
            f"{settings['eval_runs']} sampled run(s) at temperature {settings['eval_temperature']}, "
            f"top-p {settings['eval_top_p']} (mean ± standard deviation over runs)"
        )
    else:
        parts.append(f"greedy decoding, {settings.get('eval_runs')} run(s)")
    parts.append(f"unparseable outputs: {settings.get('unparseable')}")
    return "; ".join(parts) + ".\n"


def write_results(
    out_dir: str | Path,
    results: dict[str, dict[str, float]],
    judge: str,
    settings: dict[str, Any],
    skipped: dict[str, int] | None = None,
) -> Path:
    """results.json (metrics, the settings that produced them, and, where known, the records the
    loader skipped before any reached the judge, by reason) and results.md (the tables, the same
    counts). `skipped` None: not known apart from other loaders' skips (validation during training)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped = None if skipped is None else dict(sorted(skipped.items()))
    (out / "results.json").write_text(
        json.dumps({"judge": judge, "settings": settings, "results": results, "skipped": skipped}, indent=1)
    )
    tables = [protocol_line(settings)] + [markdown_table(name, values, judge) for name, values in results.items()]
    if skipped is not None:
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items()) or "none"
        tables.append(f"\nRecords skipped before judging (left out of every figure above): {reasons}.\n")
    (out / "results.md").write_text("\n".join(tables))
    return out


def write_predictions(path: str | Path, predictions: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in predictions:
            f.write(json.dumps(record) + "\n")
