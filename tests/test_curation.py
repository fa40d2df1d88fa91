"""Curation I on the shapes world: the stages end to end with simulated models, label precision of
the confidence split, kill-and-rerun, bad input at ingest, and the API key kept out of every file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from carevl.backends.interface import EndpointRefused, Sampling
from carevl.backends.openai_api import OpenAIBatch, OpenAIChat
from carevl.curation import labels, stages, units
from carevl.curation.provenance import selected
from carevl.curation.records import FolderBusy, Records
from carevl.curation.report import write_report
from carevl.schema import read_manifest
from carevl.standins.loopback import LoopbackEndpoint
from carevl.standins.shapes import true_label
from carevl.standins.simulated import SimulatedAnswerer, SimulatedCaptioner, SimulatedExpert, SimulatedJudge
from carevl.standins.world import write_questions
from tests.helpers import ingest_world, load_tool

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "candidates", "captions", "pairs", "judge", "votes", "split", "sft_shards"]


def run_simulated(workdir: str, items: int = 120) -> None:
    ingest_world(workdir, items, 3)
    models = {f"sim-{e}": (lambda e=e: SimulatedAnswerer(f"sim-{e}", workdir, error_rate=e / 10)) for e in (1, 3, 5)}
    stages.candidates(workdir, models, {"greedy": Sampling(), "t1": Sampling(temperature=1.0)})
    stages.captions(workdir, lambda: SimulatedCaptioner("sim-captioner", workdir, error_rate=0.05))
    stages.pairs(workdir, max_pairs_per_item=3)
    labels.judge(workdir, model=lambda: SimulatedJudge("sim-judge", workdir, accuracy=0.75))
    labels.votes(
        workdir,
        {f"expert-{i}": (lambda i=i: SimulatedExpert(f"expert-{i}", error_rate=0.1 + 0.05 * i)) for i in range(5)},
    )
    labels.split(workdir)
    labels.sft_shards(workdir)


def paired_world(workdir: Path, items: int, seed: int, samples: int) -> int:
    """`items` world items ingested, answered `samples` times by one simulated model at T = 1.0 and
    paired; the number of pairs."""
    ingest_world(str(workdir), items, seed)
    stages.candidates(
        str(workdir),
        {"m": lambda: SimulatedAnswerer("m", str(workdir), error_rate=0.5)},
        {"t1": Sampling(temperature=1.0, n=samples)},
    )
    stages.pairs(str(workdir))
    return len(Records(workdir / "pairs.jsonl").ok())


def test_high_confidence_labels_beat_the_judge_alone(tmp_path):
    workdir = str(tmp_path / "cur")
    run_simulated(workdir)
    found = write_report(workdir, truth=true_label)
    judge_hits, judge_total = found["precision"]["judge alone (all judged pairs)"]
    high_hits, high_total = found["precision"]["high confidence"]
    assert judge_total > 100 and high_total > 20
    assert high_hits / high_total > judge_hits / judge_total + 0.1
    assert 0.6 < judge_hits / judge_total < 0.9  # the simulated judge is right 75% of the time on such pairs
    assert (Path(workdir) / "report" / "votes.png").stat().st_size > 1000
    manifest = read_manifest(Path(workdir) / "sft")
    split_rows = Records(Path(workdir) / "split.jsonl").ok()
    assert manifest["samples"] == sum(r["confidence"] == "high" for r in split_rows) > 0
    for row in split_rows:
        assert row["votes"][0] + row["votes"][1] + row["ties"] == 5


def test_pairs_merge_identical_answers_and_never_pair_an_answer_with_itself(tmp_path):
    workdir = str(tmp_path / "cur")
    run_simulated(workdir, items=30)
    for pair in Records(Path(workdir) / "pairs.jsonl").ok():
        assert stages.normalized(pair["responses"][0]) != stages.normalized(pair["responses"][1])


def test_ingest_records_bad_input_with_reasons(tmp_path, monkeypatch):
    """Every line is read on its own: before, a line that was not an object, a byte that was not
    UTF-8 or an image past PIL's decompression limit stopped the stage with nothing ingested, and
    the error named no line; image paths leaving the data folder were followed."""
    from PIL import Image

    from carevl.standins.shapes import judge_items

    item = judge_items(1, seed=0)[0]
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.png").write_bytes(item.image)
    (data / "corrupt.png").write_bytes(item.image[:40])
    (tmp_path / "secret.png").write_bytes(item.image)  # outside the questions file's folder
    Image.new("RGB", (64, 64)).save(data / "huge.png")  # past the limit lowered below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1800)  # an error past 3,600 pixels: huge.png, not the 56 x 56 ones
    rows = [
        {"id": "a", "image": "good.png", "question": "What colour are the shapes?"},
        {"id": "b", "image": "corrupt.png", "question": "What colour?"},
        {"id": "c", "image": "good.png"},
        {"id": "a", "image": "good.png", "question": "Another question"},
        {"id": "d", "image": "missing.png", "question": "What?"},
        {"id": "e", "image": "../secret.png", "question": "What?"},
        {"id": "f", "image": str(tmp_path / "secret.png"), "question": "What?"},
        {"id": "g", "image": "huge.png", "question": "What?"},
        ["not", "an", "object"],
    ]
    source = data / "source.jsonl"
    lines = [json.dumps(r).encode() for r in rows] + [b"{not json", b'{"id": "h", "question": "\xff"}']
    source.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(units.StageFailed, match="ingest: 10 of 11 units failed"):
        stages.ingest(str(tmp_path / "cur"), source=str(source))
    summary = stages.ingest(str(tmp_path / "cur2"), source=str(source), max_failed=1.0)
    assert summary == {
        "stage": "ingest",
        "done": 1,
        "failed: corrupt_image": 2,
        "failed: missing_field": 1,
        "failed: missing_image": 1,
        "failed: duplicate_id": 1,
        "failed: outside_folder": 2,
        "failed: not_an_object": 1,
        "failed: unparseable": 1,
        "failed: not_utf8": 1,
    }
    errors = {r["error"] for r in Records(tmp_path / "cur2" / "items.jsonl").latest() if "error" in r}
    assert f"not_utf8: {source}:11" in errors and f"not_an_object: {source}:9" in errors
    assert any(e.startswith(f"corrupt_image: {source}:8: image past PIL's decompression limit") for e in errors)
    assert len(list((tmp_path / "cur2" / "images").rglob("*.png"))) == 1
    # a second run keeps what it has and records nothing twice
    stages.ingest(str(tmp_path / "cur2"), source=str(source), max_failed=1.0)
    assert units.items_by_id(tmp_path / "cur2").keys() == {"a"}
    # images outside the folder are read when the config says so
    assert stages.ingest(str(tmp_path / "cur3"), source=str(source), images_outside=True, max_failed=1.0)["done"] == 3
    # a GIF is stored re-encoded as PNG (shards hold PNG, JPEG or WebP only)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(data / "red.gif")
    (data / "gif.jsonl").write_text(json.dumps({"id": "g", "image": "red.gif", "question": "What colour?"}) + "\n")
    assert stages.ingest(str(tmp_path / "cur"), source=str(data / "gif.jsonl"))["converted to png"] == 1
    assert units.items_by_id(tmp_path / "cur").keys() == {"g"}, "the items of the file ingested last"


def test_an_image_replaced_under_the_same_name_is_stored_again(tmp_path):
    """Before, an item's key held the first 32 bytes of its image, the same for two PNGs of one
    size, so a replaced image kept the old one."""
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "x.png")
    source = tmp_path / "q.jsonl"
    source.write_text(json.dumps({"id": "x", "image": "x.png", "question": "What colour?"}) + "\n")
    stages.ingest(str(tmp_path / "cur"), source=str(source))
    first = units.items_by_id(tmp_path / "cur")["x"]["image"]
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "x.png")
    assert stages.ingest(str(tmp_path / "cur"), source=str(source))["done"] == 1
    assert units.items_by_id(tmp_path / "cur")["x"]["image"] != first


def test_a_line_cut_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "stage.jsonl"
    Records(path).append([{"key": "a", "value": 1}, {"key": "b", "error": "timeout"}])
    with path.open("a") as handle:
        handle.write('{"key": "c", "val')
    records = Records(path)
    assert [r["key"] for r in records.latest()] == ["a", "b"] and records.done("a") and not records.done("b")
    records.append([{"key": "b", "value": 2}, {"key": "b", "error": "later failure"}])
    assert Records(path).done("b") and path.read_text().count("\n") == 4


def test_reading_records_changes_nothing_and_reads_around_a_line_that_is_not_a_record(tmp_path, caplog):
    """Before, opening a records file truncated a line another process was still writing, and one
    garbage line made every later stage fail with a JSONDecodeError that named no file."""
    path = tmp_path / "judgments.jsonl"
    path.write_text('{"key": "a", "v": 1}\nGARBAGE\n[1, 2]\n{"key": "b", "v": 2}\n{"key": "c", "v')
    before = path.read_bytes()
    records = Records(path)
    assert [r["key"] for r in records.latest()] == ["a", "b"]
    assert f"{path}:2 is not a record" in caplog.text and f"{path}:3 is not a record" in caplog.text
    assert path.read_bytes() == before, "a reader leaves the file as it is: a writer may be appending"
    records.append([{"key": "d"}])  # the writer drops the cut line before it appends
    assert path.read_text().endswith('{"key": "b", "v": 2}\n{"key": "d"}\n')


def test_a_garbage_line_in_a_stage_file_does_not_stop_the_stages_after_it(tmp_path):
    workdir = str(tmp_path / "cur")
    run_simulated(workdir, items=20)
    with open(Path(workdir) / "candidates.jsonl", "a") as handle:
        handle.write("\x00 not a record \n")
    assert stages.pairs(workdir)["skipped"] > 0


def test_a_second_run_on_a_work_folder_stops_at_once_naming_the_first(tmp_path):
    """A double launch: the second run stops before sending anything, instead of paying for every
    request again and interleaving its records with the first's."""
    workdir = tmp_path / "cur"
    config = write_config(tmp_path / "curation.yaml", workdir, latency=0.05)
    curate(config, "ingest")
    first = subprocess.Popen([sys.executable, str(ROOT / "tools" / "curate.py"), "--config", str(config), "candidates"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while f"process {first.pid}" not in ((workdir / ".lock").read_text() if (workdir / ".lock").exists() else ""):
            assert time.time() < deadline and first.poll() is None, "the first run never held the folder"
            time.sleep(0.01)
        lines = (
            (workdir / "candidates.jsonl").read_bytes().count(b"\n") if (workdir / "candidates.jsonl").exists() else 0
        )
        with pytest.raises(FolderBusy, match=f"in use by process {first.pid}"):
            stages.candidates(str(workdir), {"m": lambda: SimulatedAnswerer("m", str(workdir))})
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert len(Records(workdir / "candidates.jsonl").latest()) == len(Records(workdir / "candidates.jsonl").ok())
    assert lines < (workdir / "candidates.jsonl").read_bytes().count(b"\n"), "the first run went on"


def write_config(path: Path, workdir: Path, latency: float) -> Path:
    world = str(workdir)
    sim = "carevl.standins.simulated."
    config = {
        "ingest": {"workdir": world, "source": str(write_questions(workdir.parent / "questions.jsonl", 40, seed=5))},
        "candidates": {
            "workdir": world,
            "chunk_size": 4,
            "models": {
                f"m{e}": {
                    "class_path": sim + "SimulatedAnswerer",
                    "init_args": {"name": f"m{e}", "world": world, "error_rate": e / 10, "latency": latency},
                }
                for e in (2, 4)
            },
        },
        "captions": {
            "workdir": world,
            "captioner": {"class_path": sim + "SimulatedCaptioner", "init_args": {"name": "cap", "world": world}},
        },
        "pairs": {"workdir": world, "max_pairs_per_item": 3},
        "judge": {
            "workdir": world,
            "chunk_size": 4,
            "model": {
                "class_path": sim + "SimulatedJudge",
                "init_args": {"name": "judge", "world": world, "latency": latency},
            },
        },
        "votes": {
            "workdir": world,
            "experts": {
                f"e{i}": {"class_path": sim + "SimulatedExpert", "init_args": {"name": f"e{i}", "error_rate": 0.2}}
                for i in range(3)
            },
        },
        "split": {"workdir": world},
        "sft_shards": {"workdir": world},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def curate(config: Path, stage: str, kill_after_lines: int | None = None, watch: Path | None = None) -> bool:
    """Run one stage in a subprocess; with kill_after_lines, SIGKILL it once `watch` has that many
    lines. True when it was killed before finishing."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "curate.py"), "--config", str(config), stage],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if kill_after_lines is None:
        assert process.wait(timeout=300) == 0
        return False
    while process.poll() is None:
        if watch.exists() and watch.read_bytes().count(b"\n") >= kill_after_lines:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    assert process.returncode == 0
    return False


def snapshot(workdir: Path) -> dict:
    """Every stage's records (sorted) and the SFT samples."""
    import webdataset as wds

    found = {
        name: sorted(json.dumps(r, sort_keys=True) for r in Records(workdir / name).latest())
        for name in units.FILES.values()
    }
    found["images"] = sorted(p.name for p in (workdir / "images").rglob("*.png"))
    found["sft"] = sorted(
        json.dumps(json.loads(s["json"]), sort_keys=True)
        for url in read_manifest(workdir / "sft")["urls"]
        for s in wds.WebDataset(url, shardshuffle=False)
    )
    return found


def test_kill_and_rerun_gives_the_uninterrupted_output(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean_config = write_config(tmp_path / "clean.yaml", clean, latency=0.0)
    killed_config = write_config(tmp_path / "killed.yaml", killed, latency=0.01)
    for stage in STAGES:
        curate(clean_config, stage)
    kills = 0
    for stage, lines in (
        ("ingest", None),
        ("candidates", 20),
        ("captions", None),
        ("pairs", None),
        ("judge", 30),
        ("votes", None),
        ("split", None),
        ("sft_shards", None),
    ):
        if lines is not None:
            kills += curate(killed_config, stage, kill_after_lines=lines, watch=killed / units.FILES[stage])
        curate(killed_config, stage)
    assert kills == 2  # both stages were really interrupted part way
    expected, got = snapshot(clean), snapshot(killed)
    assert got == expected
    for name in units.FILES.values():  # nothing duplicated on disk either
        lines = [json.loads(line) for line in (killed / name).read_text().splitlines()]
        assert len(lines) == len({r["key"] for r in lines}), name


def test_judge_over_http_records_failures_then_completes_and_never_writes_the_key(
    tmp_path, monkeypatch, capsys, caplog
):
    key = "sk-live-5d1e0f-must-not-leak"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    workdir = tmp_path / "cur"
    n_pairs = paired_world(workdir, 8, 1, samples=3)
    with LoopbackEndpoint(faults=["500", "500", "400", "bad_output", "bad_output"], retry_after="0.01") as endpoint:

        def build() -> OpenAIChat:
            return OpenAIChat("gpt-4o", base_url=endpoint.base_url, concurrency=1, max_attempts=2, max_backoff=0.01)

        first = labels.judge(str(workdir), model=build, max_failed=0.5)
        assert (
            first["failed: http_500"] == 1
            and first["failed: http_400"] == 1
            and first["failed: malformed_response"] == 1
        )
        assert first["done"] == n_pairs - 3
        second = labels.judge(str(workdir), model=build)
        assert second == {"stage": "judge", "done": 3, "skipped": n_pairs - 3}
        assert all(r["authorization"] == f"Bearer {key}" for r in endpoint.requests)
    judgments = Records(workdir / "judgments.jsonl").ok()
    assert len(judgments) == n_pairs and all(r["verdict"] == 1 and r["explanation"] == "placeholder" for r in judgments)
    written = [p for p in workdir.rglob("*") if p.is_file()]
    assert written and not [p for p in written if key.encode() in p.read_bytes()]
    captured = capsys.readouterr()
    assert key not in captured.out + captured.err + caplog.text


def test_a_model_that_cannot_load_fails_its_own_units_and_the_stage_goes_on(tmp_path):
    workdir = tmp_path / "cur"
    ingest_world(str(workdir), 5, 1)
    decodings = {"greedy": Sampling(), "t1": Sampling(temperature=1.0)}

    def broken():
        raise FileNotFoundError("no checkpoint at /models/missing")

    good = {"good": lambda: SimulatedAnswerer("good", str(workdir))}
    with pytest.raises(units.StageFailed, match="model_failed 10"):
        stages.candidates(str(workdir), {"broken": broken, **good}, decodings)
    failed = [r for r in Records(workdir / "candidates.jsonl").latest() if "error" in r]
    assert len(failed) == 10 and {r["model"] for r in failed} == {"broken"}
    assert failed[0]["error"].startswith("model_failed: FileNotFoundError: no checkpoint at /models/missing")
    assert len(Records(workdir / "candidates.jsonl").ok()) == 10  # the good model answered everything
    fixed = {"broken": lambda: SimulatedAnswerer("broken", str(workdir)), **good}
    assert stages.candidates(str(workdir), fixed, decodings) == {"stage": "candidates", "done": 10, "skipped": 10}

    stages.captions(str(workdir), lambda: SimulatedCaptioner("c", str(workdir)))
    stages.pairs(str(workdir))
    experts = {"e1": lambda: SimulatedExpert("e1"), "e2": broken}
    with pytest.raises(units.StageFailed, match="model_failed"):
        labels.votes(str(workdir), experts)
    scored = Records(workdir / "scores.jsonl").ok()
    assert scored and {r["expert"] for r in scored} == {"e1"}


def test_a_judge_without_structured_output_is_asked_for_the_verdict_line(tmp_path):
    """GPT-4o 2024-05-13 has no JSON-schema output: a schema is refused before any request; with
    structured: false the prompt asks for the verdict line, and the stage reads verdict and reasons."""
    workdir = tmp_path / "cur"
    n_pairs = paired_world(workdir, 6, 1, samples=3)

    def free_text(body: dict) -> str:
        assert "response_format" not in body
        return "Answer 2 names the colour the image shows. Overall Judgment: Answer 2 is better."

    with LoopbackEndpoint(responder=free_text, api_key=None) as endpoint:

        def build() -> OpenAIChat:
            return OpenAIChat("gpt-4o-2024-05-13", base_url=endpoint.base_url, api_key_env="HOME", concurrency=2)

        with pytest.raises(ValueError, match="no structured output"):
            labels.judge(str(workdir), model=build)
        assert endpoint.requests == []
        assert labels.judge(str(workdir), model=build, structured=False)["done"] == n_pairs
        prompt = json.loads(endpoint.requests[0]["body"])["messages"][0]["content"][-1]["text"]
    assert prompt.endswith('"Overall Judgment: Answer 2 is better."')
    judgments = Records(workdir / "judgments.jsonl").ok()
    assert {(r["verdict"], r["explanation"]) for r in judgments} == {(2, "Answer 2 names the colour the image shows.")}


def test_judge_prints_an_estimate_and_refuses_above_max_usd(tmp_path, capsys):
    workdir = tmp_path / "cur"
    paired_world(workdir, 6, 2, samples=2)
    with pytest.raises(RuntimeError, match="above max_usd"):
        labels.judge(str(workdir), model=lambda: SimulatedJudge("j", str(workdir)), max_usd=0.0)
    assert "requests" in capsys.readouterr().out
    assert not (workdir / "judgments.jsonl").exists()


def test_judge_through_the_batch_api(tmp_path, monkeypatch):
    from carevl.backends.openai_api import OpenAIBatch

    monkeypatch.setenv("OPENAI_API_KEY", "sk-batch-test")
    workdir = tmp_path / "cur"
    n_pairs = paired_world(workdir, 6, 2, samples=3)
    with LoopbackEndpoint(expire_batches=1) as endpoint:
        summary = labels.judge(
            str(workdir),
            batch=lambda: OpenAIBatch("gpt-4o", base_url=endpoint.base_url, poll_seconds=0.01),
            both_orders=True,
        )
    assert summary == {"stage": "judge", "done": 2 * n_pairs, "skipped": 0}
    judgments = Records(workdir / "judgments.jsonl").ok()
    # the loopback judge always answers 1: in the swapped order that is the pair's answer 2
    assert sorted((r["order"], r["verdict"]) for r in judgments) == [("12", 1)] * n_pairs + [("21", 2)] * n_pairs


def test_sft_shards_hold_out_whole_items_the_same_way_every_run(tmp_path):
    import webdataset as wds

    from carevl.schema import decode

    workdir = str(tmp_path / "cur")
    run_simulated(workdir, items=60)
    everything = read_manifest(Path(workdir) / "sft")["samples"]

    def items_of(folder):
        urls = read_manifest(Path(workdir) / folder)["urls"]
        return [decode(raw, "sft").meta["item"] for url in urls for raw in wds.WebDataset(url, shardshuffle=False)]

    summary = labels.sft_shards(workdir, heldout=0.25)
    train, held = items_of("sft"), items_of("sft-heldout")
    assert summary["written"] == len(train) and summary["held out"] == len(held)
    assert len(train) + len(held) == everything
    assert held and not set(train) & set(held)  # an item's pairs are all on one side
    assert 0.1 < len(set(held)) / len(set(train) | set(held)) < 0.4
    labels.sft_shards(workdir, heldout=0.25)
    assert items_of("sft-heldout") == held
    with pytest.raises(ValueError, match="heldout"):
        labels.sft_shards(workdir, heldout=1.0)


def test_sft_shards_with_the_judge_labels_keep_every_judged_pair(tmp_path):
    import webdataset as wds

    from carevl.schema import decode

    workdir = str(tmp_path / "cur")
    run_simulated(workdir, items=40)
    summary = labels.sft_shards(workdir, labels="judge")
    rows = {r["key"][:32]: r for r in Records(Path(workdir) / "split.jsonl").ok()}
    samples = [
        decode(raw, "sft")
        for url in read_manifest(Path(workdir) / "sft-judge")["urls"]
        for raw in wds.WebDataset(url, shardshuffle=False)
    ]
    assert (
        summary["written"]
        == len(samples)
        == sum(r["judge"] is not None for r in rows.values())
        > read_manifest(Path(workdir) / "sft")["samples"]
    )
    assert all(s.label == rows[s.id]["judge"] and s.target.endswith(f"Answer {s.label} is better.") for s in samples)
    assert any(rows[s.id]["label"] != s.label for s in samples)  # experts overrode some judge labels
    with pytest.raises(ValueError, match="labels must be"):
        labels.sft_shards(workdir, labels="all")


def test_candidates_on_a_paid_endpoint_print_their_estimate_first(tmp_path, capsys):
    from carevl.curation.cost import Prices

    workdir = str(tmp_path / "cur")
    ingest_world(workdir, 5, 2)
    models = {
        "paid": lambda: pytest.fail("no request may be sent above max_usd"),
        "local": lambda: SimulatedAnswerer("local", workdir),
    }
    with pytest.raises(RuntimeError, match="above max_usd"):
        stages.candidates(workdir, models, {"greedy": Sampling()}, prices={"paid": Prices()}, max_usd=0.0)
    printed = capsys.readouterr().out
    assert "candidates paid/greedy: 5 requests" in printed and "local" not in printed


def judged_pairs(workdir: Path) -> int:
    """A curation work folder of 8 items with answer pairs to judge; how many pairs."""
    ingest_world(str(workdir), 8, 1)
    answerer = {"m": lambda: SimulatedAnswerer("m", str(workdir), error_rate=0.5)}
    stages.candidates(str(workdir), answerer, {"t1": Sampling(temperature=1.0, n=3)})
    stages.pairs(str(workdir))
    return len(Records(workdir / "pairs.jsonl").ok())


def test_a_stage_with_failures_exits_non_zero_and_its_rerun_retries_them(tmp_path, monkeypatch):
    """Failed units beyond the stage's max_failed share make `tools/curate.py` exit non-zero (a
    pipeline then never marks the step done); the failures are recorded, and the rerun retries them."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    workdir = tmp_path / "cur"
    n_pairs = judged_pairs(workdir)
    curate = load_tool("curate")
    with LoopbackEndpoint(faults=["400", None, "400"]) as endpoint:
        model = {
            "class_path": "carevl.backends.openai_api.OpenAIChat",
            "init_args": {"model": "gpt-4o", "base_url": endpoint.base_url, "concurrency": 1},
        }
        config = tmp_path / "judge.yaml"
        config.write_text(yaml.safe_dump({"judge": {"workdir": str(workdir), "model": model}}))
        with pytest.raises(SystemExit) as exit_info:
            curate.main(["--config", str(config), "judge"])
        assert f"judge: 2 of {n_pairs} units failed (http_400 2)" in str(exit_info.value.code)
        assert Records(workdir / "judgments.jsonl").failures() == {"http_400": 2}
        curate.main(["--config", str(config), "judge"])  # returns: exit status 0
    assert len(Records(workdir / "judgments.jsonl").ok()) == n_pairs


@pytest.mark.parametrize("refusal", ["wrong_key", "quota"])
def test_a_refused_key_or_account_stops_the_stage_at_once_and_records_nothing(tmp_path, monkeypatch, refusal):
    """A 401 (or a spent quota) cannot be fixed by retrying: the stage stops after the requests
    already in flight, records no failure, and the rerun with the right key judges every pair."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong" if refusal == "wrong_key" else "sk-right")
    workdir = tmp_path / "cur"
    n_pairs = judged_pairs(workdir)
    faults = ["quota"] * 8 if refusal == "quota" else []
    with LoopbackEndpoint(api_key="sk-right", faults=faults, latency=0.05) as endpoint:

        def build() -> OpenAIChat:
            return OpenAIChat("gpt-4o", base_url=endpoint.base_url, concurrency=4, max_attempts=3)

        with pytest.raises(
            EndpointRefused, match="invalid_api_key" if refusal == "wrong_key" else "insufficient_quota"
        ):
            labels.judge(str(workdir), model=build)
        assert n_pairs > 8 and len(endpoint.requests) <= 8, "stopped at once, not after a request per pair"
        assert Records(workdir / "judgments.jsonl").latest() == []
        monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
        endpoint.faults.clear()
        assert labels.judge(str(workdir), model=build)["done"] == n_pairs


def test_the_batch_api_stops_at_a_refused_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    workdir = tmp_path / "cur"
    judged_pairs(workdir)
    with LoopbackEndpoint(api_key="sk-right") as endpoint:
        batch = OpenAIBatch("gpt-4o", base_url=endpoint.base_url, poll_seconds=0.01)
        with pytest.raises(EndpointRefused, match="http_401"):
            labels.judge(str(workdir), batch=lambda: batch)
    assert Records(workdir / "judgments.jsonl").latest() == []


def test_sft_shards_with_nothing_to_write_fail_and_keep_the_shards_before(tmp_path):
    workdir = str(tmp_path / "cur")
    run_simulated(workdir, items=30)
    before = read_manifest(Path(workdir) / "sft")
    split = Records(Path(workdir) / "split.jsonl")
    split.rewrite([{**row, "confidence": "low"} for row in split.ok()])
    with pytest.raises(units.StageFailed, match="sft_shards: no pair to write"):
        labels.sft_shards(workdir)
    assert read_manifest(Path(workdir) / "sft") == before


def test_sft_shards_count_a_pair_whose_text_cannot_be_encoded_and_write_the_rest(tmp_path):
    workdir = str(tmp_path / "cur")
    run_simulated(workdir, items=30)
    high = read_manifest(Path(workdir) / "sft")["samples"]
    split = Records(Path(workdir) / "split.jsonl")
    rows = split.ok()
    broken = next(i for i, row in enumerate(rows) if row["confidence"] == "high")
    rows[broken] = {**rows[broken], "explanation": json.loads('"The image shows \\ud800"')}
    split.rewrite(rows)
    summary = labels.sft_shards(workdir)
    assert summary["written"] == high - 1
    assert [k for k in summary if k.startswith("dropped: ")] == [
        "dropped: 'target' holds text that is not valid Unicode (surrogates not allowed)"
    ]
    assert read_manifest(Path(workdir) / "sft")["samples"] == high - 1


def test_a_changed_or_removed_model_is_never_served_from_old_records(tmp_path, monkeypatch):
    """Before, records were keyed by content, not by what produced them: after a dry run of the
    judge against a local endpoint, the real judge's run printed `judge: skipped` and the SFT
    targets read "placeholder ..."; a changed captioner reused every old caption; an expert or a
    candidate model removed from the config still counted (split reported 5 experts with 4
    configured, so tau meant something else; pairs used answers of the removed model)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    curate, workdir = load_tool("curate"), tmp_path / "cur"
    config = yaml.safe_load(write_config(tmp_path / "base.yaml", workdir, latency=0.0).read_text())
    sim = "carevl.standins.simulated."
    config["candidates"]["models"]["m4"]["init_args"]["style"] = "verbose"  # answers m2 never gives
    config["votes"]["experts"] = {
        f"e{i}": {"class_path": sim + "SimulatedExpert", "init_args": {"name": f"e{i}", "error_rate": 0.2}}
        for i in range(5)
    }

    def run(stage: str, **changes) -> None:
        config[stage].update(changes)
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump({stage: config[stage]}))
        curate.main(["--config", str(path), stage])

    for stage in ("ingest", "candidates", "captions", "pairs"):
        run(stage)
    with LoopbackEndpoint() as endpoint:  # a dry run: the endpoint answers placeholders
        dry = {
            "class_path": "carevl.backends.openai_api.OpenAIChat",
            "init_args": {"model": "dry-run", "base_url": endpoint.base_url},
        }
        run("judge", model=dry)
    real = {"class_path": sim + "SimulatedJudge", "init_args": {"name": "judge", "world": str(workdir)}}
    run("judge", model=real)
    for stage in ("votes", "split", "sft_shards"):
        run(stage)
    judged = Records(workdir / "judgments.jsonl")
    assert len(judged.ok()) == 2 * len(selected(Records(workdir / "pairs.jsonl"))), "the real judge judged every pair"
    targets = snapshot(workdir)["sft"]
    assert targets and not [t for t in targets if "placeholder" in t], "no SFT target from the dry run"

    old_captions = units.caption_by_image(workdir)
    run(
        "captions",
        captioner={
            "class_path": sim + "SimulatedCaptioner",
            "init_args": {"name": "cap", "world": str(workdir), "error_rate": 0.6},
        },
    )
    new_captions = units.caption_by_image(workdir)
    assert new_captions.keys() == old_captions.keys() and new_captions != old_captions, "captioned afresh"

    del config["votes"]["experts"]["e4"]
    run("votes")
    run("split")
    summary = labels.split(str(workdir))
    assert summary["experts"] == 4 and summary["tau"] == 3

    del config["candidates"]["models"]["m4"]
    run("candidates")
    run("pairs")
    kept = {stages.normalized(a) for r in selected(Records(workdir / "candidates.jsonl")) for a in r["answers"]}
    assert {r["model"] for r in selected(Records(workdir / "candidates.jsonl"))} == {"m2"}
    removed = {
        stages.normalized(a)
        for r in Records(workdir / "candidates.jsonl").ok()
        if r["model"] == "m4"
        for a in r["answers"]
    }
    assert removed - kept, "m4 gave answers m2 did not"
    for pair in selected(Records(workdir / "pairs.jsonl")):
        assert {stages.normalized(text) for text in pair["responses"]} <= kept, (
            "a pair holds an answer of the removed model"
        )
