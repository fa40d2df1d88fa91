"""Convert VL-RewardBench or MLLM-as-a-Judge (pair comparison) to carevl benchmark shards.

Sources:
  vlrewardbench-parquet  the Hugging Face release (parquet files with the images embedded)
  vlrewardbench-jsonl    the original data.jsonl plus the folder its image_path entries are relative to
  mllm-judge             the pair-comparison jsonl (e.g. Dataset/Benchmark/pair.jsonl) plus its image folder

Records whose image is missing or unreadable are counted, logged and skipped; the summary lists them.
Then: carevl test --config configs/eval/vlrewardbench.yaml --data.init_args.test=<out>
"""

import argparse
import logging
import sys
from pathlib import Path

from carevl import benchmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=("vlrewardbench-parquet", "vlrewardbench-jsonl", "mllm-judge"))
    parser.add_argument("inputs", nargs="+", help="parquet files or folders of them, or one jsonl file")
    parser.add_argument("--images", help="image folder (jsonl sources)")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    if args.source == "vlrewardbench-parquet":
        files = [f for p in args.inputs for f in (sorted(Path(p).glob("*.parquet")) if Path(p).is_dir() else [p])]
        if not files:
            parser.error(f"no parquet files in {args.inputs}")
        rows, to_fields = benchmarks.vlrb_parquet_rows(files), benchmarks.vlrb_fields
    else:
        if args.images is None or len(args.inputs) != 1:
            parser.error(f"{args.source} takes one jsonl file and --images")
        to_fields = benchmarks.vlrb_fields if args.source == "vlrewardbench-jsonl" else benchmarks.mllm_judge_fields
        rows = benchmarks.with_image_files(benchmarks.read_jsonl(args.inputs[0]), args.images)
    counts = benchmarks.write_benchmark_shards(rows, to_fields, args.out, args.shard_size)
    skipped = {k: v for k, v in counts.items() if k != "written"}
    print(f"wrote {counts['written']} records to {args.out}; skipped {sum(skipped.values())} {skipped or ''}")
    return 0 if counts["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
