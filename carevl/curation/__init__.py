"""The curation pipeline (paper §3.1-3.4): records, the confidence split, the stages and the report.

Each stage reads the JSONL records of the stages before it from one work directory and appends its
own; `tools/curate.py` exposes every stage as a subcommand."""
