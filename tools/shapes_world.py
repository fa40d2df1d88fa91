"""Write the shapes world's shards: judge SFT train and held-out sets, the tiny base model's pretraining
set, held-out records in the two benchmarks' formats (bench/vlrewardbench, bench/mllm_judge), and
DPO preference groups (groups/, groups-heldout/)."""

import argparse

from carevl.shapes import write_benchmarks, write_preference_groups, write_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory (train/, heldout/, pretrain/ go under it)")
    parser.add_argument("--train", type=int, default=2000, help="judge training samples")
    parser.add_argument("--heldout", type=int, default=200, help="held-out judge samples")
    parser.add_argument("--captions", type=int, default=2000, help="caption samples (and as many answered questions and quoting tasks) for base-model pretraining")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--benchmark", type=int, default=120, help="records of the world in each benchmark format (bench/)")
    parser.add_argument("--groups", type=int, default=800, help="DPO preference groups (correct vs simulated worse critiques, groups/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_world(args.out, args.train, args.heldout, args.captions, args.shard_size, args.seed)
    counts.update(write_benchmarks(f"{args.out}/bench", args.benchmark, seed=args.seed + 7))
    counts["groups"] = write_preference_groups(f"{args.out}/groups", args.groups, seed=args.seed + 11)
    counts["groups-heldout"] = write_preference_groups(f"{args.out}/groups-heldout", args.groups // 8, seed=args.seed + 13)
    print(f"wrote {counts} to {args.out}")


if __name__ == "__main__":
    main()
