"""vLLM's offline engine (GPU). vLLM pins its own torch and transformers, so it lives in its own
environment (``pip install vllm`` there, then ``pip install -e . --no-deps``); this module imports
it only when a backend is built.

Written against the vLLM 0.11-0.13 offline API: ``LLM.chat`` with OpenAI-style image parts for
generation, and ``LLM(runner="pooling", convert="classify")`` + ``LLM.classify`` for
sequence-classification reward models. Version differences handled here: structured output is
``SamplingParams(structured_outputs=StructuredOutputsParams(json=...))`` from 0.11 and
``guided_decoding=GuidedDecodingParams(json=...)`` before; the pooler's activation switch is
``PoolerConfig(use_activation=False)`` in newer releases and ``activation=False`` in older ones.
Before 0.10 the runner was chosen with ``task="reward"``/``"classify"``; those releases are not
supported. Not exercised on this project's CPU machines; `tests/test_vllm_backend.py` runs where
vLLM and a GPU are present.
"""

from __future__ import annotations

from carevl.backends.interface import Chat, ChatModel, Reply, RewardModel, Sampling
from carevl.backends.openai_api import message_payload


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


class VLLMChat(ChatModel):
    """Args:
    model: checkpoint path or hub id.
    tensor_parallel_size: GPUs per model.
    max_model_len: context length to allocate for.
    max_images: images per prompt (``limit_mm_per_prompt``).
    gpu_memory_utilization: fraction of GPU memory vLLM may take.
    """

    operational = ("tensor_parallel_size", "max_model_len", "max_images", "gpu_memory_utilization")

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        max_model_len: int = 8192,
        max_images: int = 1,
        gpu_memory_utilization: float = 0.9,
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        from vllm import LLM

        self.name = name or model
        self.llm = LLM(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images},
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
        )

    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        outputs = self.llm.chat(
            [message_payload(chat) for chat in chats], _sampling_params(sampling, schema), use_tqdm=False
        )
        return [
            Reply(
                [o.text for o in out.outputs],
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=sum(len(o.token_ids) for o in out.outputs),
            )
            for out in outputs
        ]


class VLLMReward(RewardModel):
    """A sequence-classification reward model through the pooling runner, activation off, so the
    score is the raw logit (Skywork-Reward's scale), not a sigmoid. Prompts go in as token ids
    rendered by the chat template, so no second BOS token is added."""

    operational = ("tensor_parallel_size", "max_model_len", "gpu_memory_utilization")

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        max_model_len: int = 8192,
        gpu_memory_utilization: float = 0.9,
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.config import PoolerConfig

        try:
            pooler = PoolerConfig(use_activation=False)
        except TypeError:
            pooler = PoolerConfig(activation=False)
        self.name = name or model
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.llm = LLM(
            model=model,
            runner="pooling",
            convert="classify",
            pooler_config=pooler,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
        )

    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        from vllm.inputs import TokensPrompt

        prompts = [
            TokensPrompt(prompt_token_ids=list(self.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)))
            for c in conversations
        ]
        return [float(out.outputs.probs[0]) for out in self.llm.classify(prompts, use_tqdm=False)]
