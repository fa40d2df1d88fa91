"""The decontaminate stage: planted duplicates of benchmark records (copied, resized, re-encoded,
reworded) are removed, planted near-misses stay, later stages see only what is left, and the real
VL-RewardBench questions are found in a training set built to overlap some of them."""

import json
from collections import Counter

import pytest

from carevl import benchmarks
from carevl.curation import stages, units
from carevl.curation.decontaminate import REPORT, StaleDecontamination, decontaminate, normalise
from carevl.images import image_extension
from carevl.schema import BenchmarkSample, ShardWriter, question_line
from tests.helpers import SHARED_BENCHMARKS, photo_like, reencoded

BENCH_QUESTIONS = [
    "What colour is the car parked next to the red brick building on the left side of the street?",
    "How many people are sitting on the wooden bench in front of the fountain?",
    "Describe this image in detail.",  # generic: shared by datasets over different pictures
    "Which animal is standing closest to the water in the lower right corner of the photo?",
    "Read the text on the green sign above the shop entrance and explain what it advertises.",
    "Is the man holding the umbrella wearing a hat or a hood?",
]


def write_bench(directory):
    with ShardWriter(directory, prefix="benchmark", kind="benchmark") as writer:
        for i, question in enumerate(BENCH_QUESTIONS):
            writer.write(
                BenchmarkSample(
                    id=f"wildvision-{i}",
                    question=question,
                    responses=["a", "b"],
                    label=1,
                    image=photo_like(100 + i),
                    image_ext="png",
                    benchmark=benchmarks.VLREWARDBENCH,
                    category="general",
                )
            )


# (item id, image, question, the reasons it must be removed for; empty: a near-miss or clean item that stays)
PLANTED = [
    ("copy", lambda: photo_like(100), "Summarise what you see.", {"image_exact"}),
    ("resized", lambda: reencoded(photo_like(101), scale=0.5), "What is going on here?", {"image_perceptual"}),
    ("recoded", lambda: reencoded(photo_like(103), quality=40), "Describe this image in detail.", {"image_perceptual"}),
    ("same_question", lambda: photo_like(7), BENCH_QUESTIONS[4].upper().replace(".", " !"), {"question_exact"}),
    (
        "reworded",
        lambda: photo_like(8),
        "Looking at the picture, how many people are sitting on the wooden bench in front of the fountain?",
        {"question_ngram"},
    ),
    ("both", lambda: reencoded(photo_like(105), scale=1.5), BENCH_QUESTIONS[5], {"image_perceptual", "question_exact"}),
    # near-misses: they stay
    ("generic", lambda: photo_like(9), "Describe this image in detail.", set()),
    (
        "same_template",
        lambda: photo_like(10),
        "What colour is the bicycle leaning against the blue wooden fence on the right side of the road?",
        set(),
    ),
    (
        "shared_phrase",
        lambda: photo_like(11),
        "Which bird is flying closest to the water surface near the boat in the photo?",
        set(),
    ),
    ("other_picture", lambda: photo_like(12), "How many windows does the house have?", set()),
]


def write_items(folder, planted):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item_id, image, question, _ in planted:
        data = image()
        name = f"{item_id}.{image_extension(data)}"
        (folder / name).write_bytes(data)
        lines.append(question_line(item_id, name, question, {"source": "llava" if len(lines) % 2 else "svit"}))
    (folder / "questions.jsonl").write_text("".join(lines))
    return folder / "questions.jsonl"


def test_planted_duplicates_are_removed_and_near_misses_kept(tmp_path):
    write_bench(tmp_path / "bench")
    work = str(tmp_path / "cur")
    stages.ingest(work, source=str(write_items(tmp_path / "data", PLANTED)))
    summary = decontaminate(work, benchmarks=[str(tmp_path / "bench")])
    report = json.loads((tmp_path / "cur" / REPORT).read_text())
    found = {item: {m["reason"] for m in matches} for item, matches in report["matches"].items()}
    assert found == {item_id: reasons for item_id, _, _, reasons in PLANTED if reasons}
    assert summary["removed"] == 6 and summary["kept"] == 4
    assert report["by_reason"] == {"image_exact": 1, "image_perceptual": 3, "question_exact": 2, "question_ngram": 1}
    assert report["by_benchmark"] == {benchmarks.VLREWARDBENCH: 6}
    assert report["by_source"] == {"llava": {"items": 5, "removed": 3}, "svit": {"items": 5, "removed": 3}}
    assert report["thresholds"]["max_hash_distance"] == 8 and report["examples"]["question_ngram"][0]["overlap"] >= 0.6
    # later stages see only the kept items
    assert set(units.items_by_id(work)) == {"generic", "same_template", "shared_phrase", "other_picture"}


