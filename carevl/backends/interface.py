"""The inference interfaces the curation stages call, whatever runs the model.

- `ChatModel.generate`: chat generation with images, `n` samples per conversation.
- `RewardModel.score`: one scalar per text-only conversation (a reward model's raw output).
- `BatchChatModel.run`: chat generation through an offline batch service (the OpenAI Batch API).

Implementations: OpenAI-compatible endpoints (`carevl.backends.openai_api`), Hugging Face
transformers (`carevl.backends.hf`), vLLM's offline engine (`carevl.backends.vllm`, imported
lazily); the shapes world's simulations (`carevl.standins.simulated`) stand in for them on CPU. A
backend never raises for one bad item: the item's `Reply` carries the reason, and the stage
records it as failed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


class EndpointRefused(RuntimeError):
    """The endpoint refused the credentials or the account (authentication, permission, quota): no
    request can succeed, so the stage stops at once instead of recording every item as failed."""


@dataclass
class Chat:
    """One conversation: messages in the OpenAI chat layout whose image parts are ``{"type": "image"}``
    placeholders, filled in order with `images` (encoded bytes: PNG, JPEG, WebP)."""

    messages: list[dict]
    images: list[bytes] = field(default_factory=list, repr=False)

    @classmethod
    def user(cls, text: str, image: bytes | None = None) -> Chat:
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        return cls([{"role": "user", "content": content}], [image] if image is not None else [])

    def text(self) -> str:
        """All text of the conversation (what a text-only model or a simulation reads)."""
        parts = []
        for message in self.messages:
            content = message["content"]
            parts += [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]
        return "\n".join(parts)


@dataclass
class Sampling:
    """Decoding settings; temperature 0 is greedy."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 512


@dataclass
class Reply:
    """The outcome of one conversation: `texts` (n completions) or, when it failed, `error` (a short
    reason such as ``rate_limited``, ``timeout``, ``http_500``, ``malformed_response``)."""

    texts: list[str] = field(default_factory=list)
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class Closable:
    """A model that may hold engine processes or memory: `close` gives them back (a no-op where it
    holds nothing that the garbage collector would not); ``with model:`` closes it on leaving. Close
    an engine before the interpreter exits: vLLM's own clean-up at exit races its monitor thread and
    can abort the process after its work is done."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChatModel(Closable, ABC):
    """Generates replies to chats with images. `name` identifies the model in records; records are
    keyed by the constructor's settings but those listed in `operational` (which do not change a
    reply: concurrency, timeouts, devices), see `carevl.curation.provenance`."""

    name: str = "chat-model"
    operational: tuple[str, ...] = ()

    @abstractmethod
    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        """One `Reply` per chat, in order. `schema` (a JSON schema) asks for structured output where
        the backend supports it; others ignore it and the caller parses free text."""

    def generate_each(self, chats: list[Chat], sampling: Sampling, schema: dict | None, on_reply) -> None:
        """Call `on_reply(index, reply)` for every chat; backends that stream (live endpoints) call it
        as each reply arrives, so a caller can write it to disk at once."""
        for index, reply in enumerate(self.generate(chats, sampling, schema)):
            on_reply(index, reply)


class BatchChatModel(Closable, ABC):
    """Generates replies through a batch service: requests are submitted together and answered
    within hours. `name` identifies the model in records."""

    name: str = "batch-chat-model"
    operational: tuple[str, ...] = ()

    @abstractmethod
    def run(
        self, chats: dict[str, Chat], sampling: Sampling, schema: dict | None, state_file: str | Path, on_replies
    ) -> None:
        """Get a reply for every chat (keyed by an id), calling `on_replies({id: Reply})` as each
        submission completes. Submissions in flight are kept in `state_file`, so a killed run
        resumes them instead of paying for them again."""


class RewardModel(Closable, ABC):
    """Scores text-only conversations (user turn + assistant answer) with one raw scalar each."""

    name: str = "reward-model"
    operational: tuple[str, ...] = ()

    @abstractmethod
    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        """One score per conversation, None where scoring failed."""


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
