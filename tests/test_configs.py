"""Every shipped YAML parses against the code (found recursively, with a count check)."""

from pathlib import Path

import pytest

from carevl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_config_count():
    # Update when adding or removing a config: a silently vanished file must fail here.
    assert len(CONFIGS) == 8, [str(p) for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_names_its_command(path, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# carevl ") and f"--config {path.relative_to(ROOT)}" in first
    subcommand = first.split()[2]
    assert subcommand in ("fit", "validate", "test", "predict"), first
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: carevl." in printed and "class_path: datamodules." in printed
