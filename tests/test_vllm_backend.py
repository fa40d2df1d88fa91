"""vLLM backends through the real engine, on tiny local models: they run in vLLM's own environment,
``.venv-vllm`` (`tools/setup_vllm_env.sh`; `tools/test.sh` runs them after the main suite), on
the CPU build here. The checks that need no engine run in the main suite too."""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
from types import SimpleNamespace

import pytest

from carevl.backends.reward_heads import IncompleteCheckpoint

needs_vllm = pytest.mark.vllm


def conversation(answer):
    return [
        {"role": "user", "content": "What colour are the shapes?\n\nImage description: two red circles at the left"},
        {"role": "assistant", "content": answer},
    ]


CONVERSATIONS = [
    conversation("The shapes are red."),
    conversation("Blue."),
    conversation("Looking at the image carefully, the shapes are green, I think."),
    conversation("Red. " * 200),  # over the engines' max_model_len below: unscored, not a failed batch
]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from carevl.standins.experts import build_expert

    root = tmp_path_factory.mktemp("experts")
    names = ("skywork-reward-llama-3.1-8b-v0.2", "skywork-reward-gemma-2-27b-v0.2", "inf-orm-llama3.1-70b")
    return {name: str(build_expert(name, root / name)) for name in names}


@needs_vllm
@pytest.mark.parametrize("name", ["skywork-reward-llama-3.1-8b-v0.2", "skywork-reward-gemma-2-27b-v0.2"])
def test_vllm_reward_is_the_raw_head_output_of_transformers(experts, name):
    from carevl.backends.hf import HFReward
    from carevl.backends.vllm import VLLMReward

    expected = HFReward(experts[name], max_length=256).score(CONVERSATIONS)
    before = set(multiprocessing.active_children())
    with VLLMReward(experts[name], max_model_len=256, gpu_memory_utilization=0.1, dtype="float32") as engine:
        assert set(multiprocessing.active_children()) - before, "the engine core runs in a process of its own"
        got = engine.score(CONVERSATIONS)
    assert not set(multiprocessing.active_children()) - before, "closed: the engine core process has stopped"
    assert got[-1] is None and expected[-1] is None
    difference = max(abs(a - b) for a, b in zip(got[:-1], expected[:-1]))
    print(f"{name}: max |vLLM - transformers| = {difference:.2e} over {len(got) - 1} conversations")
    assert difference < 1e-3
    assert not all(0 < v < 1 for v in got[:-1])  # raw logits: no sigmoid


def test_vllm_reward_refuses_a_checkpoint_with_another_head(experts):
    """INF-ORM's MLP head is not a sequence-classification head: vLLM would build its own."""
    from carevl.backends.vllm import VLLMReward

    with pytest.raises(IncompleteCheckpoint, match="inf_orm"):
        VLLMReward(experts["inf-orm-llama3.1-70b"])


@pytest.mark.parametrize("field", ["use_activation", "activation"])
def test_an_engine_whose_pooler_kept_its_activation_is_refused(field):
    from carevl.backends.vllm import require_raw_scores

    def engine(value):
        pooler = SimpleNamespace(**{field: value})
        return SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(pooler_config=pooler)))

    require_raw_scores(engine(False))
    for value in (True, None):  # None: the release dropped the switch and applies its default
        with pytest.raises(RuntimeError, match="sigmoid"):
            require_raw_scores(engine(value))


@pytest.mark.parametrize("shutdown", ["kill", "nothing"])
def test_closing_an_engine_waits_for_the_processes_it_started(shutdown, monkeypatch, caplog):
    """vLLM's shutdown kills an engine core that is slow to exit without waiting for it, and a core
    may outlive it altogether: close reaps the one and kills and reaps the other."""
    from carevl.backends import vllm as backend

    monkeypatch.setattr(backend, "ENGINE_EXIT_TIMEOUT_S", 1)
    core = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,), name="EngineCore")
    core.start()
    engine = backend._Engine()
    engine.processes = frozenset({core})
    stop = core.kill if shutdown == "kill" else lambda: None
    engine.llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=stop)))
    engine.close()
    assert core.exitcode == -signal.SIGKILL and core not in multiprocessing.active_children()
    assert engine.llm is None
    assert ("still running after close" in caplog.text) == (shutdown == "nothing")
    engine.close()  # a second call does nothing


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    from carevl.backends.vllm import VLLMChat
    from carevl.standins.tiny import build_tiny_text_model

    path = build_tiny_text_model(tmp_path_factory.mktemp("text-lm"))
    with VLLMChat(str(path), max_model_len=256, gpu_memory_utilization=0.1, dtype="float32") as engine:
        yield engine


@needs_vllm
def test_vllm_chat_seeded_samples_reproduce_and_a_long_prompt_fails_alone(chat_engine):
    from carevl.backends.interface import Chat, Sampling

    chats = [Chat.user("What colour are the shapes?"), Chat.user("Describe " * 300), Chat.user("Which answer?")]
    sampling = Sampling(n=2, temperature=1.0, seed=1, max_tokens=12)
    first = chat_engine.generate(chats, sampling)
    assert first[0].ok and first[2].ok and len(first[0].texts) == 2
    assert first[1].error.startswith("too_long")
    again = chat_engine.generate([chats[0]], sampling)
    assert again[0].texts == first[0].texts
    other = chat_engine.generate([chats[0]], Sampling(n=2, temperature=1.0, seed=2, max_tokens=12))
    assert other[0].texts != first[0].texts


