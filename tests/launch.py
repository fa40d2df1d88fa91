"""`carevl` (or another module of the project) run in a child process, for the tests that start
several processes (gloo on CPU) or run the shipped configs from a working directory of their own."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def environment(**env: str) -> dict[str, str]:
    """The environment of a child process: the project importable, offline, outside any SLURM job
    the tests themselves run in (whose ranks it must not take), with `env` on top."""
    variables = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    variables.pop("SLURM_JOB_ID", None)
    return {**variables, **env}


def python_module(module: str, *arguments: str, cwd: Path = ROOT, fails: bool = False, **env: str) -> str:
    """`python -m MODULE ARGUMENTS...` in `cwd`, on its own rendezvous port; its stderr. Fails the
    test with the end of its stderr when it fails (with `fails`: when it succeeds)."""
    variables = environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), **env)
    done = subprocess.run([sys.executable, "-m", module, *arguments], cwd=cwd, env=variables, capture_output=True, text=True, timeout=600)
    assert (done.returncode != 0) == fails, done.stderr[-3000:]
    return done.stderr


def carevl(command: str, config: Path | str, *arguments: str, cwd: Path = ROOT, fails: bool = False, **env: str) -> str:
    """`carevl COMMAND --config CONFIG ARGUMENTS...` (see `python_module`)."""
    return python_module("carevl.cli", command, "--config", str(config), *arguments, cwd=cwd, fails=fails, **env)