def test_items_ingested_after_decontamination_stop_the_next_stage(tmp_path):
    write_bench(tmp_path / "bench")
    work = str(tmp_path / "cur")
    stages.ingest(work, source=str(write_items(tmp_path / "data", PLANTED[:3])))
    decontaminate(work, benchmarks=[str(tmp_path / "bench")])
    stages.ingest(work, source=str(write_items(tmp_path / "more", PLANTED[:4])))
    with pytest.raises(StaleDecontamination, match="run the decontaminate stage again"):
        units.items_by_id(work)
    decontaminate(work, benchmarks=[str(tmp_path / "bench")])
    assert units.items_by_id(work) == {}


def test_normalised_questions_ignore_case_punctuation_and_image_tags():
    assert normalise("<image>\nWhat's in   the PICTURE?") == normalise("what s in the picture")


@pytest.mark.skipif(not (SHARED_BENCHMARKS / "vl_rewardbench.jsonl").exists(), reason="../shared/benchmarks absent")
def test_real_vlrewardbench_questions_planted_in_training_data_are_found(tmp_path, capsys):
    """A training set of 63 questions: 20 VL-RewardBench queries copied, 20 reworded (a phrase put in
    front), 20 unrelated, and instructions the benchmark asks of many pictures (a MathVerse template
    reworded; a question asked of 13 pictures, copied and reworded). Every planted copy and rewording is
    found; the unrelated questions and the instructions, which say nothing of a picture's content
    without it, stay."""
    records = [benchmarks.vlrb_fields(r) for r in benchmarks.read_jsonl(SHARED_BENCHMARKS / "vl_rewardbench.jsonl")]
    long = [r for r in records if 15 <= len(normalise(r["question"]).split()) <= 60]
    asked = Counter(normalise(r["question"]) for r in records)
    content = [
        r
        for r in long
        if not r["id"].lower().startswith(("mathverse", "jailbreak")) and asked[normalise(r["question"])] < 5
    ]
    copied, reworded = content[0::5][:20], content[2::5][:20]
    template = next(r for r in long if r["id"].lower().startswith("mathverse"))
    repeated = "Detail the image's components with particular focus on each entity."  # asked of 13 pictures
    planted = [(f"copy-{r['id']}", lambda i=i: photo_like(i), r["question"], True) for i, r in enumerate(copied)]
    planted += [
        (f"reword-{r['id']}", lambda i=i: photo_like(100 + i), "Looking at the image carefully: " + r["question"], True)
        for i, r in enumerate(reworded)
    ]
    planted.append(
        ("template", lambda: photo_like(300), "Looking at the image carefully: " + template["question"], False)
    )
    planted.append(("repeated", lambda: photo_like(301), repeated, False))
    planted.append(("repeated_reworded", lambda: photo_like(302), "Please, " + repeated.lower(), False))
    planted += [
        (
            f"clean-{i}",
            lambda i=i: photo_like(200 + i),
            f"How many {thing} can you count in this photo of a {place}?",
            False,
        )
        for i, (thing, place) in enumerate(
            (t, p) for t in ("cups", "dogs", "cars", "trees", "chairs") for p in ("kitchen", "park", "street", "garden")
        )
    ]
    work = str(tmp_path / "cur")
    stages.ingest(work, source=str(write_items(tmp_path / "data", planted)))
    summary = decontaminate(work, benchmarks=[str(SHARED_BENCHMARKS / "vl_rewardbench.jsonl")])
    report = json.loads((tmp_path / "cur" / REPORT).read_text())
    assert set(report["matches"]) == {item_id for item_id, _, _, dirty in planted if dirty}
    assert report["benchmarks"] == {benchmarks.VLREWARDBENCH: 1250}
    assert summary["removed"] == 40 and summary["kept"] == 23
    with capsys.disabled():
        print(f"\nVL-RewardBench (1,250 records) vs 63 training questions: {json.dumps(report['by_reason'])}")
