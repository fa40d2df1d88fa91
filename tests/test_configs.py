"""Every shipped YAML parses against the code (found recursively, with a count check)."""

from pathlib import Path

import pytest

from carevl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "curation" not in p.parts)
CURATION = sorted((ROOT / "configs" / "curation").glob("*.yaml"))
STAGES = ["ingest", "candidates", "captions", "pairs", "judge", "votes", "split", "sft_shards", "report", "critiques", "evaluate", "groups"]


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


def test_curation_config_count():
    assert [p.name for p in CURATION] == ["gpt4o.yaml", "shapes.yaml"]


@pytest.mark.parametrize("path", CURATION, ids=lambda p: p.name)
def test_curation_config_parses_for_every_stage(path, capsys):
    import importlib.util

    import yaml

    assert set(yaml.safe_load(path.read_text())) == set(STAGES)
    spec = importlib.util.spec_from_file_location("curate", ROOT / "tools" / "curate.py")
    curate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curate)
    for stage in STAGES:
        with pytest.raises(SystemExit) as exit_info:
            curate.main(["--config", str(path), stage, "--print_config"])
        assert exit_info.value.code in (0, None), stage
        assert "workdir: runs/curation/" in capsys.readouterr().out
