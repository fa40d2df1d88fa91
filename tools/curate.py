"""Curation stages of CAREVL (paper §3.1-3.5), one subcommand each, configured by YAML.

Curation I: ingest, decontaminate, candidates, captions, pairs, judge, votes, split, sft_shards, report.
Curation II (after SFT): critiques (sampled from the SFT judge), evaluate (scores), groups (DPO shards).

Run a stage:    python tools/curate.py --config configs/curation/shapes.yaml candidates
Run them all:   for s in ingest candidates captions pairs judge votes split sft_shards report; do ...; done
Help on one:    python tools/curate.py candidates --help

Every stage appends to its JSONL under the work directory and skips work already done, so a killed
stage is simply run again. A stage whose units failed beyond its `max_failed` share, or whose
endpoint refused the key or the account, exits with status 1 (its records kept), so a pipeline
never takes it for done. API keys come from the environment only (see `api_key_env`).
"""

import logging
import sys

from jsonargparse import CLI

from carevl.backends.interface import EndpointRefused
from carevl.curation.critiques import critiques, evaluate, groups
from carevl.curation.decontaminate import StaleDecontamination, decontaminate
from carevl.curation.labels import judge, sft_shards, split, votes
from carevl.curation.records import FolderBusy
from carevl.curation.report import Truth, write_report
from carevl.curation.stages import candidates, captions, ingest, pairs
from carevl.curation.units import StageFailed


def report(workdir: str, out: str | None = None, truth: Truth | None = None) -> dict:
    """Write the curation report (markdown, JSON and PNG plots).

    Args:
        workdir: the curation work directory.
        out: where the report goes (default <workdir>/report).
        truth: import path of a function (item record, the pair's two answers) -> the truly better
            answer (1, 2 or None), for data with a known truth: the report adds label precision
            (the shapes world's: carevl.standins.shapes.true_label).
    """
    return write_report(workdir, out, truth)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stages = [
        ingest,
        decontaminate,
        candidates,
        captions,
        pairs,
        judge,
        votes,
        split,
        sft_shards,
        report,
        critiques,
        evaluate,
        groups,
    ]
    try:
        CLI(stages, as_positional=False, args=argv)
    except (StageFailed, FolderBusy, StaleDecontamination) as error:
        sys.exit(f"stage failed: {error}")
    except EndpointRefused as error:
        sys.exit(
            f"stage stopped: the endpoint refused the request ({error}); the remaining requests were not sent. "
            "Check the key and the account, then run the stage again."
        )


if __name__ == "__main__":
    main()
