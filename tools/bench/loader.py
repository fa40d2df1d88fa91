"""Does loading keep up with training? Prints the datamodule's samples/s alone next to the
training step's samples/s (forward + backward + optimizer step on batches already in memory).

    python -m tools.bench.loader --model runs/demo/base --shards runs/demo/world/train
"""

import argparse
import time

import torch

from carevl.backbone import Backbone
from carevl.losses import sft_loss
from datamodules import JudgeDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint (and processor) to train")
    parser.add_argument("--shards", required=True, help="directory of SFT shards with a manifest")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--batches", type=int, default=30, help="timed batches (after one warm-up batch)")
    args = parser.parse_args()

    data = JudgeDataModule(
        processor=args.model, train=args.shards, batch_size=args.batch_size, num_workers=args.workers
    )
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader)]  # warm-up: worker start and the first shard open
    start = time.perf_counter()
    batches += [next(loader) for _ in range(args.batches)]
    load_rate = args.batches * args.batch_size / (time.perf_counter() - start)

    backbone = Backbone(args.model)
    backbone.build()
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-5)

    def step(batch):
        logps, rows = backbone.response_logprobs(batch["inputs"])
        sft_loss(logps, batch["weights"], rows).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    step_rate = args.batches * args.batch_size / (time.perf_counter() - start)
    print(f"loader alone ({args.workers} worker(s)): {load_rate:8.1f} samples/s")
    print(f"training step:             {step_rate:8.1f} samples/s")
    print(f"loader / step:             {load_rate / step_rate:8.2f}  (above 1: loading keeps up)")


if __name__ == "__main__":
    main()
