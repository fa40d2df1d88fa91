"""Write (and print) the held-out verdict accuracy of several runs as results.md, results.json and
a plot, read from their CSV logs: the demo pipeline's last step, whose table the README quotes.

    python tools/results_table.py --logs runs/demo/logs --out runs/demo --rows base="base model" sft="SFT" \
        --categories coarse fine --plot

Several runs' results.json (e.g. the demo with three seeds) combine into one table of means and
ranges: python tools/results_table.py --combine seed0/results.json seed1/results.json ...

Each row names a CSV logger run (`<logs>/<name>/version_*/metrics.csv`, the newest version) and the
label it gets in the table. A run's accuracy is the last `val/verdict_accuracy` it logged, and per
category the last `val/verdict_accuracy/<category>` (`val_categories` of the judge module); a
missing run is shown as missing, not skipped. Runs validated more than once also get their curve
(accuracy at each validated step) in results.md and the plot, so a reader sees whether a training
ended on a plateau or mid-climb. `--skills RUN=LABEL` adds the exact match a run last logged on
instruction checks (`val/exact_match`), e.g. whether pretraining taught the base model the shapes
world's quoting task, below the table of results.md. `--paired RUN` compares every other run with
RUN item by item on the held-out set, from the verdicts each judge wrote at its last validation
(`verdicts-step*-rank*.jsonl` beside its metrics): how many items it fixed and broke, and the exact
sign test's p-value, overall and per category. On a set of a few hundred items a difference of a
few points can be chance; the p-value says whether it is.
"""

import argparse
import csv
import json
import re
from pathlib import Path

from carevl.metrics import paired_changes, sign_test

ACCURACY = "val/verdict_accuracy"
EXACT_MATCH = "val/exact_match"
BASE_FIELDS = ("run", "model", "accuracy", "unparseable")


def logged(rows: list[dict], column: str) -> list[tuple[int, float]]:
    """(step, value) of every CSV row that logged `column`."""
    return [(int(row["step"]), float(row[column])) for row in rows if row.get(column)]


def last(rows: list[dict], column: str) -> float | None:
    values = logged(rows, column)
    return values[-1][1] if values else None


