"""The two evaluation benchmarks: their records, categories and answer-order rules.

VL-RewardBench (1,250 records) groups its records into three categories by the prefix of their id,
and lists the preferred response first in 1,245 of them, so the order the judge sees must be
decided by the evaluation, never taken from the file. MLLM-as-a-Judge pair comparison has 14
subsets, a tie label, and a fixed order (answer1 is A).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VLREWARDBENCH = "vlrewardbench"
MLLM_JUDGE = "mllm_judge"
BENCHMARKS = (VLREWARDBENCH, MLLM_JUDGE)

VLRB_CATEGORIES = ("general", "hallucination", "reasoning")
_VLRB_PREFIXES = {
    "wildvision": "general",
    "jailbreak": "general",
    "lrvinstruction": "general",
    "politics": "general",
    "svit": "general",
    "hallucination": "hallucination",
    "rlaif": "hallucination",
    "rlhf": "hallucination",
    "mathverse": "reasoning",
    "mmmu": "reasoning",
}

MLLM_JUDGE_SUBSETS = (
    "coco",
    "Concept Caption",
    "diffusiondb",
    "infographicsVQA",
    "mathvista",
    "textVQA",
    "WIT",
    "ChartQA",
    "VisitBench",
    "llava_bench",
    "mind2web",
    "ScienceQA",
    "AesBench",
    "mm-vet",
)
_TIE_LETTERS = {"A": 1, "B": 2, "C": "tie"}

# How the two responses are shown to the judge.
ORDERS = ("odd_length", "random", "both", "as_stored")
# Which request the judge gets (see `resolve_prompt`).
PROMPTS = ("auto", "carevl", "benchmark")


def vlrb_category(record_id: str) -> str:
    """general / hallucination / reasoning from the id's prefix (text before the first '-' or '_')."""
    prefix = re.split(r"[-_]", str(record_id), maxsplit=1)[0].lower()
    if prefix not in _VLRB_PREFIXES:
        raise ValueError(f"VL-RewardBench id {record_id!r} has an unknown prefix {prefix!r}")
    return _VLRB_PREFIXES[prefix]


def vlrb_fields(record: dict[str, Any]) -> dict[str, Any]:
    """Benchmark-sample fields of a VL-RewardBench record (the original jsonl or the HF release).

    The label is the position of rank 0 in `human_ranking`, counted from 1.
    """
    ranking = list(record["human_ranking"])
    if sorted(ranking) != [0, 1]:
        raise ValueError(f"{record['id']}: human_ranking {ranking!r} is not a ranking of two responses")
    query = str(record["query"])
    if query.startswith("<image>"):
        query = query[len("<image>") :].lstrip("\n")
    meta = {"query_source": record.get("query_source")}
    if record.get("ground_truth") is not None:
        meta["ground_truth"] = record["ground_truth"]
    return {
        "id": str(record["id"]),
        "benchmark": VLREWARDBENCH,
        "category": vlrb_category(record["id"]),
        "question": query,
        "responses": [str(r) for r in record["response"]],
        "label": ranking.index(0) + 1,
        "meta": meta,
    }


def mllm_judge_fields(record: dict[str, Any]) -> dict[str, Any]:
    """Benchmark-sample fields of an MLLM-as-a-Judge pair record (`human` or `human_answer` in A/B/C)."""
    letter = record.get("human", record.get("human_answer"))
    if letter not in _TIE_LETTERS:
        raise ValueError(f"pair {record.get('pair_id')}: human label {letter!r} is not A, B or C")
    subset = record["original_dataset"]
    if subset not in MLLM_JUDGE_SUBSETS:
        raise ValueError(f"pair {record.get('pair_id')}: unknown subset {subset!r}")
    return {
        "id": f"mllm-judge-{record['pair_id']}",
        "benchmark": MLLM_JUDGE,
        "category": subset,
        "question": str(record["instruction"]),
        "responses": [str(record["answer1"]["answer"]), str(record["answer2"]["answer"])],
        "label": _TIE_LETTERS[letter],
        "meta": {
            "image_id": record.get("id"),
            "models": [record["answer1"].get("name"), record["answer2"].get("name")],
        },
    }


def odd_length_swap(responses: list[str]) -> bool:
    """The VLMEvalKit / lmms-eval rule: show the responses swapped when their summed length is odd."""
    return (len(responses[0]) + len(responses[1])) % 2 == 1


def keyed_choice(key: str, choices: tuple) -> Any:
    """A pick among `choices` fixed by `key`: the same in every process and every run."""
    return choices[hashlib.sha256(key.encode()).digest()[0] % len(choices)]


def seeded_swap(record_id: str, seed: int) -> bool:
    """A coin flip fixed by (id, seed)."""
    return keyed_choice(f"{seed}:{record_id}", (False, True))


