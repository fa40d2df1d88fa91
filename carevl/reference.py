"""Precompute the DPO reference: summed log-probs of every critique of every preference group,
under the frozen starting model, written beside the shards (reference-logps.json).

Training with ``reference: precomputed`` then loads no reference weights at all, which is what
makes ZeRO-3 runs simple. Run it once per (starting model, shard set):

    python -m carevl.reference --model runs/sft/hf --shards data/dpo/groups
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from carevl import schema
from carevl.backbone import Backbone
from carevl.encoding import Encoder
from datamodules.preference import REFERENCE_FILE, build_group, collate_groups
from datamodules.stream import SamplePreparer, ValStream

log = logging.getLogger(__name__)


def precompute_reference(model: str, shards: str | Path, batch_size: int = 4, max_length: int = 4096, dtype: str = "float32", device: str = "cpu") -> Path:
    """Write ``<shards>/reference-logps.json`` and return its path. Skipped groups are counted in it."""
    backbone = Backbone(model=model, dtype=dtype)
    backbone.build()
    backbone.eval().to(device)
    encoder = Encoder(backbone.processor, max_length=max_length)
    manifest = schema.read_manifest(shards)
    preparer = SamplePreparer("preference_group", partial(build_group, encoder, None))
    batches = ValStream(manifest["urls"], preparer, partial(collate_groups, pad_token_id=encoder.pad_token_id), batch_size, rank=0, world_size=1)
    logps: dict[str, list[float]] = {}
    skipped: Counter = Counter()
    for batch in tqdm(batches, total=math.ceil(manifest["samples"] / batch_size), desc="reference log-probs", unit="batch"):
        skipped.update(batch["skipped"])
        batch["inputs"] = {k: v.to(device) for k, v in batch["inputs"].items()}
        batch["image_index"] = batch["image_index"].to(device)
        with torch.no_grad():
            values = backbone.group_logprobs(batch, backbone.image_features(batch["inputs"])).tolist()
        sizes = torch.bincount(batch["image_index"]).tolist()  # critiques per group, in batch order
        start = 0
        for group_id, size in zip(batch["ids"], sizes):
            logps[group_id] = values[start : start + size]
            start += size
    skipped.update(preparer.take_skipped())  # skips after the last batch
    out = Path(shards) / REFERENCE_FILE
    out.write_text(json.dumps({"model": model, "dtype": dtype, "skipped": dict(skipped), "logps": logps}))
    log.info("wrote reference log-probs of %d groups to %s (skipped: %s)", len(logps), out, dict(skipped) or "none")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the starting (SFT) checkpoint: the DPO reference")
    parser.add_argument("--shards", required=True, help="preference-group shard directory")
    parser.add_argument("--batch-size", type=int, default=4, help="groups per forward")
    parser.add_argument("--max-length", type=int, default=4096, help="the training max_length: longer critiques are skipped alike")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = precompute_reference(args.model, args.shards, args.batch_size, args.max_length, args.dtype, args.device)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
