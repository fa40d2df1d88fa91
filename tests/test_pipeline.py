"""tools/pipeline.py: steps run in order, finished steps are skipped on a rerun, a changed or failed
step reruns with everything after it, `together` steps run as parallel processes."""

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, load_tool

pipeline = load_tool("pipeline")

# A step script: appends "<name> <pid> <OMP_NUM_THREADS>" to runs.txt; fails when the file `fail-<name>` exists.
STEP = """
import os, sys
name = sys.argv[1]
if os.path.exists(f"fail-{name}"):
    sys.exit(3)
with open("runs.txt", "a") as f:
    f.write(f"{name} {os.getpid()} {os.environ.get('OMP_NUM_THREADS')}\\n")
"""


def write_pipeline(tmp_path, steps, in_process=True):
    (tmp_path / "step.py").write_text(STEP)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "in_process": in_process, "steps": steps}))
    return str(config)


def step(name, extra=""):
    return {"name": name, "run": f"python step.py {name}{extra}"}


def ran(tmp_path):
    path = tmp_path / "runs.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runs_in_order_in_process_and_skips_finished_steps(in_tmp):
    config = write_pipeline(in_tmp, [step("a"), step("b"), step("c")])
    pipeline.main(["--config", config])
    assert [r[0] for r in ran(in_tmp)] == ["a", "b", "c"]
    assert {r[1] for r in ran(in_tmp)} == {str(os.getpid())}  # in_process: no new Python process
    assert json.loads((in_tmp / "work" / "pipeline" / "b.done").read_text())["run"] == "python step.py b"
    pipeline.main(["--config", config])
    assert len(ran(in_tmp)) == 3


def test_a_changed_step_reruns_with_every_later_step(in_tmp):
    pipeline.main(["--config", write_pipeline(in_tmp, [step("a"), step("b"), step("c")])])
    pipeline.main(["--config", write_pipeline(in_tmp, [step("a"), step("b", " --changed"), step("c")])])
    assert [r[0] for r in ran(in_tmp)] == ["a", "b", "c", "b", "c"]


def test_a_failed_step_stops_the_run_and_the_rerun_resumes_there(in_tmp):
    config = write_pipeline(in_tmp, [step("a"), step("b"), step("c")], in_process=False)
    (in_tmp / "fail-b").touch()
    with pytest.raises(SystemExit, match="pipeline step b failed"):
        pipeline.main(["--config", config])
    assert [r[0] for r in ran(in_tmp)] == ["a"]
    assert not (in_tmp / "work" / "pipeline" / "b.done").exists()
    (in_tmp / "fail-b").unlink()
    pipeline.main(["--config", config])
    assert [r[0] for r in ran(in_tmp)] == ["a", "b", "c"]
    assert str(os.getpid()) not in {r[1] for r in ran(in_tmp)}  # in_process false: each step its own process


def test_from_and_to(in_tmp):
    config = write_pipeline(in_tmp, [step("a"), step("b"), step("c")])
    pipeline.main(["--config", config, "--to", "b"])
    assert [r[0] for r in ran(in_tmp)] == ["a", "b"]
    pipeline.main(["--config", config, "--from", "b"])
    assert [r[0] for r in ran(in_tmp)] == ["a", "b", "b", "c"]
    with pytest.raises(SystemExit):
        pipeline.main(["--config", config, "--from", "nope"])