def views(record_id: str, responses: list[str], order: str, seed: int = 0) -> list[bool]:
    """The swaps under which a record is shown to the judge: one view, or both orders."""
    if order == "odd_length":
        return [odd_length_swap(responses)]
    if order == "random":
        return [seeded_swap(record_id, seed)]
    if order == "both":
        return [False, True]
    if order == "as_stored":
        return [False]
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def swapped(responses: list[str], label: int | str, swap: bool) -> tuple[list[str], int | str]:
    """Responses and label as the judge sees them."""
    if not swap:
        return list(responses), label
    return [responses[1], responses[0]], {1: 2, 2: 1}.get(label, label)


def resolve_prompt(prompt: str, checkpoint: str | None, training: bool) -> str:
    """The prompt protocol evaluation uses. "auto": carevl's own prompt while a judge trains and for a
    checkpoint carevl trained (it carries `prompts.TRAINED_PROMPT_FILE`), the benchmark's own prompt
    for any other model (a base or foreign judge, compared like for like with published baselines)."""
    from carevl.prompts import trained_prompt

    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    if prompt != "auto":
        return prompt
    return "carevl" if training or trained_prompt(checkpoint) == "carevl" else "benchmark"


def judge_request(benchmark: str, question: str, responses: list[str], prompt: str = "carevl") -> str:
    """The judge's user turn for a benchmark record (responses already in the order shown).

    prompt "carevl": the judge's training prompt (`prompts.JUDGE_TEMPLATE`) for both benchmarks;
    "benchmark": VL-RewardBench's official prompt, or the MLLM-as-a-Judge pair format with ties.
    """
    from carevl.prompts import judge_prompt, pair_prompt, vlrb_official_prompt

    if prompt == "carevl":
        return judge_prompt(question, responses)
    if prompt != "benchmark":
        raise ValueError(f"prompt must be 'carevl' or 'benchmark' (resolve 'auto' first), got {prompt!r}")
    return pair_prompt(question, responses) if benchmark == MLLM_JUDGE else vlrb_official_prompt(question, responses)


def parse(benchmark: str, text: object) -> int | str | None:
    """The verdict of a judge output under the benchmark's parser (None when unparseable). Either
    prompt's answers parse: MLLM-as-a-Judge's parser also reads carevl's verdict line."""
    from carevl.prompts import parse_pair_verdict, parse_verdict

    return parse_pair_verdict(text) if benchmark == MLLM_JUDGE else parse_verdict(text)


def verdict_choices(benchmark: str, prompt: str = "carevl") -> list[tuple[int | str, str]]:
    """(verdict, the text that states it) for every verdict the prompt lets the judge give (a tie only
    in MLLM-as-a-Judge's own format)."""
    from carevl.prompts import pair_verdict_line, verdict_line

    if benchmark == MLLM_JUDGE and prompt == "benchmark":
        return [(v, pair_verdict_line(v)) for v in (1, 2, "tie")]
    return [(v, verdict_line(v)) for v in (1, 2)]


# -- reading releases and writing benchmark shards -------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error})") from error


def with_image_files(
    records: Iterable[dict[str, Any]], image_root: str | Path
) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
    """(record, image bytes or None when the file is missing, image path) for records naming `image_path`."""
    root = Path(image_root)
    for record in records:
        path = root / str(record.get("image_path", ""))
        yield record, (path.read_bytes() if path.is_file() else None), str(path)


def vlrb_parquet_rows(paths: list[str | Path]) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
    """(record, embedded image bytes, origin) for each row of the Hugging Face release's parquet files."""
    import pyarrow.parquet as pq

    for path in paths:
        table = pq.read_table(path)
        for row in table.to_pylist():
            image = row.pop("image", None) or {}
            yield row, image.get("bytes"), f"{path}:{row.get('id')}"


def write_benchmark_shards(
    rows: Iterable[tuple[dict[str, Any], bytes | None, str]],
    to_fields: Callable[[dict[str, Any]], dict[str, Any]],
    out_dir: str | Path,
    shard_size: int = 500,
) -> Counter:
    """Benchmark shards from (record, image bytes, origin) rows. Missing and unreadable images and
    malformed records are logged, counted and skipped; returns the counts ("written" and skip reasons)."""
    from carevl.images import image_extension
    from carevl.schema import BenchmarkSample, SchemaError, ShardWriter

    counts: Counter = Counter()
    with ShardWriter(out_dir, prefix="benchmark", max_count=shard_size, kind="benchmark") as writer:
        for record, image, origin in rows:
            try:
                fields = to_fields(record)
            except (KeyError, TypeError, ValueError) as error:
                counts["bad_record"] += 1
                log.warning("skipping record %s: %r", origin, error)
                continue
            if image is None:
                counts["missing_image"] += 1
                log.warning("skipping %s: no image at %s", fields["id"], origin)
                continue
            try:
                ext = image_extension(image)
            except Exception as error:  # PIL raises many types for broken files
                counts["unreadable_image"] += 1
                log.warning("skipping %s: unreadable image %s (%s)", fields["id"], origin, error)
                continue
            try:
                writer.write(BenchmarkSample(**fields, image=image, image_ext=ext))
            except SchemaError as error:  # breaks the shard contract (text that is not valid Unicode, say)
                counts["bad_record"] += 1
                log.warning("skipping record %s: %s", origin, error)
                continue
            counts["written"] += 1
    return counts
