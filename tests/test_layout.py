"""Dependencies point one way: the product never imports its stand-ins, the library never imports the
datamodules (only the CLI joins them), and the code keeps the format and lint rules of pyproject.toml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, environment

PRODUCT = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in ("carevl", "datamodules")
    for path in (ROOT / package).rglob("*.py")
    if "standins" not in path.parts and path.name != "__init__.py"
)


def imported_after(modules: list[str]) -> list[str]:
    """The modules loaded in a fresh interpreter after importing `modules`."""
    code = (
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_product_imports_no_stand_in():
    assert "carevl.curation.stages" in PRODUCT and "carevl.cli" in PRODUCT and len(PRODUCT) > 30
    loaded = imported_after([m for m in PRODUCT if m != "carevl.backends.vllm"])  # vllm: its own environment
    assert not [m for m in loaded if m.startswith("carevl.standins")]


def test_curation_imports_neither_the_demo_world_nor_a_concrete_backend():
    loaded = imported_after(
        ["carevl.curation.stages", "carevl.curation.labels", "carevl.curation.critiques", "carevl.curation.report"]
    )
    assert not [
        m
        for m in loaded
        if m.startswith(("carevl.standins", "carevl.backends.openai_api", "carevl.backends.hf", "openai"))
    ]


def test_the_library_imports_no_datamodule_but_through_the_cli():
    loaded = imported_after(
        [m for m in PRODUCT if m.startswith("carevl.") and m not in ("carevl.cli", "carevl.backends.vllm")]
    )
    assert not [m for m in loaded if m.startswith("datamodules")]


@pytest.mark.parametrize("check", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_the_code_keeps_its_format_and_lint_rules(check):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    done = subprocess.run([ruff, *check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