def newest_metrics(logs: Path, name: str) -> Path | None:
    runs = sorted((logs / name).glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    return runs[-1] if runs else None


def logged_rows(logs: Path, name: str) -> list[dict] | None:
    """The CSV rows of run `name`'s newest version; None when it has none."""
    metrics = newest_metrics(logs, name)
    if metrics is None:
        return None
    with open(metrics) as f:
        return list(csv.DictReader(f))


def last_verdicts(logs: Path, name: str) -> list[dict] | None:
    """Run `name`'s per-item held-out verdicts at its last validation (every rank's file), from its
    newest version; None when it wrote none."""
    metrics = newest_metrics(logs, name)
    files = sorted(metrics.parent.glob("verdicts-step*-rank*.jsonl")) if metrics else []
    if not files:
        return None
    steps = {path: int(re.search(r"step(\d+)", path.name).group(1)) for path in files}
    last = max(steps.values())
    return [json.loads(line) for path in files if steps[path] == last for line in path.read_text().splitlines() if line]


def paired(logs: Path, reference: str, rows: list[tuple[str, str]], categories: list[str] = ()) -> dict[str, dict]:
    """Each run's items fixed and broken against run `reference`, with the sign test's p-value,
    overall and per category: {run: {"overall" | category: {"fixed", "broken", "p"}}}."""
    base = last_verdicts(logs, reference)
    if base is None:
        raise ValueError(f"--paired {reference}: that run wrote no held-out verdicts under {logs}")

    def right(records: list[dict], category: str | None) -> dict[str, bool]:
        return {r["id"]: r["verdict"] == r["label"] for r in records if category in (None, r["category"])}

    out = {}
    for name, _ in rows:
        records = None if name == reference else last_verdicts(logs, name)
        if records is None:
            continue
        out[name] = {}
        for category in (None, *categories):
            fixed, broken = paired_changes(right(base, category), right(records, category))
            out[name][category or "overall"] = {"fixed": fixed, "broken": broken, "p": sign_test(fixed, broken)}
    return out


def paired_markdown(comparisons: dict[str, dict], labels: dict[str, str], reference: str, categories=()) -> str:
    columns = ["overall", *categories]
    lines = [
        f"Item by item against {labels[reference]} on the same held-out items: fixed / broken (exact sign test p):",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, by in comparisons.items():
        cells = [f"+{by[c]['fixed']} / -{by[c]['broken']} (p {by[c]['p']:.2f})" for c in columns]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def skills(logs: Path, rows: list[tuple[str, str]]) -> str:
    """Markdown lines: each run's last exact match on instruction checks, at its training step (a
    run that only validated, such as `carevl validate` of a checkpoint, logs step 0 and shows none)."""
    lines = []
    for name, label in rows:
        values = logged(logged_rows(logs, name) or [], EXACT_MATCH)
        if not values:
            lines.append(f"- {label}: missing")
            continue
        step, value = values[-1]
        lines.append(f"- {label}: {percent(value)} exact" + (f" (step {step + 1})" if step else ""))
    return "\n".join(lines)


def table(logs: Path, rows: list[tuple[str, str]], categories: list[str] = ()) -> list[dict]:
    results = []
    for name, label in rows:
        found = logged_rows(logs, name)
        row = {"run": name, "model": label, "accuracy": None, "unparseable": None}
        row.update({category: None for category in categories})
        row["curve"] = []
        if found is not None:
            row["accuracy"] = last(found, ACCURACY)
            row["unparseable"] = last(found, "val/unparseable")
            row.update({category: last(found, f"{ACCURACY}/{category}") for category in categories})
            row["curve"] = logged(found, ACCURACY)
        results.append(row)
    return results


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def markdown(results: list[dict], categories: list[str] = ()) -> str:
    lines = [
        "| model | held-out verdict accuracy | " + "".join(f"{c} | " for c in categories) + "unparseable |",
        "|---|---|" + "---|" * len(categories) + "---|",
    ]
    for row in results:
        if row["accuracy"] is None:
            lines.append(f"| {row['model']} | missing | " + "| " * len(categories) + "|")
        else:
            cells = "".join(f"{percent(row[c])} | " for c in categories)
            lines.append(f"| {row['model']} | {percent(row['accuracy'])} | {cells}{row['unparseable']:.0f} |")
    curves = [row for row in results if len(row["curve"]) > 1]
    if curves:
        lines += ["", "Held-out verdict accuracy at each validated step:", ""]
        for row in curves:
            points = ", ".join(f"{percent(value)} ({step + 1})" for step, value in row["curve"])
            lines.append(f"- {row['model']}: {points}")
    return "\n".join(lines)


def combine(tables: list[list[dict]], categories: list[str]) -> str:
    """One markdown table of several runs of the same rows: each cell the mean, with the lowest and
    highest value, over the tables."""
    columns = ["accuracy", *categories]
    lines = [
        f"| model ({len(tables)} runs: mean, range) | held-out verdict accuracy |"
        + "".join(f" {c} |" for c in categories),
        "|---|---|" + "---|" * len(categories),
    ]
    for rows in zip(*tables):
        if len({row["run"] for row in rows}) != 1:
            raise ValueError(f"the tables list different runs in the same place: {[row['run'] for row in rows]}")
        cells = []
        for column in columns:
            values = [100 * row[column] for row in rows if row.get(column) is not None]
            cells.append(
                f"{sum(values) / len(values):.1f}% ({min(values):.1f}-{max(values):.1f})"
                if len(values) == len(rows)
                else "missing"
            )
        lines.append(f"| {rows[0]['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], categories: list[str], path: Path) -> None:
    """Bars of each run's accuracy (overall and per category), and the curves of runs validated
    more than once, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in results if row["accuracy"] is not None]
    curves = [row for row in results if len(row["curve"]) > 1]
    figure, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 8, 4.5), squeeze=False)
    bars = axes[0][0]
    columns = ["accuracy", *categories]
    width = 0.8 / len(columns)
    for k, column in enumerate(columns):
        values = [100 * (row[column] or 0) for row in shown]
        bars.bar([i + k * width for i in range(len(shown))], values, width, label="overall" if k == 0 else column)
    bars.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(shown))])
    bars.set_xticklabels([row["run"] for row in shown], rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("held-out verdict accuracy (%)")
    bars.set_ylim(0, 100)
    bars.legend(fontsize=8)
    if curves:
        lines = axes[0][1]
        for row in curves:
            lines.plot(
                [s + 1 for s, _ in row["curve"]], [100 * v for _, v in row["curve"]], marker="o", label=row["run"]
            )
        lines.set_xlabel("training step")
        lines.set_ylabel("held-out verdict accuracy (%)")
        lines.set_ylim(0, 100)
        lines.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", help="the CSV loggers' save_dir")
    parser.add_argument("--combine", nargs="+", metavar="RESULTS_JSON", help="print the mean table of these instead")
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="RUN=LABEL",
        help="logger run names and their labels, in table order",
    )
    parser.add_argument(
        "--categories", nargs="*", default=[], help="held-out categories to give columns (the runs' val_categories)"
    )
    parser.add_argument(
        "--skills",
        nargs="*",
        default=[],
        metavar="RUN=LABEL",
        help="runs whose last exact match on instruction checks (val/exact_match) goes below the table",
    )
    parser.add_argument(
        "--paired",
        metavar="RUN",
        help="compare every other run with this one item by item (fixed / broken, sign test) below the table",
    )
    parser.add_argument("--plot", action="store_true", help="also draw results.png (needs matplotlib)")
    parser.add_argument("--out", help="directory of results.md, results.json and results.png (default: --logs)")
    args = parser.parse_args(argv)
    if args.combine:
        tables = [json.loads(Path(path).read_text()) for path in args.combine]
        categories = args.categories or [k for k in tables[0][0] if k not in (*BASE_FIELDS, "curve", "paired")]
        print(combine(tables, categories))
        return
    if not args.logs or not args.rows:
        parser.error("--logs and --rows are required (or --combine)")
    rows, skill_rows = run_labels(parser, args.rows), run_labels(parser, args.skills)
    if args.paired and args.paired not in dict(rows):
        parser.error(f"--paired {args.paired}: not one of the --rows")
    results = table(Path(args.logs), rows, args.categories)
    text = markdown(results, args.categories)
    if args.paired:
        comparisons = paired(Path(args.logs), args.paired, rows, args.categories)
        for row in results:
            row["paired"] = {"against": args.paired, **comparisons[row["run"]]} if row["run"] in comparisons else None
        text += "\n\n" + paired_markdown(comparisons, dict(rows), args.paired, args.categories)
    if skill_rows:
        text += "\n\nExact match on instruction checks:\n\n" + skills(Path(args.logs), skill_rows)
    out = Path(args.out or args.logs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(text + "\n")
    written = "results.md and results.json"
    if args.plot:
        plot(results, args.categories, out / "results.png")
        written = "results.md, results.json and results.png"
    print("\n" + text + f"\n\n(written to {out}: {written})")


def run_labels(parser: argparse.ArgumentParser, specs: list[str]) -> list[tuple[str, str]]:
    """(run, label) of each RUN=LABEL argument."""
    pairs = []
    for spec in specs:
        name, sep, label = spec.partition("=")
        if not sep or not name:
            parser.error(f"a row is RUN=LABEL, got {spec!r}")
        pairs.append((name, label))
    return pairs


if __name__ == "__main__":
    main()
