"""Hugging Face transformers backends for CPU and small runs.

`HFChat` generates with any image-text-to-text checkpoint (the tiny ones of `carevl.standins.tiny` included).
It runs one conversation at a time, seeding the generator from the seed and the conversation, so a
reply depends only on its own input: a resumed stage reproduces an uninterrupted one.

`HFReward` scores with a reward model of one of the expert families of
`carevl.backends.reward_heads` (Skywork-Reward's sequence classification, INF-ORM's MLP head, QRM's
gated quantiles), returning the raw reward the family defines. The chat template is applied to token
ids directly, so a template that starts with the BOS token is not given a second one by the
tokenizer. Custom heads load from the checkpoint's weights with carevl's own classes, no remote code.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from carevl.backends.interface import Chat, ChatModel, Reply, RewardModel, Sampling, chunks
from carevl.backends.reward_heads import gating_position, last_token
from carevl.images import load_image

log = logging.getLogger(__name__)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def chat_seed(seed: int, chat: Chat) -> int:
    digest = hashlib.sha256(repr((seed, chat.messages)).encode())
    for image in chat.images:
        digest.update(image)
    return int.from_bytes(digest.digest()[:8], "little")


class _Weights:
    """What the transformers backends share: `close` drops the weights at once, whoever still holds
    the backend."""

    def close(self) -> None:
        self.model = None


class HFChat(_Weights, ChatModel):
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
                repetition_penalty=1.0,  # not the checkpoint's (Qwen2-VL's generation config holds 1.05)
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


class HFReward(_Weights, RewardModel):
    """Args:
    model: a reward model checkpoint (local directory or hub id) with one output.
    family: its head layout, `carevl.backends.reward_heads.FAMILIES`: sequence_classification
        (Skywork-Reward), inf_orm (INF-ORM-Llama3.1-70B) or qrm (QRM-Llama3.1-8B). Loading fails
        when the checkpoint's weights do not match the family's.
    device: "cpu", "cuda", ... or "auto" to shard a model too large for one GPU across all of them.
    batch_size: conversations per forward.
    max_length: longer conversations get no score (None) and are counted by the stage.
    """

    operational = ("device", "batch_size", "max_length")

    def __init__(
        self,
        model: str,
        family: str = "sequence_classification",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer

        from carevl.backends.reward_heads import QRM_GATING_TEXT, load_reward_model

        self.name, self.family = name or model, family
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        placement = {"device_map": "auto"} if device == "auto" else {}
        # Gemma 2 soft-caps its attention logits; only the eager kernel applies the cap (model cards).
        attention = {"attn_implementation": "eager"} if config.model_type == "gemma2" else {}
        self.model = load_reward_model(
            model, family, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **placement, **attention
        )
        if device != "auto":
            self.model.to(device)
        self.device = self.model.get_input_embeddings().weight.device
        if family == "sequence_classification" and self.model.config.num_labels != 1:
            raise ValueError(f"{model} has {self.model.config.num_labels} labels; a reward model has one")
        self.gating_pattern = (
            self.tokenizer.encode(QRM_GATING_TEXT, add_special_tokens=False) if family == "qrm" else None
        )
        # Rows are padded on the right and read at their last real token by the attention mask, so
        # the pad id never matters (a pad id that also ends turns cannot move the read position).
        self.pad = self.tokenizer.pad_token_id or 0

    def token_ids(self, conversation: list[dict]) -> list[int]:
        """The chat template rendered straight to ids: no special tokens are added on top."""
        ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def scorable(self, ids: list[int]) -> bool:
        if len(ids) > self.max_length:
            return False
        return self.gating_pattern is None or gating_position(ids, self.gating_pattern) is not None

    @torch.no_grad()
    def rewards(self, rows: list[list[int]]) -> list[float]:
        """The raw reward of each row of token ids, as the family's checkpoint defines it."""
        length = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [self.pad] * (length - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=self.device)
        if self.family == "sequence_classification":
            body = getattr(self.model, self.model.base_model_prefix)
            hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            values = self.model.score(last_token(hidden, mask))[:, 0]
        elif self.family == "qrm":
            positions = torch.tensor([gating_position(r, self.gating_pattern) for r in rows], device=self.device)
            values = self.model(input_ids, mask, positions)
        else:
            values = self.model(input_ids, mask)
        return values.float().tolist()

    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        scores: list[float | None] = []
        for batch in chunks([self.token_ids(c) for c in conversations], self.batch_size):
            keep = [self.scorable(ids) for ids in batch]
            rows = [ids for ids, k in zip(batch, keep) if k]
            values = iter(self.rewards(rows) if rows else [])
            scores += [next(values) if k else None for k in keep]
        return scores
