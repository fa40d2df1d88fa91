"""The configs a user runs, as shipped: configs/sft.yaml, `python tools/reference_logps.py`,
configs/dpo.yaml, then configs/eval/*.yaml on the DPO judge; and the strategy blocks stacked on
sft.yaml. Each runs from a working directory laid out as the configs expect (data/..., runs/...).
Only what a CPU run of the tiny judge needs is overridden: devices, steps, the global batch, the
validation interval, the loader's workers, the generation budget and the strategy's class where a
CPU needs the test variant (tests/workers/cpu_deepspeed.py, tests/workers/cpu_fsdp.py). Before these ran, the
offload blocks failed at start-up and the FSDP block at its first step."""

import json
import math
from pathlib import Path

import pytest
import torch

from carevl.benchmarks import MLLM_JUDGE, VLREWARDBENCH
from carevl.standins.world import write_benchmarks, write_preference_groups
from tests.helpers import ROOT, carevl, metrics, python_module

pytest.importorskip("deepspeed")

CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.max_steps=2",
    "--global_batch_size=4",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.max_new_tokens=8",
    "--data.init_args.num_workers=0",
    "--data.init_args.val_batch_size=2",
]
CURATION = Path("runs/curation/real")  # the work folder of configs/curation/gpt4o.yaml
TEST_STRATEGY = {"fsdp": "tests.workers.cpu_fsdp.CPUFSDP"}  # every other block is DeepSpeed's


def workdir(tmp_path: Path, world: Path) -> Path:
    """A working directory with the repository's configs and the data where the configs look."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / CURATION).mkdir(parents=True)
    (tmp_path / CURATION / "sft").symlink_to(world / "train")
    (tmp_path / CURATION / "sft-heldout").symlink_to(world / "heldout")
    return tmp_path


def fit(cwd: Path, *configs_and_arguments: str, strategy: str = "tests.workers.cpu_deepspeed.CPUDeepSpeed") -> None:
    config, *rest = configs_and_arguments
    carevl("fit", config, *rest, *CPU, f"--trainer.strategy.class_path={strategy}", cwd=cwd, DS_ACCELERATOR="cpu")


def trained_export(export: Path, start: str) -> None:
    """`export` is a bfloat16 Hugging Face checkpoint whose language weights moved from `start`."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(export)
    weights, before = model.state_dict(), AutoModelForImageTextToText.from_pretrained(start).state_dict()
    assert model.dtype == torch.bfloat16 and weights.keys() == before.keys()
    assert any(
        not torch.equal(weights[k], before[k].to(torch.bfloat16))
        for k in weights
        if k.startswith("model.language_model.layers.")
    )


def test_sft_then_reference_then_dpo_as_shipped(tiny_qwen, world, tmp_path):
    cwd = workdir(tmp_path, world)
    groups = CURATION / "groups" / "best_to_worse"
    write_preference_groups(str(cwd / groups), n=16, shard_size=8)
    write_benchmarks(str(cwd / "data" / "bench"), n=8)

    # configs/sft.yaml (DeepSpeed ZeRO-2): ExportHF writes the judge the DPO config starts from
    fit(cwd, "configs/sft.yaml", f"--model.init_args.backbone.init_args.model={tiny_qwen}")
    assert any(r.get("val/verdict_accuracy") for r in metrics(cwd / "runs" / "sft" / "logs"))
    trained_export(cwd / "runs" / "sft" / "hf", tiny_qwen)

    # the reference log-probs, as configs/dpo.yaml's header says to compute them
    python_module(
        "tools.reference_logps", "--model", "runs/sft/hf", "--shards", str(groups), "--dtype", "bfloat16", cwd=cwd
    )
    assert len(json.loads((cwd / groups / "reference-logps.json").read_text())["logps"]) == 16

    # configs/dpo.yaml (ZeRO-3, the precomputed reference), validated on VL-RewardBench-format shards
    fit(cwd, "configs/dpo.yaml")
    rows = metrics(cwd / "runs" / "dpo" / "logs")
    first = next(r for r in rows if r.get("train/loss"))
    assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=2e-3), "bf16 log-probs of the same weights"
    assert any(r.get("val/vlrewardbench/overall") for r in rows)
    trained_export(cwd / "runs" / "dpo" / "hf", str(cwd / "runs" / "sft" / "hf"))

    # configs/eval/*.yaml on the DPO judge: the paper's protocol (sampled critiques, runs averaged)
    for name in (VLREWARDBENCH, MLLM_JUDGE):
        carevl(
            "test",
            f"configs/eval/{name}.yaml",
            "--trainer.accelerator=cpu",
            "--model.init_args.eval_runs=2",
            "--model.init_args.max_new_tokens=8",
            "--data.init_args.num_workers=0",
            cwd=cwd,
        )
        out = cwd / "runs" / "eval" / name
        results = json.loads((out / "test" / "results.json").read_text())
        assert results["judge"] == "runs/dpo/hf" and results["settings"]["eval_runs"] == 2
        assert f"### {name}" in (out / "test" / "results.md").read_text()
        assert len((out / "predictions-test-rank0.jsonl").read_text().splitlines()) == 8 * 2  # records x runs


@pytest.mark.parametrize("block", ["zero3_offload", "fsdp"])  # plain ZeRO-3 is configs/dpo.yaml's own, above
def test_a_strategy_block_stacked_on_the_sft_config_trains_and_exports(tiny_qwen, world, tmp_path, block):
    cwd = workdir(tmp_path, world)
    fit(
        cwd,
        "configs/sft.yaml",
        "--config",
        f"configs/strategies/{block}.yaml",
        f"--model.init_args.backbone.init_args.model={tiny_qwen}",
        strategy=TEST_STRATEGY.get(block, "tests.workers.cpu_deepspeed.CPUDeepSpeed"),
    )
    trained_export(cwd / "runs" / "sft" / "hf", tiny_qwen)
