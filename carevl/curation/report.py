"""The curation report: counts per stage, failures by reason, judge-expert agreement, vote histogram,
confidence split sizes and, given a way to tell which answer is truly better (`truth`: the shapes
world has one), the label precision of the high-confidence set against the judge alone. Markdown
plus PNG plots."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from carevl.curation.units import FILES, items_by_id, records

# (item record, the pair's two answers) -> the truly better answer, 1 or 2, or None when unknown
Truth = Callable[[dict, list[str]], "int | None"]


def precision(rows: list[dict], items: dict[str, dict], label_of, truth: Truth) -> tuple[int, int]:
    """(labels matching the truth, pairs with a known true label and a label)."""
    hits = total = 0
    for row in rows:
        true, label = truth(items[row["item"]], row["responses"]), label_of(row)
        if true is not None and label is not None:
            total += 1
            hits += true == label
    return hits, total


def percent(hits: int, total: int) -> str:
    return f"{100 * hits / total:.1f}% ({hits}/{total})" if total else "n/a"


def figures(workdir: str | Path, truth: Truth | None = None) -> dict:
    items = items_by_id(workdir)
    stages = {}
    for stage in FILES:
        found = records(workdir, stage)
        stages[stage] = {
            "ok": len(found.ok()),
            "failed": sum(found.failures().values()),
            "failures": dict(found.failures()),
        }
    rows = records(workdir, "split").ok()
    with_both = [r for r in rows if r["judge"] is not None and r["votes"][0] != r["votes"][1]]
    agree = sum((1 if r["votes"][0] > r["votes"][1] else 2) == r["judge"] for r in with_both)
    high = [r for r in rows if r["confidence"] == "high"]
    low = [r for r in rows if r["confidence"] == "low"]
    found = {
        "stages": stages,
        "pairs": len(rows),
        "judge_expert_agreement": [agree, len(with_both)],
        "max_votes": dict(sorted(Counter(max(r["votes"]) for r in rows).items())),
        "expert_ties": dict(sorted(Counter(r["ties"] for r in rows).items())),
        "split": dict(sorted(Counter(f"{r['confidence']}: {r['rule']}" for r in rows).items())),
    }
    if truth is not None:
        found["precision"] = {
            "judge alone (all judged pairs)": precision(rows, items, lambda r: r["judge"], truth),
            "high confidence": precision(high, items, lambda r: r["label"], truth),
            "low confidence, relabeled": precision(low, items, lambda r: r["label"], truth),
        }
    return found


def plot(values: dict, title: str, xlabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(k) for k in values], list(values.values()), color="#4c72b0")
    ax.set(title=title, xlabel=xlabel, ylabel="pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(workdir: str, out: str | None = None, truth: Truth | None = None) -> dict:
    """Write report.md, report.json and the PNG plots to `out` (default <workdir>/report).

    Args:
        workdir: the curation work directory.
        out: where the report goes.
        truth: a function (item record, the pair's two answers) -> the truly better answer (1, 2 or
            None), where the data has a known truth: the report then adds label precision.
    """
    found = figures(workdir, truth)
    target = Path(out or Path(workdir) / "report")
    target.mkdir(parents=True, exist_ok=True)
    plot(found["max_votes"], "Votes for the majority answer", "max(v1, v2)", target / "votes.png")
    plot({k.replace(": ", "\n"): v for k, v in found["split"].items()}, "Confidence split", "", target / "split.png")
    lines = ["# Curation report", "", "| stage | records | failed | failures by reason |", "|---|---:|---:|---|"]
    for stage, row in found["stages"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["failures"].items())) or "-"
        lines.append(f"| {stage} ({FILES[stage]}) | {row['ok']} | {row['failed']} | {reasons} |")
    lines += [
        "",
        f"Pairs in the split: {found['pairs']}.",
        "Judge-expert agreement (pairs with an expert majority and a verdict): "
        f"{percent(*found['judge_expert_agreement'])}.",
        "",
    ]
    lines += ["| max(v1, v2) | pairs |", "|---:|---:|"] + [f"| {k} | {v} |" for k, v in found["max_votes"].items()]
    lines += ["", "| experts tied | pairs |", "|---:|---:|"] + [
        f"| {k} | {v} |" for k, v in found["expert_ties"].items()
    ]
    lines += ["", "| confidence: rule | pairs |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in found["split"].items()]
    if any(total for _, total in found.get("precision", {}).values()):
        lines += [
            "",
            "Label precision against the world's truth (pairs where exactly one answer is right):",
            "",
            "| labels | precision |",
            "|---|---:|",
        ]
        lines += [f"| {name} | {percent(*value)} |" for name, value in found["precision"].items()]
    lines += ["", "![votes](votes.png) ![split](split.png)", ""]
    (target / "report.md").write_text("\n".join(lines))
    (target / "report.json").write_text(json.dumps(found, indent=1))
    print("\n".join(lines))
    return found
