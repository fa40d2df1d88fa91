"""`carevl test` generating with transformers against `carevl test` generating through `vllm serve`
of the same judge checkpoint: the same config, records, prompts and batches, greedy.

Each path runs `--rounds` times, alternating (transformers, vLLM, transformers, ...), each run the
whole `carevl test` in this process (datamodule, processor, generation, scoring, tables; the
transformers path also loads the weights, which the vLLM path never does); the server's start and
its first requests (slow while it warms up) are timed apart. Prints every run's seconds, each
round's ratio, and how many views got the same verdict and the same critique. Needs vLLM's
environment (`bash tools/setup_vllm_env.sh`) and a judge checkpoint with benchmark shards, e.g.
the demo's (`bash tools/demo.sh`):

    python -m tools.bench.evaluation --config configs/demo/eval.yaml
    python -m tools.bench.evaluation --config configs/demo/eval.yaml --records 1000 --batch-size 250
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml


def evaluate(config: dict, out: Path, engine: dict | None) -> tuple[float, list[dict]]:
    """Seconds of one `carevl test` run of `config` (results under `out`) and its predictions."""
    from carevl.cli import run

    config = json.loads(json.dumps(config))
    module = config["model"]["init_args"]
    module["results_dir"] = str(out)
    if engine is not None:
        module["engine"] = engine
    config["trainer"]["default_root_dir"] = str(out)
    out.mkdir(parents=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    run(["test", "--config", str(path)])
    seconds = time.perf_counter() - start
    predictions = [json.loads(line) for line in (out / "predictions-test-rank0.jsonl").read_text().splitlines()]
    return seconds, predictions


def warm_up(model: str, url: str) -> None:
    from carevl.backends.interface import Chat, Sampling
    from carevl.backends.openai_api import OpenAIChat
    from carevl.standins.shapes import judge_items

    image = judge_items(1, seed=0)[0].image
    OpenAIChat(model, base_url=url).generate([Chat.user("Describe the image.", image)] * 8, Sampling(max_tokens=16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/eval.yaml", help="a `carevl test` config (JudgeEvaluator)")
    parser.add_argument(
        "--records", type=int, help="evaluate this many fresh shapes-world records instead of the config's shards"
    )
    parser.add_argument("--seed", type=int, default=7, help="which fresh records")
    parser.add_argument("--batch-size", type=int, help="views per batch on both paths (default: the config's)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each path, alternating")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight to the server")
    parser.add_argument("--max-model-len", type=int, default=2048, help="the server's context (the tiny judge's: 2048)")
    parser.add_argument("--dtype", default="float32", help="the server's; the config's backbone dtype is the other's")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.2, help="the server's share of memory (CPU memory here)"
    )
    parser.add_argument("--python", default=".venv-vllm/bin/python", help="vLLM's environment's python")
    args = parser.parse_args()

    from carevl.backends.vllm import served

    config = yaml.safe_load(Path(args.config).read_text())
    model = config["model"]["init_args"]["backbone"]["init_args"]["model"]
    work = Path(tempfile.mkdtemp(prefix="bench-evaluation-"))
    if args.records:
        from carevl.standins.world import write_benchmarks

        write_benchmarks(str(work / "bench"), n=args.records, seed=args.seed)
        config["data"]["init_args"]["test"] = str(work / "bench" / Path(config["data"]["init_args"]["test"]).name)
    if args.batch_size:
        config["data"]["init_args"]["val_batch_size"] = args.batch_size
    start = time.perf_counter()
    memory = args.gpu_memory_utilization
    with served(model, args.python, args.dtype, args.max_model_len, memory) as url:
        warm_up(model, url)  # the server's first requests are slow: part of its start, not of a run
        server_start = time.perf_counter() - start
        engine = {
            "class_path": "carevl.backends.openai_api.OpenAIChat",
            "init_args": {"model": model, "base_url": url, "concurrency": args.concurrency},
        }
        runs = []
        for round_ in range(args.rounds):
            here = evaluate(config, work / f"transformers-{round_}", None)
            there = evaluate(config, work / f"vllm-{round_}", engine)
            runs.append((here, there))

    batch = config["data"]["init_args"]["val_batch_size"]
    print(
        f"\n`carevl test --config {args.config}`: {model} on {config['data']['init_args']['test']}, greedy, "
        f"batches of {batch} views; server start {server_start:.1f} s (apart)"
    )
    for round_, ((hf_seconds, expected), (vllm_seconds, written)) in enumerate(runs):
        same_verdict = sum(a["verdict"] == b["verdict"] for a, b in zip(expected, written))
        same_critique = sum(a["output"] == b["output"] for a, b in zip(expected, written))
        print(
            f"round {round_}: transformers {hf_seconds:7.2f} s, vLLM {vllm_seconds:7.2f} s: "
            f"{hf_seconds / vllm_seconds:.2f}x; {len(expected)} views, same verdict {same_verdict}, "
            f"same critique {same_critique}"
        )
    for name, predictions in (("transformers", runs[0][0][1]), ("vLLM", runs[0][1][1])):
        correct = sum(p["correct"] for p in predictions)
        print(f"{name:12s} accuracy {correct / len(predictions):.1%} over {len(predictions)} views")


if __name__ == "__main__":
    main()
