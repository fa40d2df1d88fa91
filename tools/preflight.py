"""Check what a pipeline needs before any step costs money or GPU hours: input files, environment
variables (checked for presence only; values are never printed), Python environments that import
what their steps import, and GPUs. Every check runs and is listed; the exit status is 1 when any
failed.

    python tools/preflight.py --files data/questions.jsonl --env OPENAI_API_KEY "HF_TOKEN|HUGGING_FACE_HUB_TOKEN" \\
        --imports "python:carevl,lightning" ".venv-vllm/bin/python:vllm,carevl" --gpus 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def check_files(paths: list[str]) -> list[tuple[str, str | None]]:
    return [(f"file {path}", None if Path(path).exists() else "missing (a folder, or a file)") for path in paths]


def check_env(names: list[str]) -> list[tuple[str, str | None]]:
    """Each entry is a variable or alternatives joined by "|"; one of them must be set and non-empty."""
    results = []
    for entry in names:
        options = entry.split("|")
        found = any(os.environ.get(name) for name in options)
        results.append((f"environment {' or '.join(options)}", None if found else "not set"))
    return results


def check_imports(specs: list[str]) -> list[tuple[str, str | None]]:
    """Each spec is "<python>:<module>,<module>": that interpreter must import every module."""
    results = []
    for spec in specs:
        python, _, modules = spec.rpartition(":")
        if not python or not modules:
            raise SystemExit(f"--imports takes <python>:<module>,<module>, got {spec!r}")
        label = f"{python} imports {modules}"
        executable = shutil.which(python) or (python if Path(python).exists() else None)
        if executable is None:
            results.append((label, "no such interpreter (tools/setup_env.sh, tools/setup_vllm_env.sh make them)"))
            continue
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
        done = subprocess.run(
            [executable, "-c", code, *modules.split(",")], capture_output=True, text=True, timeout=600
        )
        error = done.stderr.strip().splitlines()[-1] if done.returncode else None
        results.append((label, error or (None if done.returncode == 0 else f"exit {done.returncode}")))
    return results


def check_gpus(needed: int) -> list[tuple[str, str | None]]:
    if needed <= 0:
        return []
    smi = shutil.which("nvidia-smi")
    found = 0
    if smi:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True)
        found = sum(line.startswith("GPU ") for line in listed.stdout.splitlines())
    return [(f"{needed} GPUs", None if found >= needed else f"{found} found")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[], help="paths that must exist")
    parser.add_argument("--env", nargs="*", default=[], help='variables that must be set ("A|B": either)')
    parser.add_argument("--imports", nargs="*", default=[], help='"<python>:<module>,..." checks')
    parser.add_argument("--gpus", type=int, default=0, help="GPUs this node must have")
    args = parser.parse_args(argv)
    results = [
        *check_files(args.files),
        *check_env(args.env),
        *check_imports(args.imports),
        *check_gpus(args.gpus),
    ]
    for label, problem in results:
        print(f"{'ok  ' if problem is None else 'FAIL'} {label}" + (f": {problem}" if problem else ""))
    failed = sum(problem is not None for _, problem in results)
    print(f"preflight: {len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
