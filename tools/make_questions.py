"""Draw curation items from the paper's source datasets into one questions file for `ingest`.

    python tools/make_questions.py --config configs/sources/paper.yaml
    python tools/make_questions.py --help

Each source is read in its published format (carevl/curation/sources.py: LLaVA-style conversation
JSON with an image folder, LRV-Instruction's annotations, M3IT's jsonl with base64 images, Hugging
Face parquet with embedded images), sampled to its `sample` size with the seed, and written as
<out>/questions.jsonl with the images under <out>/images/<source>/ and the counts in
<out>/sources.json. Every record is written or counted as skipped with its reason.
"""

import logging

from jsonargparse import CLI

from carevl.curation.sources import Source, write_questions


def make_questions(sources: list[Source], out: str = "data", seed: int = 0) -> dict:
    """Write <out>/questions.jsonl from the sources.

    Args:
        sources: the datasets, each with name, format, path, images and sample (see carevl/curation/sources.py).
        out: the output folder (questions.jsonl, images/, sources.json).
        seed: the seed of every source's sample.
    """
    summary = write_questions(sources, out, seed)
    for name, counts in summary.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    CLI(make_questions, as_positional=False)
