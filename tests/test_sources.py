"""Source converters: each published format, written as a small fixture, round-trips through
make_questions and ingest to items with the right image bytes, question and provenance; sampling
is seeded; bad records are counted, never lost silently."""

import base64
import hashlib
import io
import json

import pytest
from PIL import Image

from carevl.curation import stages, units
from carevl.curation.records import ImageStore
from carevl.curation.sources import Source, write_questions
from tests.helpers import ROOT, load_tool, photo_like


def gif(seed):
    out = io.BytesIO()
    Image.open(io.BytesIO(photo_like(seed))).convert("P").save(out, "GIF")
    return out.getvalue()


def ingested(tmp_path, sources, seed=0):
    summary = write_questions(sources, tmp_path / "data", seed)
    work = str(tmp_path / "cur")
    stages.ingest(work, source=str(tmp_path / "data" / "questions.jsonl"))
    store = ImageStore(work)
    items = {
        item_id: {
            "question": item["question"],
            "sha": hashlib.sha256(store.get(item["image"], item["image_ext"])).hexdigest(),
            "meta": item["meta"],
        }
        for item_id, item in units.items_by_id(work).items()
    }
    return summary, items


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_llava_style_json_with_an_image_folder(tmp_path):
    images = tmp_path / "coco"
    images.mkdir()
    for i in range(3):
        (images / f"{i:012d}.jpg").write_bytes(photo_like(i, fmt="JPEG"))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    turns = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "An answer."}]  # noqa: E731
    rows = [
        {"id": "000000000000", "image": "000000000000.jpg", "conversations": turns("<image>\nWhat is on the table?")},
        {"id": "000000000001", "image": "000000000001.jpg", "conversations": turns("Describe the scene.\n<image>")},
        {"id": "000000000001", "image": "000000000002.jpg", "conversations": turns("<image>\nA second question.")},
        {"id": "7", "image": "missing.jpg", "conversations": turns("<image>\nWhere is it?")},
        {"id": "8", "image": "broken.jpg", "conversations": turns("<image>\nWhere is it?")},
        {"id": "9", "image": "000000000000.jpg", "conversations": [{"from": "gpt", "value": "no question"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    source = Source(name="llava_instruct", format="llava_json", path=str(tmp_path / "llava.json"), images=str(images))
    summary, items = ingested(tmp_path, [source])
    assert summary["llava_instruct"] == {
        "skipped: missing image": 1,
        "skipped: no question": 1,
        "skipped: unreadable image": 1,
        "written": 3,
    }
    first = items["llava_instruct/000000000000"]
    assert first["question"] == "What is on the table?" and first["sha"] == sha(photo_like(0, fmt="JPEG"))
    assert first["meta"] == {
        "source": "llava_instruct",
        "original_id": "000000000000",
        "file": str(tmp_path / "llava.json"),
    }
    assert items["llava_instruct/000000000001"]["question"] == "Describe the scene."
    assert items["llava_instruct/000000000001#2"]["sha"] == sha(photo_like(2, fmt="JPEG"))  # a repeated id kept apart


def test_lrv_instruction_annotations(tmp_path):
    images = tmp_path / "vg"
    images.mkdir()
    (images / "2392588.jpg").write_bytes(photo_like(5, fmt="JPEG"))
    annotations = [{"image_id": "2392588", "question": "Is the dog on the bed?", "answer": "No.", "task": "neg"}]
    (tmp_path / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    source = Source(name="lrv", format="lrv_json", path=str(tmp_path / "filter_cap.json"), images=str(images))
    _, items = ingested(tmp_path, [source])
    assert items == {
        "lrv/2392588": {
            "question": "Is the dog on the bed?",
            "sha": sha(photo_like(5, fmt="JPEG")),
            "meta": {"source": "lrv", "original_id": "2392588", "file": str(tmp_path / "filter_cap.json")},
        }
    }


def test_m3it_jsonl_with_base64_images(tmp_path):
    rows = [
        {
            "instruction": "Answer the question.",
            "inputs": "What colour is the bus?",
            "outputs": "Red.",
            "image_base64_str": [base64.b64encode(photo_like(1)).decode()],
        },
        {
            "instruction": "Caption the image.",
            "inputs": "",
            "outputs": "A bus.",
            "image_base64_str": [base64.b64encode(gif(2)).decode()],
        },
        {"instruction": "Caption the image.", "inputs": "", "outputs": "A bus.", "image_base64_str": ["%%%"]},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, items = ingested(tmp_path, [Source(name="m3it", format="m3it_jsonl", path=str(tmp_path / "train.jsonl"))])
    assert summary["m3it"] == {"skipped: missing image": 1, "written": 2}
    assert items["m3it/train.jsonl:1"]["question"] == "Answer the question.\nWhat colour is the bus?"
    assert items["m3it/train.jsonl:1"]["sha"] == sha(photo_like(1))
    gif_item = items["m3it/train.jsonl:2"]  # a GIF is stored as PNG, the same picture
    assert gif_item["question"] == "Caption the image."
    assert gif_item["sha"] != sha(gif(2))


@pytest.mark.parametrize("preset", ["vlfeedback", "rlaif_v", "rlhf_v", "llava"])
def test_hugging_face_parquet_with_embedded_images(tmp_path, preset):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pictures = [photo_like(10 + i) for i in range(4)]
    questions = [f"What is shown in picture {i}?" for i in range(4)]
    image = [{"bytes": p, "path": f"{i}.png"} for i, p in enumerate(pictures)]
    if preset == "vlfeedback":
        columns = {"id": [f"svit-{i}" for i in range(4)], "prompt": questions, "models": [["a", "b"]] * 4}
    elif preset == "rlaif_v":
        columns = {
            "idx": [f"OmniLMM-{i}" for i in range(4)],
            "question": questions,
            "chosen": ["c"] * 4,
            "rejected": ["r"] * 4,
        }
    elif preset == "rlhf_v":
        texts = [json.dumps({"question": q, "chosen": "c", "rejected": "r"}) for q in questions]
        columns = {"idx": list(range(4)), "text": texts}
    else:
        turns = [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "a"}] for q in questions]
        columns = {"id": [f"svit-{i}" for i in range(4)], "conversations": turns}
    folder = tmp_path / preset
    folder.mkdir()
    table = pa.table({**columns, "image": image})
    pq.write_table(table.slice(0, 2), folder / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(2, 2), folder / "train-00001-of-00002.parquet")
    _, items = ingested(tmp_path, [Source(name=preset, format="parquet", preset=preset, path=str(folder))])
    assert len(items) == 4
    for item in items.values():
        i = int(item["question"].split()[-1].rstrip("?"))
        assert item["sha"] == sha(pictures[i]) and item["meta"]["source"] == preset
        assert item["meta"]["original_id"] == str(columns["idx" if "idx" in columns else "id"][i])


def test_sampling_is_seeded_per_source(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    rows = []
    for i in range(12):
        (images / f"{i}.png").write_bytes(photo_like(i, size=(64, 48)))
        rows.append(
            {"id": str(i), "image": f"{i}.png", "conversations": [{"from": "human", "value": f"Question {i}?"}]}
        )
    (tmp_path / "a.json").write_text(json.dumps(rows))
    source = Source(name="a", format="llava_json", path=str(tmp_path / "a.json"), images=str(images), sample=4)
    picks = {}
    for run, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"out{run}"
        write_questions([source], out, seed)
        lines = (out / "questions.jsonl").read_text().splitlines()
        picks.setdefault(seed, []).append({json.loads(line)["id"] for line in lines})
    assert len(picks[0][0]) == 4 and picks[0][0] == picks[0][1]
    assert picks[1][0] != picks[0][0]
    assert json.loads((tmp_path / "out1" / "sources.json").read_text())["sources"]["a"]["written"] == 4


def test_the_paper_config_parses(capsys):
    tool = load_tool("make_questions")
    from jsonargparse import CLI

    with pytest.raises(SystemExit) as exit_info:
        CLI(
            tool.make_questions,
            as_positional=False,
            args=["--config", str(ROOT / "configs/sources/paper.yaml"), "--print_config"],
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.count("format:") == 9 and "preset: rlhf_v" in printed