@needs_vllm
def test_vllm_chat_samples_more_seeded_prompts_than_one_engine_step_holds(chat_engine):
    """64 prompts of ~200 tokens are more than an engine step's token budget (4096 on the CPU):
    with chunked prefill, vLLM's CPU build split one, then died rewinding its seeded generator."""
    from carevl.backends.interface import Chat, Sampling

    chats = [Chat.user(f"Case {i}: " + "describe the shapes and their colours " * 15) for i in range(64)]
    replies = chat_engine.generate(chats, Sampling(n=2, temperature=1.0, seed=1, max_tokens=4))
    assert all(reply.ok and len(reply.texts) == 2 for reply in replies)
    assert sum(reply.prompt_tokens for reply in replies) > 4096


@needs_vllm
def test_vllm_chat_honours_the_json_schema(chat_engine):
    """A random tiny model left alone writes no JSON; constrained to the schema it always does (the
    verdict part of the curation judge's schema: a random model's free string rarely closes)."""
    from carevl.backends.interface import Chat, Sampling

    schema = {"type": "object", "properties": {"verdict": {"type": "integer", "enum": [1, 2]}}, "required": ["verdict"]}
    chats = [Chat.user("Answer 1: red. Answer 2: blue. Which is better?"), Chat.user("Which answer?")]
    sampling = Sampling(n=3, temperature=1.0, seed=3, max_tokens=40)
    for reply in chat_engine.generate(chats, sampling, schema=schema):
        assert [json.loads(text)["verdict"] in (1, 2) for text in reply.texts] == [True] * 3
        assert not any(c.isspace() for text in reply.texts for c in text)  # compact: no runaway whitespace
    free = [text for reply in chat_engine.generate(chats, sampling) for text in reply.texts]
    assert not any(text.lstrip().startswith("{") for text in free)


@needs_vllm
def test_vllm_chat_answers_image_chats_with_the_tiny_judge(tmp_path_factory):
    """A Qwen2-VL checkpoint (the tiny judge's family) through vLLM's multimodal path: images as
    OpenAI-style parts, processed by the checkpoint's own processor, n samples per chat."""
    from carevl.backends.interface import Chat, Sampling
    from carevl.backends.vllm import VLLMChat
    from carevl.standins.shapes import judge_items
    from carevl.standins.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny-vl"), family="qwen2_vl", hidden=128, layers=2)
    items = judge_items(2, seed=0)
    chats = [Chat.user(item.question, item.image) for item in items] + [Chat.user("No image here.")]
    with VLLMChat(str(path), max_model_len=512, gpu_memory_utilization=0.1, dtype="float32") as engine:
        replies = engine.generate(chats, Sampling(n=2, temperature=1.0, seed=1, max_tokens=8))
    assert all(reply.ok and len(reply.texts) == 2 for reply in replies)
    assert replies[0].prompt_tokens > replies[2].prompt_tokens  # the image's tokens are in the prompt


@needs_vllm
def test_a_killed_vllm_stage_resumes_without_duplicates(tmp_path):
    """`tools/curate.py candidates` on vLLM, killed (its whole process group, engine workers
    included) once some chunks are on disk, then run again: every item answered once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from carevl.curation.records import Records
    from carevl.standins.tiny import build_tiny_model
    from tests.helpers import ROOT, ingest_world

    items = 40
    workdir = tmp_path / "cur"
    ingest_world(workdir, items, seed=3)
    model = build_tiny_model(tmp_path / "tiny-vl", family="qwen2_vl", hidden=128, layers=2)
    vllm_chat = {"model": str(model), "max_model_len": 512, "gpu_memory_utilization": 0.1, "dtype": "float32"}
    config = tmp_path / "curation.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "candidates": {
                    "workdir": str(workdir),
                    "chunk_size": 2,
                    "models": {"tiny-vl": {"class_path": "carevl.backends.vllm.VLLMChat", "init_args": vllm_chat}},
                    "decodings": {"t1": {"temperature": 1.0, "seed": 5, "max_tokens": 6}},
                }
            }
        )
    )
    command = [sys.executable, str(ROOT / "tools" / "curate.py"), "--config", str(config), "candidates"]
    records = workdir / "candidates.jsonl"
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while first.poll() is None and time.monotonic() < deadline:
        if records.exists() and records.read_bytes().count(b"\n") >= 6:
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    first.wait()
    written = records.read_bytes().count(b"\n")
    assert first.returncode == -signal.SIGKILL and 6 <= written < items, "killed part way"
    subprocess.run(command, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [line for line in records.read_text().splitlines() if line.strip()]
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == items
    assert len(Records(records).ok()) == items


@needs_vllm
def test_vllm_writes_the_critiques_and_verdicts_transformers_writes_greedily(tmp_path):
    """Critique sampling and evaluation may generate through vLLM instead of transformers: on a
    judge that has learnt to write critiques, greedy decoding gives the same text, verdict line
    included, for every prompt (`tools/bench/generation.py` times both)."""
    from carevl.backends.hf import HFChat
    from carevl.backends.interface import Chat, Sampling
    from carevl.backends.vllm import VLLMChat
    from carevl.prompts import judge_prompt, parse_verdict
    from carevl.standins.shapes import judge_items
    from tests.helpers import train_tiny_judge

    path = train_tiny_judge(tmp_path / "judge")
    items = judge_items(12, seed=3)
    chats = [Chat.user(judge_prompt(item.question, item.responses), item.image) for item in items]
    greedy = Sampling(temperature=0.0, max_tokens=120)
    expected = [reply.texts[0] for reply in HFChat(str(path)).generate(chats, greedy)]
    with VLLMChat(str(path), max_model_len=1024, gpu_memory_utilization=0.1, dtype="float32") as engine:
        written = [reply.texts[0] for reply in engine.generate(chats, greedy)]
    assert all(parse_verdict(text) in (1, 2) for text in expected)
    assert written == expected
