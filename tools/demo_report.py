"""Print the demo's held-out verdict accuracy table from its CSV logs."""

import csv
import sys
from pathlib import Path


def last_value(metrics_csv: Path, column: str) -> str:
    value = ""
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            value = row.get(column) or value
    return value


def main() -> None:
    logs, seconds = Path(sys.argv[1]), sys.argv[2]
    print("\n| model | held-out verdict accuracy | unparseable |\n|---|---|---|")
    for name, label in (("base", "base (captions only, no judge training)"), ("sft", "SFT judge")):
        runs = sorted((logs / name).glob("version_*/metrics.csv"))
        if not runs:
            print(f"| {label} | missing | |")
            continue
        accuracy = last_value(runs[-1], "val/verdict_accuracy")
        unparseable = last_value(runs[-1], "val/unparseable")
        print(f"| {label} | {float(accuracy):.3f} | {float(unparseable):.0f} |")
    print(f"\ndemo finished in {seconds} s")


if __name__ == "__main__":
    main()
