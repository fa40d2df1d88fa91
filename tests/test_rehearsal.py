"""tools/rehearse.py: the real curation config with every model replaced by a local replica, and
(slow, with .venv-vllm) the real pipeline's curation-I steps run end to end on them."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import ROOT, load_tool

rehearse = load_tool("rehearse")


def test_every_model_of_the_real_config_is_replaced_and_every_engine_is_local(tmp_path):
    real = yaml.safe_load((ROOT / "configs" / "curation" / "gpt4o.yaml").read_text())
    hub_ids = set()

    def collect(node):  # every local-engine model the curation-I stages name
        if isinstance(node, dict):
            if "class_path" in node and not node["class_path"].rsplit(".", 1)[-1].startswith("OpenAI"):
                hub_ids.add(node["init_args"]["model"])
            for value in node.values():
                collect(value)

    collect({stage: real[stage] for stage in ("candidates", "captions", "votes")})
    assert len(hub_ids) == 9  # 4 LVLM candidates (the captioner is one of them) and 5 experts
    replicas = {hub_id: str(tmp_path / hub_id.replace("/", "--")) for hub_id in hub_ids}
    config = rehearse.rehearsal_config(real, tmp_path, replicas, "http://127.0.0.1:1/v1", tmp_path / "q.jsonl")
    text = yaml.safe_dump(config)
    assert not [hub_id for hub_id in hub_ids if f"model: {hub_id}" in text]
    assert "tensor_parallel_size: 4" not in text and "device: auto" not in text and "cuda" not in text
    assert config["judge"]["batch"]["init_args"]["base_url"] == "http://127.0.0.1:1/v1"
    assert config["candidates"]["models"]["gpt-4o"]["init_args"]["base_url"] == "http://127.0.0.1:1/v1"
    assert {section["workdir"] for section in config.values()} == {str(tmp_path / "curation")}
    missing = dict(replicas)
    missing.popitem()
    with pytest.raises(KeyError, match="no replica"):
        rehearse.rehearsal_config(real, tmp_path, missing, "http://127.0.0.1:1/v1", tmp_path / "q.jsonl")


def test_the_rehearsal_pipeline_is_real_yamls_curation_steps():
    real = yaml.safe_load((ROOT / "configs" / "pipeline" / "real.yaml").read_text())
    pipeline = rehearse.rehearsal_pipeline(real, ROOT / "r.yaml", ROOT / "runs" / "r")
    by_name = {step["name"]: step["run"] for step in real["steps"]}
    assert [step["name"] for step in pipeline["steps"]] == list(rehearse.CURATION_I)
    for step in pipeline["steps"]:
        assert step["run"] == by_name[step["name"]].replace("configs/curation/gpt4o.yaml", str(ROOT / "r.yaml"))


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv-vllm" / "bin" / "python").exists(), reason="needs .venv-vllm")
def test_the_rehearsal_runs_curation_i_end_to_end(tmp_path, capsys):
    assert rehearse.main(["--out", str(tmp_path), "--items", "12"]) == 0
    found = json.loads(capsys.readouterr().out.split("requests to the local OpenAI endpoint\n", 1)[1])
    assert set(found) >= {"ingest", "candidates", "captions", "pairs", "judge", "votes", "split", "sft_shards"}
