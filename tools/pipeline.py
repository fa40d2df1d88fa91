"""Run the whole CAREVL method as one resumable list of commands: curation I, SFT, curation II, DPO
and evaluation (paper §3). A pipeline is a YAML file whose `steps` are ordinary command lines, run
in order; each can also be typed by hand.

    python tools/pipeline.py --config configs/pipeline/shapes.yaml          # run, or resume, every step
    python tools/pipeline.py --config configs/pipeline/shapes.yaml --list   # the commands and which are done
    python tools/pipeline.py --config configs/pipeline/shapes.yaml --from sft-high   # redo from a step on

Resuming: a step that finishes writes `<workdir>/pipeline/<name>.done` holding its command. A run
skips the steps whose marker holds the same command and runs the rest; once one step runs, every
later step runs too, since it may read what that step rewrote. A killed step has no marker, so it
runs again: curation stages then skip the work their records already hold, training restarts.

`vars` names values that step commands use as `$name` (the demo's `seed`); `--var name=value`
overrides one for a run. A step's marker holds its command with the values filled in, so a run
with another value redoes every step that uses it, and the steps after it.

Steps listed under `together:` run at the same time, each its own process with an equal share of
the CPU threads: two 1-thread trainings of the tiny judge finish ~1.5x sooner than one after the
other with 2 threads each, since its small matrices keep two threads only partly busy.

`in_process: true` runs `carevl ...` and `python ...` commands inside this process, which saves the
seconds each new Python process spends importing torch and Lightning (on the tiny CPU pipeline that
is minutes). Keep it false wherever a step launches several processes itself (Lightning's DDP or
DeepSpeed launcher re-runs the command line of the process that started it) or needs another
Python environment (vLLM): each step is then its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import string
import subprocess
import sys
import time
from pathlib import Path

import yaml


def load(config: str, overrides: dict[str, str] | None = None) -> dict:
    """Read a pipeline; `steps` becomes a list of batches, each a list of steps run together, with
    `$name` in their commands replaced by the value of `vars` (or `overrides`)."""
    spec = yaml.safe_load(Path(config).read_text())
    if not isinstance(spec, dict) or not spec.get("steps") or "workdir" not in spec:
        raise ValueError(f"{config}: a pipeline needs `workdir` and a non-empty list `steps`")
    values = {name: str(value) for name, value in (spec.get("vars") or {}).items()}
    unknown = sorted(set(overrides or {}) - set(values))
    if unknown:
        raise ValueError(f"{config}: no vars {unknown}; it has {sorted(values) or 'none'}")
    values.update(overrides or {})
    batches, names = [], set()
    for entry in spec["steps"]:
        batch = entry["together"] if isinstance(entry, dict) and set(entry) == {"together"} else [entry]
        for step in batch:
            if not isinstance(step, dict) or set(step) != {"name", "run"}:
                raise ValueError(
                    f"{config}: a step has exactly `name` and `run` (or is a `together:` list of such), got {step}"
                )
            step["run"] = fill(step["run"], values, config)
            if step["name"] in names:
                raise ValueError(f"{config}: step name {step['name']!r} is used twice")
            names.add(step["name"])
        batches.append(batch)
    spec["steps"] = batches
    return spec


def fill(command: str, values: dict[str, str], config: str) -> str:
    """The command with each `$name` replaced by its value; an undefined name is an error."""
    try:
        return string.Template(command).substitute(values)
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"{config}: step command {command!r} uses a var that `vars` does not define: {error}"
        ) from None


def marker(workdir: str, name: str) -> Path:
    return Path(workdir) / "pipeline" / f"{name}.done"


def is_done(workdir: str, step: dict) -> bool:
    path = marker(workdir, step["name"])
    return path.exists() and json.loads(path.read_text())["run"] == step["run"]


def run_in_process(argv: list[str]) -> None:
    """Run a `carevl` or `python` command line inside this process; anything else as a subprocess."""
    program, args = argv[0], argv[1:]
    saved = sys.argv
    try:
        if program == "carevl":
            from carevl.cli import run

            run(args)
        elif program in ("python", "python3") and args[:1] == ["-m"] and len(args) > 1:
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif program in ("python", "python3") and args and args[0].endswith(".py"):
            sys.argv = args
            runpy.run_path(args[0], run_name="__main__")
        else:
            subprocess.run(resolve(argv), check=True)
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise RuntimeError(f"exited with status {exit_.code}") from None
    finally:
        sys.argv = saved


def resolve(argv: list[str]) -> list[str]:
    """The command line with its program taken from this Python's environment: `python` is this
    interpreter and `carevl` (any console script beside it) its own copy, so `.venv/bin/python
    tools/pipeline.py ...` runs the steps with .venv's tools without activating it."""
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    beside = Path(sys.executable).parent / argv[0]
    return [str(beside), *argv[1:]] if "/" not in argv[0] and beside.exists() else argv


