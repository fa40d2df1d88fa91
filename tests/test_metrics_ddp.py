"""Benchmark metrics give identical results in one process and in two (DDP over gloo on CPU)."""

import json
import random

import torch.distributed as dist
import torch.multiprocessing as mp

from carevl.benchmarks import MLLM_JUDGE_SUBSETS, VLRB_CATEGORIES
from carevl.metrics import MLLMJudgePairAccuracy, PositionConsistency, VLRewardBenchAccuracy


def records(n=301, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(
            {
                "key": f"r{i}",
                "category": rng.choice(VLRB_CATEGORIES),
                "subset": rng.choice(MLLM_JUDGE_SUBSETS[:5]),
                "label": rng.choice((1, 2)),
                "tie_label": rng.choice((1, 2, "tie")),
                "prediction": rng.choice((1, 2, None)),
                "tie_prediction": rng.choice((1, 2, "tie", None)),
                "swapped_prediction": rng.choice((1, 2, None)),
            }
        )
    return out


def evaluate(rows, policy):
    vlrb, mllm, consistency = VLRewardBenchAccuracy(policy), MLLMJudgePairAccuracy(policy), PositionConsistency()
    for start in range(0, len(rows), 16):  # several updates, like batches
        chunk = rows[start : start + 16]
        keys = [r["key"] for r in chunk]
        vlrb.update([r["prediction"] for r in chunk], [r["label"] for r in chunk], [r["category"] for r in chunk], keys)
        mllm.update(
            [r["tie_prediction"] for r in chunk], [r["tie_label"] for r in chunk], [r["subset"] for r in chunk], keys
        )
        consistency.update([r["prediction"] for r in chunk], [r["swapped_prediction"] for r in chunk])
    results = {}
    for name, metric in (("vlrb", vlrb), ("mllm", mllm), ("consistency", consistency)):
        results.update({f"{name}/{k}": float(v) for k, v in metric.compute().items()})
    return results


POLICIES = ("wrong", "exclude", "random")


def _worker(rank, world, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = records()[rank::world]  # uneven shares: 151 and 150 records
        results = {policy: evaluate(rows, policy) for policy in POLICIES}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    for policy in POLICIES:
        two = json.loads(out.read_text())[policy]
        one = evaluate(records(), policy)
        assert two.keys() == one.keys()
        for key in one:
            assert abs(two[key] - one[key]) < 1e-9, (policy, key, two[key], one[key])
        assert 0 < one["vlrb/overall"] < 100 and one["vlrb/unparseable"] > 0
