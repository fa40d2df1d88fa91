"""Every shipped YAML parses against the code (found recursively, with a count check; the source
list configs/sources/paper.yaml is parsed in tests/test_sources.py)."""

from pathlib import Path

import pytest

from carevl.cli import main
from tests.helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
NOT_CAREVL = {"curation", "strategies", "engines", "pipeline", "sources"}  # tool configs and blocks: tests of their own
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not NOT_CAREVL & set(p.parts))
STRATEGIES = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))
CURATION = sorted((ROOT / "configs" / "curation").glob("*.yaml"))
STAGES = [
    "ingest",
    "decontaminate",
    "candidates",
    "captions",
    "pairs",
    "judge",
    "votes",
    "split",
    "sft_shards",
    "report",
    "critiques",
    "evaluate",
    "groups",
]


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

    import yaml

    # the shapes world asks from a few templates over flat shapes: nothing to decontaminate against
    stages = [s for s in STAGES if not (s == "decontaminate" and path.name == "shapes.yaml")]
    assert set(yaml.safe_load(path.read_text())) == set(stages)
    curate = load_tool("curate")
    for stage in stages:
        with pytest.raises(SystemExit) as exit_info:
            curate.main(["--config", str(path), stage, "--print_config"])
        assert exit_info.value.code in (0, None), stage
        assert f"workdir: {yaml.safe_load(path.read_text())[stage]['workdir']}\n" in capsys.readouterr().out


def test_strategy_count():
    assert [p.stem for p in STRATEGIES] == ["fsdp", "zero2", "zero2_offload", "zero3", "zero3_offload"]


@pytest.mark.parametrize("base", ["configs/eval/vlrewardbench.yaml", "configs/eval/mllm_judge.yaml"])
def test_the_vllm_engine_block_stacks_on_the_eval_configs(base, capsys):
    import yaml

    block = ROOT / "configs" / "engines" / "vllm.yaml"
    assert [p.name for p in block.parent.glob("*.yaml")] == ["vllm.yaml"]
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(ROOT / base), "--config", str(block), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    engine = config["model"]["init_args"]["engine"]
    assert engine["class_path"] == "carevl.backends.openai_api.OpenAIChat"
    assert engine["init_args"]["base_url"] == "http://127.0.0.1:8000/v1"
    assert config["data"]["init_args"]["val_batch_size"] == 256
    assert config["data"]["init_args"]["test"] == yaml.safe_load((ROOT / base).read_text())["data"]["init_args"]["test"]


@pytest.mark.parametrize("base", ["configs/sft.yaml", "configs/dpo.yaml"])
@pytest.mark.parametrize("path", STRATEGIES, ids=lambda p: p.stem)
def test_strategy_blocks_stack_on_training_configs(path, base, capsys):
    import json

    import yaml

    assert f"--config configs/strategies/{path.name}" in path.read_text().splitlines()[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / base), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    expected = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    assert strategy["class_path"] == expected["class_path"]
    if "config" in expected["init_args"]:
        assert strategy["init_args"]["config"] == expected["init_args"]["config"]
        deepspeed = json.loads((ROOT / expected["init_args"]["config"]).read_text())
        stage = deepspeed["zero_optimization"]["stage"]
        assert stage == int(path.stem[4]) and deepspeed["bf16"]["enabled"]
        assert ("offload_optimizer" in deepspeed["zero_optimization"]) == path.stem.endswith("offload")
        # Lightning sets these from the trainer; DeepSpeed rejects "auto" and Lightning raises on the first
        assert "gradient_accumulation_steps" not in deepspeed and "train_micro_batch_size_per_gpu" not in deepspeed
