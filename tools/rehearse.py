"""Rehearse the real pipeline on this machine: every step of configs/pipeline/real.yaml, from
preflight to both benchmarks, with configs/curation/gpt4o.yaml's backends and engines (vLLM on the
CPU in .venv-vllm, the OpenAI backend against a local OpenAI-compatible endpoint, the expert
families, the SFT and DPO LightningModules, the reference precompute, the evaluator) and every
named model replaced by a tiny local replica of the same architecture.

    bash tools/setup_vllm_env.sh && python tools/rehearse.py --out runs/rehearsal

The out folder stands in for the repository root of a real run: real.yaml's relative paths
(data/..., runs/...) land in it, and configs/, tools/ and .venv-vllm are links back here. It holds
the replicas (models/), shapes-world inputs where real.yaml expects its inputs (data/questions.jsonl,
the benchmarks in their release formats under data/raw/), curation.yaml (gpt4o.yaml with the
replicas, the local endpoint and CPU settings) and pipeline.yaml (real.yaml's steps, each command as
written there plus the CPU settings of `CPU`). It runs that pipeline (tools/pipeline.py: a rerun
resumes) and prints what each step wrote. Random replicas say nothing about quality; the rehearsal
proves the wiring.

Deviations, each forced by replicas with random weights: short token budgets (noise runs to the
budget); the SFT judge trained at a high learning rate for more epochs, so it learns the verdict
line the critiques stage parses; the evaluator asked for structured scores (`evaluate.structured`),
the one format a random model writes under structured output; 25% of the items held out for SFT
validation (real.yaml's 2% of a few items is none).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CURATION_CONFIG = "configs/curation/gpt4o.yaml"
ENGINE = {"gpu_memory_utilization": 0.1, "max_model_len": 2048, "dtype": "float32", "tensor_parallel_size": 1}
TRAIN = (
    "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true"
    " --model.init_args.backbone.init_args.dtype float32 --model.init_args.max_new_tokens 48"
    " --data.init_args.num_workers 0"
)
EVAL = (
    "--trainer.accelerator cpu --trainer.precision 32-true --model.init_args.backbone.init_args.dtype float32"
    " --model.init_args.eval_runs 1 --model.init_args.max_new_tokens 48 --data.init_args.num_workers 0"
)
# Arguments appended to real.yaml's command of a step (a later flag wins); {qwen2_vl} is the replica.
CPU = {
    "preflight": "--env OPENAI_API_KEY --gpus 0",  # no gated download here, so no hub token
    "sft": f"{TRAIN} --model.init_args.backbone.init_args.model {{qwen2_vl}} --global_batch_size 4"
    " --trainer.max_epochs 12 --model.init_args.lr 1.0e-3",
    "reference": "--dtype float32",
    "dpo": f"{TRAIN} --global_batch_size 2",
    "vlrewardbench": EVAL,
    "mllm-judge": EVAL,
}
LINKS = ("configs", "tools", ".venv-vllm")


def build_replicas(folder: Path) -> dict[str, str]:
    """Hub id -> local replica for every model gpt4o.yaml names (built once; a rerun reuses them)."""
    from carevl.standins.experts import EVALUATOR, EXPERTS, build_evaluator, build_expert
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
        EVALUATOR: once(folder / "llama-3.3-70b-instruct", build_evaluator),
    }
    for name, (hub_id, _) in EXPERTS.items():
        replicas[hub_id] = once(folder / name, lambda p, name=name: build_expert(name, p))
    return replicas


def rehearsal_config(real: dict, replicas: dict[str, str], base_url: str) -> dict:
    """gpt4o.yaml with every model replaced (the SFT judge, runs/sft/hf, is the pipeline's own),
    every engine on the CPU and the OpenAI backends pointed at `base_url`. Raises on a model without
    a replica."""
    config = copy.deepcopy(real)
    config["judge"]["batch"]["init_args"]["poll_seconds"] = 0.2
    # Random replicas write noise until the token budget ends: short budgets keep every expert
    # conversation inside the replicas' context (a longer one would be counted unscored, rightly).
    for decoding in config["candidates"]["decodings"].values():
        decoding["max_tokens"] = 24
    config["captions"]["sampling"] = {"max_tokens": 32}
    config["sft_shards"]["heldout"] = 0.25
    config["pairs"]["max_pairs_per_item"] = 10  # 12 items: the paper's one pair each would leave SFT a handful
    # The shapes world asks from a handful of question templates and draws a few flat shapes on one
    # colour: every question and many pictures would match its benchmarks'. Exact copies only here.
    config["decontaminate"].update(max_hash_distance=0, min_question_words=1000)
    config["critiques"].update(max_pairs=16, sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 48})
    config["evaluate"].update(structured=True, sampling={"max_tokens": 128})  # ~70 tokens of the replica's

    def rewrite(node):
        if isinstance(node, dict):
            if "class_path" in node:
                cls, args = node["class_path"].rsplit(".", 1)[-1], node.setdefault("init_args", {})
                if cls in ("OpenAIChat", "OpenAIBatch"):
                    args["base_url"] = base_url
                else:
                    if args["model"] not in replicas and not args["model"].startswith("runs/"):
                        raise KeyError(f"no replica for {args['model']}")
                    args["model"] = replicas.get(args["model"], args["model"])
                    if cls.startswith("VLLM"):
                        args.update(ENGINE)
                    else:
                        args.update(device="cpu", dtype="float32")
            for value in node.values():
                rewrite(value)

    rewrite(config)
    return config


def rehearsal_pipeline(real_pipeline: dict, config: Path, replicas: dict[str, str]) -> dict:
    """real.yaml, every step's command as written there with the rehearsal's curation config and
    the step's CPU arguments appended."""
    steps = []
    for step in real_pipeline["steps"]:
        if set(step) != {"name", "run"}:
            raise ValueError(f"real.yaml: the rehearsal runs plain steps, got {step}")
        extra = CPU.get(step["name"], "").format(qwen2_vl=replicas["Qwen/Qwen2-VL-7B-Instruct"])
        steps.append(
            {"name": step["name"], "run": f"{step['run'].replace(CURATION_CONFIG, str(config))} {extra}".strip()}
        )
    missing = set(CPU) - {step["name"] for step in steps}
    if missing:
        raise ValueError(f"real.yaml has no step {sorted(missing)} any more: update tools/rehearse.py's CPU")
    return {**real_pipeline, "steps": steps}


def rehearsal_responder(body: dict) -> str:
    """GPT-4o's stand-in: the judge's structured verdict drawn by a hash of the request (both
    verdicts occur, so the SFT judge learns to write either), a fixed sentence otherwise."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") != "json_schema":
        return "This is a reply from the loopback endpoint."
    verdict = 1 + hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).digest()[0] % 2
    return json.dumps({"explanation": f"Answer {verdict} matches the image.", "verdict": verdict})


def write_inputs(out: Path, items: int) -> None:
    """Shapes-world stand-ins for real.yaml's inputs, where it expects them."""
    from carevl.standins.world import write_questions, write_release_benchmarks

    if not (out / "data" / "questions.jsonl").exists():
        write_questions(out / "data" / "questions.jsonl", items, seed=0)
    if not (out / "data" / "raw" / "mllm-judge" / "pair.jsonl").exists():
        write_release_benchmarks(out / "data" / "raw", n=24)


def written(out: Path, steps: list[str]) -> dict[str, str]:
    """What each step wrote: records per curation stage (ok / failed), shard sets' sample counts,
    exported checkpoints, benchmark results, and each step's seconds."""
    from carevl.curation.provenance import selected
    from carevl.curation.records import Records
    from carevl.curation.units import FILES
    from carevl.schema import read_manifest

    curation, found = out / "runs" / "curation" / "real", {}
    done = out / "runs" / "pipeline-real" / "pipeline"
    for step in steps:
        if (done / f"{step}.done").exists():
            found[step] = f"{json.loads((done / f'{step}.done').read_text())['seconds']} s"
    for stage, name in {**FILES, "critiques": "critiques.jsonl", "evaluate": "evaluations.jsonl"}.items():
        if (curation / name).exists():
            latest = selected(Records(curation / name), failed_too=True)  # the last run's units
            failed = sum("error" in r for r in latest)
            found[f"{stage} records"] = f"{len(latest) - failed} ok, {failed} failed ({name})"
    for shards in (
        "data/bench/vlrewardbench",
        "data/bench/mllm_judge",
        *(f"runs/curation/real/{name}" for name in ("sft", "sft-heldout", "groups/best_to_worse")),
    ):
        if (out / shards / "manifest.json").exists():
            found[shards] = f"{read_manifest(out / shards)['samples']} samples"
    for checkpoint in ("runs/sft/hf", "runs/dpo/hf"):
        if (out / checkpoint / "config.json").exists():
            found[checkpoint] = "exported"
    for bench in ("vlrewardbench", "mllm_judge"):
        results = out / "runs" / "eval" / bench / "test" / "results.json"
        if results.exists():
            found[f"eval {bench}"] = json.loads(results.read_text())["results"][bench]
    return found


def main(argv: list[str] | None = None) -> int:
    from carevl.standins.loopback import LoopbackEndpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/rehearsal", help="the stand-in repository root of the rehearsal")
    parser.add_argument("--items", type=int, default=12, help="curation items (shapes-world questions)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        raise SystemExit("no .venv-vllm: run bash tools/setup_vllm_env.sh first")
    for name in LINKS:
        if not (out / name).is_symlink():
            (out / name).symlink_to(ROOT / name)
    replicas = build_replicas(out / "models")
    write_inputs(out, args.items)
    real = yaml.safe_load((ROOT / CURATION_CONFIG).read_text())
    real_pipeline = yaml.safe_load((ROOT / "configs" / "pipeline" / "real.yaml").read_text())
    with LoopbackEndpoint(rehearsal_responder) as endpoint:  # GPT-4o, candidate and judge (Batch API)
        config = out / "curation.yaml"
        config.write_text(yaml.safe_dump(rehearsal_config(real, replicas, endpoint.base_url)))
        pipeline = out / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump(rehearsal_pipeline(real_pipeline, config, replicas), sort_keys=False))
        env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "sk-rehearsal"), "HF_HUB_OFFLINE": "1"}
        began = time.time()
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "pipeline.py"), "--config", str(pipeline)], cwd=out, env=env
        )
    print(
        f"rehearsal: pipeline exit {done.returncode} after {time.time() - began:.0f} s; {len(endpoint.requests)} "
        "requests to the local OpenAI endpoint"
    )
    print(json.dumps(written(out, [step["name"] for step in real_pipeline["steps"]]), indent=2))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