def run_together(steps: list[dict], workdir: str) -> None:
    """Start every step as its own process with an equal share of the threads; wait for all."""
    threads = max(1, (os.cpu_count() or 1) // len(steps))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs = [marker(workdir, step["name"]).with_suffix(".log") for step in steps]
    running = []
    for step, log in zip(steps, logs):
        print(f"   {step['name']} (log: {log})", flush=True)
        with open(log, "w") as out:
            running.append(
                subprocess.Popen(resolve(shlex.split(step["run"])), env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    failed = [step["name"] for step, process in zip(steps, running) if process.wait() != 0]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed; see {', '.join(str(log) for log in logs)}")


def run_batch(batch: list[dict], workdir: str, in_process: bool) -> None:
    if len(batch) > 1:
        run_together(batch, workdir)
    elif in_process:
        run_in_process(shlex.split(batch[0]["run"]))
    else:
        subprocess.run(resolve(shlex.split(batch[0]["run"])), check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the pipeline YAML (workdir, in_process, steps)")
    parser.add_argument("--list", action="store_true", help="print the steps and whether each is done, run nothing")
    parser.add_argument("--from", dest="start", metavar="STEP", help="run this step and every later one, done or not")
    parser.add_argument("--to", dest="stop", metavar="STEP", help="stop after this step")
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one of the pipeline's `vars` for this run (e.g. --var seed=1); repeatable",
    )
    args = parser.parse_args(argv)
    overrides = {}
    for assignment in args.var:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            parser.error(f"--var takes NAME=VALUE, got {assignment!r}")
        overrides[name] = value
    try:
        spec = load(args.config, overrides)
    except ValueError as error:
        parser.error(str(error))
    steps, workdir = spec["steps"], spec["workdir"]
    names = [step["name"] for batch in steps for step in batch]
    for name in (args.start, args.stop):
        if name is not None and name not in names:
            parser.error(f"no step {name!r}; the steps are: {', '.join(names)}")
    if args.list:
        for batch in steps:
            for step in batch:
                together = " (together with the next)" if step is not batch[-1] else ""
                print(f"[{'done' if is_done(workdir, step) else '    '}] {step['name']}: {step['run']}{together}")
        return

    started, rerun = time.time(), False
    for batch in steps:
        batch_names = [step["name"] for step in batch]
        rerun = rerun or args.start in batch_names or not all(is_done(workdir, step) for step in batch)
        title = " + ".join(batch_names)
        if not rerun:
            print(f"== {title}: done, skipped", flush=True)
        else:
            for step in batch:
                print(f"== {step['name']}: {step['run']}", flush=True)
                marker(workdir, step["name"]).unlink(missing_ok=True)
            marker(workdir, batch_names[0]).parent.mkdir(parents=True, exist_ok=True)
            began = time.time()
            try:
                run_batch(batch, workdir, spec.get("in_process", False))
            except Exception as error:
                raise SystemExit(
                    f"pipeline step {title} failed: {error}\nfix it and run the same command again to resume"
                ) from error
            seconds = time.time() - began
            for step in batch:
                marker(workdir, step["name"]).write_text(json.dumps({"run": step["run"], "seconds": round(seconds, 1)}))
            print(f"== {title}: finished in {seconds:.0f} s", flush=True)
        if args.stop in batch_names:
            break
    print(f"== pipeline finished in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
