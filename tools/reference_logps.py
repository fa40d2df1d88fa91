"""Precompute the DPO reference: summed log-probs of every critique of every preference group,
under the frozen starting model, written beside the shards (reference-logps.json).

Training with ``reference: precomputed`` then loads no reference weights at all, which is what
makes ZeRO-3 runs simple. Run it once per (starting model, shard set):

    python tools/reference_logps.py --model runs/sft/hf --shards runs/curation/real/groups/best_to_worse
    torchrun --nproc-per-node 8 tools/reference_logps.py --model runs/sft/hf \
        --shards runs/curation/real/groups/best_to_worse --dtype bfloat16

Under torchrun each process takes its part of the groups (every WORLD_SIZE-th from RANK) on its own
GPU, with no communication. Each part appends every batch's log-probs to its own JSONL file beside
the shards, so a killed run is simply started again: it skips the groups already written. The part
that finishes last merges all of them into reference-logps.json.

The file records what its values were computed from: the checkpoint (`checkpoint_fingerprint`),
the shard set (`shards_fingerprint`) and each group's text and image (`group_fingerprint`). DPO
refuses a reference that does not match its model or its groups. Run again after the groups were
written anew, it recomputes the groups whose fingerprint changed and keeps the rest; after the
checkpoint changed, it starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from carevl import schema
from carevl.backbone import Backbone
from carevl.curation.records import Records, read_complete
from carevl.encoding import Encoder
from carevl.schema import REFERENCE_FILE, checkpoint_fingerprint
from datamodules.preference import collate_groups, encode_group
from datamodules.stream import SamplePreparer, ValStream

log = logging.getLogger(__name__)


SETTINGS, COMPLETE = "*settings*", "*complete*"  # record keys beside the group ids of a part file


def part_path(shards: str | Path, part: int, parts: int) -> Path:
    return Path(shards) / f"reference-logps.part{part}of{parts}.jsonl"


def precompute_reference(
    model: str,
    shards: str | Path,
    batch_size: int = 4,
    max_length: int = 4096,
    dtype: str = "float32",
    device: str = "cpu",
    part: int = 0,
    parts: int = 1,
) -> Path | None:
    """Compute the log-probs of this part's groups (every `parts`-th sample from `part`), skipping those
    its part file already holds, then merge the parts if all are complete. Returns the merged
    ``<shards>/reference-logps.json``, or None while another part is unfinished. Skipped groups
    are counted in it."""
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, {parts}), got {part}")
    settings = {"model": model, "model_files": checkpoint_fingerprint(model), "dtype": dtype, "max_length": max_length}
    path = part_path(shards, part, parts)
    records = Records(path)
    saved = next((r for r in records.ok() if r["key"] == SETTINGS), None)
    if saved is not None and saved != {"key": SETTINGS, **settings}:
        stale = path.with_suffix(".stale")
        log.warning(
            "%s was written with %s, not %s: starting over (the old file is now %s)", path, saved, settings, stale.name
        )
        os.replace(path, stale)
        records = Records(path)
    done = {r["key"]: r for r in records.ok()}
    if SETTINGS not in done:
        records.append([{"key": SETTINGS, **settings}])
    current = schema.shards_fingerprint(schema.read_manifest(shards))
    if done.get(COMPLETE, {}).get("shards") != current:  # a part is complete for one shard set
        fresh = {key: record["group"] for key, record in done.items() if key not in (SETTINGS, COMPLETE)}
        compute_part(records, fresh, settings, shards, batch_size, device, part, parts)
    return merge_parts(shards, parts, settings)


def compute_part(
    records: Records,
    done: dict[str, str],
    settings: dict,
    shards: str | Path,
    batch_size: int,
    device: str,
    part: int,
    parts: int,
) -> None:
    backbone = Backbone(model=settings["model"], dtype=settings["dtype"])
    backbone.build()
    backbone.eval().to(device)
    encoder = Encoder(backbone.processor, max_length=settings["max_length"])
    manifest = schema.read_manifest(shards)
    build = partial(encode_group, encoder, None)
    fingerprints: dict[str, str] = {}

    def stale(sample: schema.PreferenceGroupSample, image) -> list[dict]:
        """The group's item, unless its values were computed for its present text and image."""
        fingerprints[sample.id] = schema.group_fingerprint(sample)
        return [] if done.get(sample.id) == fingerprints[sample.id] else build(sample, image)

    preparer = SamplePreparer("preference_group", stale)
    batches = ValStream(
        manifest["urls"],
        preparer,
        partial(collate_groups, pad_token_id=encoder.pad_token_id),
        batch_size,
        rank=part,
        world_size=parts,
    )
    skipped: Counter = Counter()
    left = math.ceil(max(0, manifest["samples"] // parts - len(done)) / batch_size)
    for batch in tqdm(batches, total=left, desc=f"reference log-probs, part {part} of {parts}", unit="batch"):
        skipped.update(batch["skipped"])
        batch["inputs"] = {k: v.to(device) for k, v in batch["inputs"].items()}
        batch["image_index"] = batch["image_index"].to(device)
        with torch.no_grad():
            values = backbone.group_logprobs(batch, backbone.image_features(batch["inputs"])).tolist()
        sizes = torch.bincount(batch["image_index"]).tolist()  # critiques per group, in batch order
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        records.append(
            [
                {"key": group, "group": fingerprints[group], "logps": values[start : start + size]}
                for group, start, size in zip(batch["ids"], starts, sizes)
            ]
        )
    skipped.update(preparer.take_skipped())  # skips after the last batch
    records.append([{"key": COMPLETE, "skipped": dict(skipped), "shards": schema.shards_fingerprint(manifest)}])


def merge_parts(shards: str | Path, parts: int, settings: dict) -> Path | None:
    """Write reference-logps.json from every part file once all are complete for the shard set as it
    is now; None before that."""
    current = schema.shards_fingerprint(schema.read_manifest(shards, verify=False))
    logps: dict[str, list[float]] = {}
    groups: dict[str, str] = {}
    skipped: Counter = Counter()
    for part in range(parts):
        path = part_path(shards, part, parts)
        # read only: a part still running may be appending to its file
        latest = {r["key"]: r for r in read_complete(path)[0]} if path.exists() else {}
        if latest.get(COMPLETE, {}).get("shards") != current:
            log.info("part %d of %d is not finished: merge later", part, parts)
            return None
        skipped.update(latest.pop(COMPLETE)["skipped"])
        latest.pop(SETTINGS)
        logps.update({key: record["logps"] for key, record in latest.items()})
        groups.update({key: record["group"] for key, record in latest.items()})
    out = Path(shards) / REFERENCE_FILE
    temporary = out.with_suffix(".tmp")
    merged = {**settings, "shards": current, "skipped": dict(skipped), "groups": groups, "logps": logps}
    temporary.write_text(json.dumps(merged))
    os.replace(temporary, out)  # parts finishing together both write the same file; neither leaves half of one
    log.info("wrote reference log-probs of %d groups to %s (skipped: %s)", len(logps), out, dict(skipped) or "none")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the starting (SFT) checkpoint: the DPO reference")
    parser.add_argument("--shards", required=True, help="preference-group shard directory")
    parser.add_argument("--batch-size", type=int, default=4, help="groups per forward")
    parser.add_argument(
        "--max-length", type=int, default=4096, help="the training max_length: longer critiques are skipped alike"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--part",
        type=int,
        default=int(os.environ.get("RANK", 0)),
        help="which part of the groups (default: torchrun's RANK)",
    )
    parser.add_argument(
        "--parts",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", 1)),
        help="into how many parts (default: torchrun's WORLD_SIZE)",
    )
    gpu = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    parser.add_argument(
        "--device",
        default=gpu if torch.cuda.is_available() else "cpu",
        help="default: this process's GPU, else the CPU",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = precompute_reference(
        args.model, args.shards, args.batch_size, args.max_length, args.dtype, args.device, args.part, args.parts
    )
    print(
        f"wrote {out}"
        if out
        else f"part {args.part} of {args.parts} done; the last part to finish writes {REFERENCE_FILE}"
    )


if __name__ == "__main__":
    main()
