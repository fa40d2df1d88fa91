"""Benchmark converters: real record formats in, benchmark shards out; missing and unreadable
images counted and skipped."""

import json

import pytest
import webdataset as wds

from carevl import schema
from carevl.images import png_bytes
from carevl.standins.shapes import random_scene, render
from tests.helpers import SHARED_BENCHMARKS
from tools.convert_benchmark import main as convert

VLRB = SHARED_BENCHMARKS / "vl_rewardbench.jsonl"


def image_bytes(seed=0):
    import random

    rng = random.Random(seed)
    return png_bytes(render(random_scene(rng), rng))


def read_shards(directory):
    manifest = schema.read_manifest(directory)
    return [
        schema.decode(raw, "benchmark") for url in manifest["urls"] for raw in wds.WebDataset(url, shardshuffle=False)
    ]


@pytest.fixture
def vlrb_lines():
    if not VLRB.exists():
        pytest.skip("../shared/benchmarks/vl_rewardbench.jsonl not present")
    return VLRB.read_text().splitlines()[:4]


def test_vlrewardbench_jsonl_with_image_folder(vlrb_lines, tmp_path, capsys):
    records = [json.loads(line) for line in vlrb_lines]
    images = tmp_path / "images"
    for i, record in enumerate(records[:2]):
        path = images / record["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(i))
    corrupt = images / records[2]["image_path"]
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"\x89PNG not really")
    # records[3]'s image is missing.
    (tmp_path / "data.jsonl").write_text("\n".join(vlrb_lines) + "\n")
    assert (
        convert(
            [
                "vlrewardbench-jsonl",
                str(tmp_path / "data.jsonl"),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 2 records" in printed and "'missing_image': 1" in printed and "'unreadable_image': 1" in printed
    samples = read_shards(tmp_path / "out")
    assert [s.id for s in samples] == [r["id"] for r in records[:2]]
    first = samples[0]
    assert first.benchmark == "vlrewardbench" and first.label == records[0]["human_ranking"].index(0) + 1
    assert first.responses == records[0]["response"] and first.image == image_bytes(0) and first.image_ext == "png"


def test_vlrewardbench_parquet_with_embedded_images(vlrb_lines, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, line in enumerate(vlrb_lines[:3]):
        record = json.loads(line)
        record.pop("image_path")
        record["meta"] = json.dumps(record["meta"])  # the HF release stores meta as a string
        record["image"] = {"bytes": image_bytes(i) if i < 2 else None, "path": None}
        rows.append(record)
    (tmp_path / "release").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "release" / "test-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "release" / "test-00001.parquet")
    for inputs, out in (
        ([str(tmp_path / "release" / "test-00000.parquet"), str(tmp_path / "release" / "test-00001.parquet")], "a"),
        ([str(tmp_path / "release")], "b"),
    ):  # files, or their folder
        assert convert(["vlrewardbench-parquet", *inputs, "--out", str(tmp_path / out)]) == 0
        samples = read_shards(tmp_path / out)
        assert [s.id for s in samples] == [r["id"] for r in rows[:2]] and samples[1].image == image_bytes(1)


def test_mllm_judge_pairs(tmp_path):
    pair = {
        "id": 7,
        "pair_id": 12,
        "image_path": "7.jpg",
        "original_dataset": "mm-vet",
        "instruction": "What is shown?",
        "answer1": {"name": "m1", "answer": "A cat."},
        "answer2": {"name": "m2", "answer": "A dog."},
        "human_answer": "C",
    }
    bad = dict(pair, pair_id=13, human="X")
    (tmp_path / "pair.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps(bad) + "\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "7.jpg").write_bytes(image_bytes())
    assert (
        convert(
            [
                "mllm-judge",
                str(tmp_path / "pair.jsonl"),
                "--images",
                str(tmp_path / "images"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    (sample,) = read_shards(tmp_path / "out")
    assert (sample.id, sample.category, sample.label, sample.responses) == (
        "mllm-judge-12",
        "mm-vet",
        "tie",
        ["A cat.", "A dog."],
    )


def test_benchmark_sample_contract():
    sample = schema.BenchmarkSample(
        id="x-1", benchmark="mllm_judge", category="coco", question="q", responses=["a", "b"], label="tie", image=b"img"
    )
    assert schema.decode(schema.encode(sample), "benchmark") == sample
    with pytest.raises(schema.SchemaError, match="label"):
        schema.encode(
            schema.BenchmarkSample(
                id="x", benchmark="b", category="c", question="q", responses=["a", "b"], label=3, image=b""
            )
        )
