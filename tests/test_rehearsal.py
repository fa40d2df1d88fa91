"""tools/rehearse.py: the real pipeline's configs with every model replaced by a local replica and
every engine on the CPU, and (slow, with .venv-vllm) every step of real.yaml run end to end on them."""

from __future__ import annotations

import json

import pytest
import yaml

from carevl.standins.world import write_release_benchmarks
from tests.helpers import ROOT, load_tool

rehearse = load_tool("rehearse")
convert = load_tool("convert_benchmark")


def real_curation() -> dict:
    return yaml.safe_load((ROOT / rehearse.CURATION_CONFIG).read_text())


def local_models(config: dict) -> set[str]:
    """Every model a local engine of the curation config loads."""
    found = set()

    def collect(node):
        if isinstance(node, dict):
            if "class_path" in node and not node["class_path"].rsplit(".", 1)[-1].startswith("OpenAI"):
                found.add(node["init_args"]["model"])
            for value in node.values():
                collect(value)

    collect(config)
    return found


def test_every_model_of_the_real_config_is_replaced_and_every_engine_is_local(tmp_path):
    real = real_curation()
    # 4 LVLM candidates (the captioner is one of them), 5 experts, the evaluator, and the SFT judge
    hub_ids = local_models(real) - {"runs/sft/hf"}
    assert len(hub_ids) == 10 and "runs/sft/hf" in local_models(real)
    replicas = {hub_id: str(tmp_path / hub_id.replace("/", "--")) for hub_id in hub_ids}
    config = rehearse.rehearsal_config(real, replicas, "http://127.0.0.1:1/v1")
    assert local_models(config) == {*replicas.values(), "runs/sft/hf"}
    text = yaml.safe_dump(config)
    assert "tensor_parallel_size: 4" not in text and "device: auto" not in text and "cuda" not in text
    assert config["judge"]["batch"]["init_args"]["base_url"] == "http://127.0.0.1:1/v1"
    assert config["candidates"]["models"]["gpt-4o"]["init_args"]["base_url"] == "http://127.0.0.1:1/v1"
    assert {section["workdir"] for section in config.values() if "workdir" in section} == {"runs/curation/real"}
    assert config["evaluate"]["structured"] is True and real["evaluate"]["structured"] is False
    missing = dict(replicas)
    missing.popitem()
    with pytest.raises(KeyError, match="no replica"):
        rehearse.rehearsal_config(real, missing, "http://127.0.0.1:1/v1")


def test_the_rehearsal_runs_every_real_step_as_written_plus_its_cpu_arguments(tmp_path):
    real = yaml.safe_load((ROOT / "configs" / "pipeline" / "real.yaml").read_text())
    replicas = {"Qwen/Qwen2-VL-7B-Instruct": "/m/qwen2-vl"}
    pipeline = rehearse.rehearsal_pipeline(real, tmp_path / "c.yaml", replicas)
    assert pipeline["workdir"] == real["workdir"] and [s["name"] for s in pipeline["steps"]] == [
        s["name"] for s in real["steps"]
    ]
    for step, original in zip(pipeline["steps"], real["steps"]):
        assert step["run"].startswith(original["run"].replace(rehearse.CURATION_CONFIG, str(tmp_path / "c.yaml")))
    runs = {step["name"]: step["run"] for step in pipeline["steps"]}
    assert "--model.init_args.backbone.init_args.model /m/qwen2-vl" in runs["sft"]
    assert runs["sft"].endswith("--model.init_args.lr 1.0e-3") and "--trainer.accelerator cpu" in runs["dpo"]
    assert runs["critiques"].endswith(f"--config {tmp_path / 'c.yaml'} critiques")
    renamed = {**real, "steps": [dict(s, name="fine-tune") if s["name"] == "sft" else s for s in real["steps"]]}
    with pytest.raises(ValueError, match="no step"):
        rehearse.rehearsal_pipeline(renamed, tmp_path / "c.yaml", replicas)


def test_the_release_format_stand_ins_convert_to_benchmark_shards(tmp_path):
    from carevl.schema import read_manifest

    write_release_benchmarks(tmp_path / "raw", n=9)
    raw = tmp_path / "raw"
    assert convert.main(["vlrewardbench-parquet", str(raw / "vl-rewardbench"), "--out", str(tmp_path / "v")]) == 0
    args = ["mllm-judge", str(raw / "mllm-judge" / "pair.jsonl"), "--images", str(raw / "mllm-judge")]
    assert convert.main([*args, "--out", str(tmp_path / "m")]) == 0
    assert read_manifest(tmp_path / "v")["samples"] == read_manifest(tmp_path / "m")["samples"] == 9


def test_the_evaluator_replica_is_a_llama_3_chat_model_that_ends_its_turn(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from carevl.standins.experts import build_evaluator

    path = build_evaluator(tmp_path / "evaluator")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Grade it."}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nGrade it.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv-vllm" / "bin" / "python").exists(), reason="needs .venv-vllm")
def test_the_rehearsal_runs_every_step_of_real_yaml(tmp_path, capsys):
    assert rehearse.main(["--out", str(tmp_path), "--items", "12"]) == 0
    found = json.loads(capsys.readouterr().out.split("requests to the local OpenAI endpoint\n", 1)[1])
    real = yaml.safe_load((ROOT / "configs" / "pipeline" / "real.yaml").read_text())
    assert {step["name"] for step in real["steps"]} <= set(found)  # every step finished
    for written in ("runs/curation/real/groups/best_to_worse", "runs/dpo/hf", "eval vlrewardbench", "eval mllm_judge"):
        assert written in found
