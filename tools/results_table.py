"""Write (and print) the held-out verdict accuracy of several runs as results.md and results.json,
read from their CSV logs: the demo pipeline's last step, whose table the README quotes.

    python tools/results_table.py --logs runs/demo/logs --out runs/demo --rows base="base model" sft="SFT"

Each row names a CSV logger run (`<logs>/<name>/version_*/metrics.csv`, the newest version) and the
label it gets in the table. A run's accuracy is the last `val/verdict_accuracy` it logged; a missing
run is shown as missing, not skipped.
"""

import argparse
import csv
import json
from pathlib import Path


def last_logged(metrics_csv: Path, column: str) -> float | None:
    value = None
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            value = row.get(column) or value
    return None if value is None else float(value)


def newest_metrics(logs: Path, name: str) -> Path | None:
    runs = sorted((logs / name).glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    return runs[-1] if runs else None


def table(logs: Path, rows: list[tuple[str, str]]) -> list[dict]:
    results = []
    for name, label in rows:
        metrics = newest_metrics(logs, name)
        row = {"run": name, "model": label, "accuracy": None, "unparseable": None}
        if metrics is not None:
            row["accuracy"] = last_logged(metrics, "val/verdict_accuracy")
            row["unparseable"] = last_logged(metrics, "val/unparseable")
        results.append(row)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | held-out verdict accuracy | unparseable |", "|---|---|---|"]
    for row in results:
        if row["accuracy"] is None:
            lines.append(f"| {row['model']} | missing | |")
        else:
            lines.append(f"| {row['model']} | {100 * row['accuracy']:.1f}% | {row['unparseable']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", required=True, help="the CSV loggers' save_dir")
    parser.add_argument(
        "--rows",
        nargs="+",
        required=True,
        metavar="RUN=LABEL",
        help="logger run names and their labels, in table order",
    )
    parser.add_argument("--out", help="directory of results.md and results.json (default: --logs)")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.rows:
        name, sep, label = spec.partition("=")
        if not sep or not name:
            parser.error(f"a row is RUN=LABEL, got {spec!r}")
        rows.append((name, label))
    results = table(Path(args.logs), rows)
    out = Path(args.out or args.logs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results) + "\n")
    print("\n" + markdown(results) + f"\n\n(written to {out / 'results.md'} and results.json)")


if __name__ == "__main__":
    main()
