"""Every command in the README's bash blocks runs as written, as far as a CPU can check without
running the work: `carevl` commands parse with their configs and overrides (`--print_config`),
curation stages parse with theirs, the pipeline lists its steps, every other script accepts every
option the README gives it, and every repository path it names exists. The README stays a user's
document, not a notebook."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import ROOT, environment, load_tool

README = (ROOT / "README.md").read_text()
# Paths a command writes or reads outside the repository (outputs, data the user downloads).
ELSEWHERE = ("runs/", "data/", "test-00000", "pair.jsonl", "MLLM-Judge/")


def commands() -> list[str]:
    """The commands of the README's bash blocks: continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def test_the_readme_is_a_users_document():
    assert len(README.splitlines()) <= 250
    assert len(commands()) >= 20
    for heading in (
        "## Install",
        "## The workflow",
        "## Configs",
        "## Project map",
        "## Documentation",
        "## Contributing",
    ):
        assert heading in README
    for link in re.findall(r"\]\((docs/[^)]+)\)", README):
        assert (ROOT / link).is_file(), link


def repository_paths(argv: list[str]) -> list[str]:
    return [
        a for a in argv if re.match(r"^(configs|tools|carevl|datamodules|tests|docs)/", a) or a == "constraints.txt"
    ]


def help_text(argv: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("command", commands())
def test_readme_command_runs_as_written(command, capsys):
    argv = shlex.split(command)
    for path in repository_paths(argv):
        assert (ROOT / path).exists(), f"{command}: {path} does not exist"
    program, args = argv[0], argv[1:]
    if program == "bash" or program == "sbatch":
        script = next(a for a in args if a.startswith("tools/"))
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
    elif program == "pip":
        extras = re.search(r"\[(.+)\]", command).group(1).split(",")
        optional = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
        assert all(re.search(rf"^{extra} = ", optional, re.MULTILINE) for extra in extras), extras
    elif program == "carevl":
        from carevl.cli import main

        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code in (0, None), command
        capsys.readouterr()
    elif args[:1] == ["tools/curate.py"]:
        curate = load_tool("curate")
        with pytest.raises(SystemExit) as exit_info:
            curate.main(args[1:] if "--help" in args else [*args[1:], "--print_config"])
        assert exit_info.value.code in (0, None), command
        capsys.readouterr()
    elif args[:1] == ["tools/pipeline.py"]:
        load_tool("pipeline").main([*args[1:], "--list"])
    elif program == "python":
        script = args[:2] if args[0] == "-m" else args[:1]
        options = {a.split("=")[0] for a in args if a.startswith("--")}
        text = help_text(script)
        assert all(option in text for option in options), (command, options)
    elif program == ".venv-vllm/bin/python":  # the server `tests/test_evaluation.py` starts the same way
        from carevl.backends.vllm import SERVER_MODULE

        assert args[:2] == ["-m", SERVER_MODULE] and args[-1] == "&" and "--model" in args, command
    else:
        pytest.fail(f"the README test does not know how to check {program!r}: {command}")
