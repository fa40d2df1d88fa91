"""Hugging Face transformers backends for CPU and small runs.

`HFChat` generates with any image-text-to-text checkpoint (the tiny ones of `carevl.standins.tiny` included).
It runs one conversation at a time, seeding the generator from the seed and the conversation, so a
reply depends only on its own input: a resumed stage reproduces an uninterrupted one.

`HFReward` scores with a sequence-classification reward model (one logit, returned raw). The chat
template is applied to token ids directly, so a template that starts with the BOS token is not given
a second one by the tokenizer. Reward models with custom heads (INF-ORM, QRM) need
``trust_remote_code: true``, which is off unless a config turns it on.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from carevl.backends.interface import Chat, ChatModel, Reply, RewardModel, Sampling, chunks
from carevl.images import load_image

log = logging.getLogger(__name__)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def chat_seed(seed: int, chat: Chat) -> int:
    digest = hashlib.sha256(repr((seed, chat.messages)).encode())
    for image in chat.images:
        digest.update(image)
    return int.from_bytes(digest.digest()[:8], "little")


class HFChat(ChatModel):
    """Args:
    model: a local checkpoint directory or hub id (AutoModelForImageTextToText + AutoProcessor).
    device: "cpu", "cuda", ...
    dtype: float32, bfloat16 or float16.
    max_length: prompts longer than this (image tokens included) fail as ``too_long``.
    trust_remote_code: run code shipped with the checkpoint.
    name: the name in records (default: the model path).
    """

    operational = ("device", "max_length")

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int = 4096,
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from carevl.encoding import Encoder

        self.name = name or model
        self.device = device
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(model, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
            .to(device)
            .eval()
        )
        self.encoder = Encoder(self.processor, max_length=max_length)

    @torch.no_grad()
    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        from carevl.encoding import TooLong

        replies = []
        for chat in chats:
            try:
                images = [load_image(data) for data in chat.images]
                _, inputs = self.encoder.encode_prompt(images[0] if images else None, chat.messages)
            except ValueError as error:
                replies.append(Reply(error="too_long" if isinstance(error, TooLong) else f"bad_input: {error}"))
                continue
            torch.manual_seed(chat_seed(sampling.seed, chat))
            sample = sampling.temperature > 0
            tokenizer = self.encoder.tokenizer
            out = self.model.generate(
                **{k: v.to(self.device) for k, v in inputs.items()},
                max_new_tokens=sampling.max_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=0 if sample else None,
                num_return_sequences=sampling.n,
                pad_token_id=self.encoder.pad_token_id,
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            replies.append(
                Reply(
                    tokenizer.batch_decode(new, skip_special_tokens=True),
                    prompt_tokens=inputs["input_ids"].shape[1],
                    completion_tokens=int((new != self.encoder.pad_token_id).sum()),
                )
            )
        return replies


class HFReward(RewardModel):
    """Args:
    model: a sequence-classification checkpoint with one label (Skywork-Reward style).
    batch_size: conversations per forward.
    max_length: longer conversations get no score (None) and are counted by the stage.
    """

    operational = ("device", "batch_size", "max_length")

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = name or model
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                model, dtype=_dtype(dtype), trust_remote_code=trust_remote_code
            )
            .to(device)
            .eval()
        )
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model} has {self.model.config.num_labels} labels; a reward model has one")

    def token_ids(self, conversation: list[dict]) -> list[int]:
        """The chat template rendered straight to ids: no special tokens are added on top."""
        ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    @torch.no_grad()
    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        scores: list[float | None] = []
        pad = (
            self.model.config.pad_token_id
            if self.model.config.pad_token_id is not None
            else self.tokenizer.pad_token_id
        )
        for batch in chunks([self.token_ids(c) for c in conversations], self.batch_size):
            keep = [len(ids) <= self.max_length for ids in batch]
            rows = [ids for ids, k in zip(batch, keep) if k]
            values = iter([])
            if rows:
                length = max(len(r) for r in rows)
                input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=self.device)
                mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=self.device)
                values = iter(self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist())
            scores += [next(values) if k else None for k in keep]
        return scores