def test_together_steps_run_as_processes_sharing_the_threads(in_tmp):
    config = write_pipeline(in_tmp, [step("a"), {"together": [step("b"), step("c")]}, step("d")])
    pipeline.main(["--config", config])
    rows = {r[0]: r for r in ran(in_tmp)}
    assert set(rows) == {"a", "b", "c", "d"}
    assert rows["b"][1] != rows["c"][1] != str(os.getpid())
    assert rows["b"][2] == rows["c"][2] == str(max(1, (os.cpu_count() or 1) // 2))
    assert (in_tmp / "work" / "pipeline" / "c.log").exists()


def test_steps_run_with_this_pythons_tools_when_path_lacks_them(in_tmp, monkeypatch):
    # `.venv/bin/python tools/pipeline.py ...` without an activated venv: PATH has no python/carevl
    monkeypatch.setenv("PATH", str(in_tmp / "empty"))
    config = write_pipeline(in_tmp, [{"together": [step("b"), step("c")]}, step("d")], in_process=False)
    pipeline.main(["--config", config])
    assert sorted(r[0] for r in ran(in_tmp)) == ["b", "c", "d"]
    bin_dir = Path(sys.executable).parent
    assert pipeline.resolve(["python", "-V"]) == [sys.executable, "-V"]
    assert pipeline.resolve(["carevl", "fit"]) == [str(bin_dir / "carevl"), "fit"]
    assert pipeline.resolve(["no-such-tool", "x"]) == ["no-such-tool", "x"]
    assert pipeline.resolve(["/bin/echo", "x"]) == ["/bin/echo", "x"]


def test_a_failing_together_step_leaves_its_batch_undone(in_tmp):
    config = write_pipeline(in_tmp, [{"together": [step("b"), step("c")]}, step("d")])
    (in_tmp / "fail-c").touch()
    with pytest.raises(SystemExit, match="c failed"):
        pipeline.main(["--config", config])
    assert [r[0] for r in ran(in_tmp)] == ["b"]
    assert not (in_tmp / "work" / "pipeline" / "b.done").exists()


@pytest.mark.parametrize(
    "steps, message",
    [([step("a"), step("a")], "used twice"), ([{"name": "a"}], "exactly `name` and `run`"), ([], "non-empty")],
)
def test_bad_pipelines_are_refused(in_tmp, steps, message):
    with pytest.raises(ValueError, match=message):
        pipeline.load(write_pipeline(in_tmp, steps))


def test_shipped_pipelines_name_every_step_once():
    for path in sorted((ROOT / "configs" / "pipeline").glob("*.yaml")):
        spec = pipeline.load(str(path))
        assert spec["steps"], path


def test_the_demo_validates_on_400_held_out_items_unless_told_otherwise():
    """The README's table is on 400 items; `--var heldout=N` reaches the world step, and only it."""
    config = str(ROOT / "configs" / "pipeline" / "shapes.yaml")

    def runs(values):
        return {step["name"]: step["run"] for batch in pipeline.load(config, values)["steps"] for step in batch}

    default, bigger = runs({}), runs({"heldout": "2000"})
    assert " --heldout 400 " in default["world"]
    assert " --heldout 2000 " in bigger["world"]
    assert {name for name in default if default[name] != bigger[name]} == {"world"}


def test_results_table_reads_the_newest_run_and_shows_missing_ones(tmp_path, capsys):
    table = load_tool("results_table")
    for version, accuracy in ((1, 0.8), (10, 0.9)):  # version_10 is newer than version_1 (not by string order)
        run = tmp_path / "sft" / f"version_{version}"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text(
            "epoch,step,train/loss,val/unparseable,val/verdict_accuracy,val/verdict_accuracy/fine\n0,9,0.5,,,\n"
            f"0,9,,3.0,{accuracy / 2},0.25\n1,19,0.2,,,\n1,19,,1.0,{accuracy},0.75\n"
        )
    argv = ["--logs", str(tmp_path), "--out", str(tmp_path / "out"), "--rows", "sft=SFT judge", "dpo=+ DPO"]
    table.main([*argv, "--categories", "coarse", "fine", "--plot"])
    out = capsys.readouterr().out
    assert "| SFT judge | 90.0% |  | 75.0% | 1 |" in out and "| + DPO | missing | | | |" in out
    assert "- SFT judge: 45.0% (10), 90.0% (20)" in out  # the curve, at the steps counted from 1
    assert (tmp_path / "out" / "results.md").read_text() in out
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved[0] == {
        "run": "sft",
        "model": "SFT judge",
        "accuracy": 0.9,
        "unparseable": 1.0,
        "coarse": None,
        "fine": 0.75,
        "curve": [[9, 0.45], [19, 0.9]],
    }
    with pytest.raises(SystemExit):
        table.main(["--logs", str(tmp_path), "--rows", "no-label"])

    base = tmp_path / "pretrain" / "version_0"
    base.mkdir(parents=True)
    (base / "metrics.csv").write_text("epoch,step,train/loss,val/exact_match\n1,1499,0.1,\n1,1499,,0.97\n")
    checked = tmp_path / "reading-count" / "version_0"
    checked.mkdir(parents=True)
    (checked / "metrics.csv").write_text("epoch,step,val/exact_match,val/loss\n0,0,0.69,0.2\n")
    skills = ["pretrain=base, quoting", "reading-count=base, reading counts", "none=absent run"]
    table.main([*argv, "--categories", "coarse", "fine", "--skills", *skills])
    out = capsys.readouterr().out
    assert (
        "Exact match on instruction checks:\n\n- base, quoting: 97.0% exact (step 1500)\n"
        "- base, reading counts: 69.0% exact\n- absent run: missing" in out
    )
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == saved  # the table's rows only

    other = [{**saved[0], "accuracy": 0.8, "fine": 0.5}, saved[1]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    table.main(["--combine", str(tmp_path / "out" / "results.json"), str(tmp_path / "other.json")])
    combined = capsys.readouterr().out
    assert "| SFT judge | 85.0% (80.0-90.0) | missing | 62.5% (50.0-75.0) |" in combined
    assert "| + DPO | missing | missing | missing |" in combined


def test_results_table_compares_judges_item_by_item_from_their_last_verdicts(tmp_path, capsys):
    table = load_tool("results_table")

    def write(run, step, rank, rights):  # rights: item -> verdict right; items c* are coarse, f* fine
        folder = tmp_path / run / "version_0"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.csv").write_text("epoch,step,val/unparseable,val/verdict_accuracy\n0,9,0,0.5\n")
        records = [
            {"id": item, "category": "coarse" if item[0] == "c" else "fine", "label": 1, "verdict": 1 if ok else 2}
            for item, ok in rights.items()
        ]
        (folder / f"verdicts-step{step}-rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    items = [f"c{i}" for i in range(6)] + [f"f{i}" for i in range(10)]
    write("sft", 5, 0, {item: item[0] == "c" for item in items})  # an earlier validation: ignored
    write("sft", 99, 0, {item: item in ("c0", "c1", "c2", "c3", "f0") for item in items})
    # DPO over two ranks: fixes f1-f9, breaks c0
    write("dpo", 40, 0, {item: item not in ("c0", "c4", "c5") for item in items[:8]})
    write("dpo", 40, 1, {item: item not in ("c4", "c5") for item in items[8:]})
    rows = ["sft=SFT judge", "dpo=+ DPO", "gone=missing run"]
    table.main(["--logs", str(tmp_path), "--rows", *rows, "--categories", "coarse", "fine", "--paired", "sft"])
    out = capsys.readouterr().out
    # fine: 9 fixed, 0 broken: p = 2 / 2**9; coarse: 0 fixed, 1 broken: p = 1; overall 9 / 1: 2 * 11 / 1024
    assert "| + DPO | +9 / -1 (p 0.02) | +0 / -1 (p 1.00) | +9 / -0 (p 0.00) |" in out
    saved = {row["run"]: row["paired"] for row in json.loads((tmp_path / "results.json").read_text())}
    assert saved["sft"] is None and saved["gone"] is None
    assert saved["dpo"]["fine"] == {"fixed": 9, "broken": 0, "p": 2 / 2**9}
    assert saved["dpo"]["overall"]["p"] == 22 / 1024 and saved["dpo"]["against"] == "sft"
    with pytest.raises(SystemExit):
        table.main(["--logs", str(tmp_path), "--rows", *rows, "--paired", "base"])


def test_vars_fill_the_commands_and_a_new_value_redoes_the_steps_that_use_it(in_tmp):
    config = write_pipeline(in_tmp, [step("a"), {"name": "b", "run": step("b")["run"] + " --seed $seed"}, step("c")])
    spec = yaml.safe_load(Path(config).read_text())
    Path(config).write_text(yaml.safe_dump({**spec, "vars": {"seed": 0}}))
    pipeline.main(["--config", config])
    pipeline.main(["--config", config, "--var", "seed=0"])  # the same value: nothing to do
    assert [r[0] for r in ran(in_tmp)] == ["a", "b", "c"]
    pipeline.main(["--config", config, "--var", "seed=1"])
    assert [r[0] for r in ran(in_tmp)] == ["a", "b", "c", "b", "c"]
    assert pipeline.load(config, {"seed": "7"})["steps"][1][0]["run"].endswith("--seed 7")
    with pytest.raises(SystemExit):  # a var the pipeline does not have
        pipeline.main(["--config", config, "--var", "sed=1"])
    Path(config).write_text(yaml.safe_dump(spec))  # no vars: $seed is undefined
    with pytest.raises(ValueError, match="does not define"):
        pipeline.load(config)


@pytest.mark.parametrize("config", ["shapes.yaml", "real.yaml"])
def test_every_carevl_and_curate_step_of_the_shipped_pipelines_parses(config, monkeypatch, capsys):
    """Each training step's config and overrides, and each curation stage's options, are accepted."""
    from carevl.cli import main as carevl_main

    curate = load_tool("curate")
    monkeypatch.chdir(ROOT)
    checked = 0
    for batch in pipeline.load(str(ROOT / "configs" / "pipeline" / config))["steps"]:
        for step in batch:
            argv = shlex.split(step["run"])
            if argv[0] == "carevl":
                run, args = carevl_main, [*argv[1:], "--print_config"]
            elif argv[-2:-1] != ["-m"] and argv[1:2] == ["tools/curate.py"]:
                run, args = curate.main, [*argv[2:], "--print_config"]
            else:
                continue
            with pytest.raises(SystemExit) as exit_info:
                run(args)
            assert exit_info.value.code in (0, None), step
            checked += 1
    capsys.readouterr()
    assert checked >= 10


def test_the_real_pipeline_reads_only_what_an_earlier_step_writes_or_preflight_checks():
    """configs/pipeline/real.yaml from an empty folder: every shard set, checkpoint and input a step
    reads is written by an earlier step or is an input the preflight step checks first."""

    def load(path):
        return yaml.safe_load((ROOT / path).read_text())

    steps = load("configs/pipeline/real.yaml")["steps"]
    curation = load("configs/curation/gpt4o.yaml")
    work = curation["sft_shards"]["workdir"]
    preflight = shlex.split(steps[0]["run"])
    assert steps[0]["name"] == "preflight"
    given = set(preflight[preflight.index("--files") + 1 : preflight.index("--env")])
    written, reads = {}, []
    for index, step in enumerate(steps):
        argv = shlex.split(step["run"])
        option = dict(zip(argv, argv[1:]))
        if "--out" in option:
            written[option["--out"]] = index
        stage = argv[-1] if "tools/curate.py" in argv else None
        if stage == "ingest":
            reads.append((index, curation["ingest"]["source"]))
        if stage == "sft_shards":
            written[f"{work}/sft"] = index
            if curation["sft_shards"].get("heldout"):
                written[f"{work}/sft-heldout"] = index
        if stage == "critiques":
            reads.append((index, curation["critiques"]["judge"]["init_args"]["model"]))
        if stage == "groups":
            written.update({f"{work}/groups/{name}": index for name in curation["groups"]["strategies"]})
        if "tools/reference_logps.py" in argv:
            reads += [(index, option["--model"]), (index, option["--shards"])]
        if argv[:1] == ["carevl"]:
            config = load(option["--config"])
            data = config["data"]["init_args"]
            for key in ("train", "val", "test"):
                values = data.get(key) or []
                reads += [(index, path) for path in ([values] if isinstance(values, str) else values)]
            reads.append((index, config["model"]["init_args"]["backbone"]["init_args"]["model"]))
            for callback in config["trainer"].get("callbacks") or []:
                if callback["class_path"].endswith("ExportHF"):
                    written[callback["init_args"]["dirpath"]] = index
    hub_models = {"Qwen/Qwen2-VL-7B-Instruct"}
    unmet = [
        (steps[index]["name"], path)
        for index, path in reads
        if path not in given | hub_models and not written.get(path, len(steps)) < index
    ]
    assert reads and not unmet
