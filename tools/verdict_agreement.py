"""How often two evaluations of the same judge give the same verdict, record by record.

Typical use: the `score` and `generate` verdict modes on one checkpoint,
  python tools/verdict_agreement.py runs/eval/generate/predictions-test-rank0.jsonl \
      runs/eval/score/predictions-test-rank0.jsonl
Records are joined on (id, answer order, run); an unparseable verdict never agrees.
"""

import argparse
import json


def load(path: str) -> dict[tuple, dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {(r["id"], r["swapped"], r["run"]): r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="predictions JSONL written by carevl test / validate")
    parser.add_argument("second", help="predictions JSONL of the other evaluation")
    args = parser.parse_args()
    first, second = load(args.first), load(args.second)
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise SystemExit("the two files share no (id, order, run) records")
    agree = sum(first[k]["verdict"] is not None and first[k]["verdict"] == second[k]["verdict"] for k in shared)
    for name, rows in (("first", first), ("second", second)):
        correct = sum(rows[k]["correct"] for k in shared)
        print(f"{name}: accuracy {100 * correct / len(shared):.1f}% on {len(shared)} shared records")
    print(f"verdict agreement: {agree}/{len(shared)} = {100 * agree / len(shared):.1f}%")


if __name__ == "__main__":
    main()
