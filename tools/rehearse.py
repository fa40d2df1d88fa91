"""Rehearse curation I of the real pipeline on this machine: the steps of configs/pipeline/real.yaml
from ingest to report, with configs/curation/gpt4o.yaml's backends and engines (vLLM on the CPU in
.venv-vllm, the OpenAI backend against a local OpenAI-compatible endpoint, the expert families),
every named model replaced by a tiny local replica of the same architecture.

    bash tools/setup_vllm_env.sh && python tools/rehearse.py --out runs/rehearsal

It writes <out>/models (the replicas), <out>/questions.jsonl (shapes-world items), <out>/curation.yaml
(gpt4o.yaml with the replicas, the local endpoint and CPU settings), <out>/pipeline.yaml (real.yaml's
curation-I steps on that config), then runs that pipeline (tools/pipeline.py: a rerun resumes) and
prints what each stage wrote. Random replicas say nothing useful; the rehearsal proves the wiring.
Curation II is left out: its evaluator must grade critiques in a format a random model cannot write.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CURATION_I = ("ingest", "candidates", "captions", "pairs", "judge", "votes", "split", "sft-shards", "report")
ENGINE = {"gpu_memory_utilization": 0.1, "max_model_len": 2048, "dtype": "float32", "tensor_parallel_size": 1}


def build_replicas(folder: Path) -> dict[str, str]:
    """Hub id -> local replica for every model gpt4o.yaml names (built once; a rerun reuses them)."""
    from carevl.standins.experts import EXPERTS, build_expert
    from carevl.standins.tiny import build_tiny_model

    def once(path: Path, build) -> str:
        if not (path / "config.json").exists():
            build(path)
        return str(path)

    qwen2_vl = once(folder / "qwen2-vl", lambda p: build_tiny_model(p, family="qwen2_vl", hidden=128, layers=2))
    llava = once(
        folder / "llava-onevision", lambda p: build_tiny_model(p, family="llava_onevision", hidden=128, layers=2)
    )
    replicas = {
        "Qwen/Qwen2-VL-7B-Instruct": qwen2_vl,
        "Qwen/Qwen2-VL-72B-Instruct": qwen2_vl,
        "llava-hf/llava-onevision-qwen2-7b-ov-hf": llava,
        "llava-hf/llava-onevision-qwen2-72b-ov-hf": llava,
    }
    for name, (hub_id, _) in EXPERTS.items():
        replicas[hub_id] = once(folder / name, lambda p, name=name: build_expert(name, p))
    return replicas


def rehearsal_config(real: dict, out: Path, replicas: dict[str, str], base_url: str, questions: Path) -> dict:
    """gpt4o.yaml's curation-I stages with every model replaced, every engine on the CPU, the OpenAI
    backends pointed at `base_url`, one work folder under `out`. Raises on a model without a replica."""
    stages = ("ingest", "candidates", "captions", "pairs", "judge", "votes", "split", "sft_shards", "report")
    config = {stage: copy.deepcopy(real[stage]) for stage in stages}
    for section in config.values():
        section["workdir"] = str(out / "curation")
    config["ingest"]["source"] = str(questions)
    config["judge"]["batch"]["init_args"]["poll_seconds"] = 0.2
    # Random replicas write noise until the token budget ends: short budgets keep every expert
    # conversation inside the replicas' context (a longer one would be counted unscored, rightly).
    for decoding in config["candidates"]["decodings"].values():
        decoding["max_tokens"] = 24
    config["captions"]["sampling"] = {"max_tokens": 32}

    def rewrite(node):
        if isinstance(node, dict):
            if "class_path" in node:
                cls, args = node["class_path"].rsplit(".", 1)[-1], node.setdefault("init_args", {})
                if cls in ("OpenAIChat", "OpenAIBatch"):
                    args["base_url"] = base_url
                else:
                    if args["model"] not in replicas:
                        raise KeyError(f"no replica for {args['model']}")
                    args["model"] = replicas[args["model"]]
                    if cls.startswith("VLLM"):
                        args.update(ENGINE)
                    else:
                        args.update(device="cpu", dtype="float32")
            for value in node.values():
                rewrite(value)

    rewrite(config)
    return config


def rehearsal_pipeline(real_pipeline: dict, config: Path, out: Path) -> dict:
    """real.yaml's curation-I steps, as they are, on the rehearsal's curation config."""
    steps = [
        {"name": step["name"], "run": step["run"].replace("configs/curation/gpt4o.yaml", str(config))}
        for step in real_pipeline["steps"]
        if step["name"] in CURATION_I
    ]
    if [s["name"] for s in steps] != list(CURATION_I):
        raise ValueError(f"real.yaml's curation-I steps changed: {[s['name'] for s in steps]}")
    return {"workdir": str(out / "pipeline"), "in_process": False, "steps": steps}


def written(workdir: Path) -> dict[str, str]:
    """Records per stage file (ok / failed) and the SFT shards' sample count."""
    from carevl.curation.records import Records
    from carevl.curation.stages import FILES
    from carevl.schema import read_manifest

    found = {}
    for stage, name in FILES.items():
        if (workdir / name).exists():
            latest = Records(workdir / name).latest()
            failed = sum("error" in r for r in latest)
            found[stage] = f"{len(latest) - failed} ok, {failed} failed ({name})"
    if (workdir / "sft" / "manifest.json").exists():
        found["sft_shards"] = f"{read_manifest(workdir / 'sft')['samples']} samples (sft/)"
    return found


def main(argv: list[str] | None = None) -> int:
    from carevl.standins.loopback import LoopbackEndpoint
    from carevl.standins.world import write_questions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/rehearsal", help="folder for the replicas, configs and records")
    parser.add_argument("--items", type=int, default=24, help="curation items (shapes-world questions)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        raise SystemExit("no .venv-vllm: run bash tools/setup_vllm_env.sh first")
    replicas = build_replicas(out / "models")
    questions = out / "questions.jsonl"
    if not questions.exists():
        write_questions(questions, args.items, seed=0)
    real = yaml.safe_load((ROOT / "configs" / "curation" / "gpt4o.yaml").read_text())
    with LoopbackEndpoint() as endpoint:  # GPT-4o, candidate and judge (Batch API)
        config = out / "curation.yaml"
        config.write_text(yaml.safe_dump(rehearsal_config(real, out, replicas, endpoint.base_url, questions)))
        pipeline = out / "pipeline.yaml"
        real_pipeline = yaml.safe_load((ROOT / "configs" / "pipeline" / "real.yaml").read_text())
        pipeline.write_text(yaml.safe_dump(rehearsal_pipeline(real_pipeline, config, out)))
        env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "sk-rehearsal"), "HF_HUB_OFFLINE": "1"}
        began = time.time()
        done = subprocess.run([sys.executable, "tools/pipeline.py", "--config", str(pipeline)], cwd=ROOT, env=env)
    print(
        f"rehearsal: pipeline exit {done.returncode} after {time.time() - began:.0f} s; {len(endpoint.requests)} "
        "requests to the local OpenAI endpoint"
    )
    print(json.dumps(written(out / "curation"), indent=2))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
