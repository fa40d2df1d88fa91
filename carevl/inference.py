"""The two inference interfaces the curation stages and evaluation call, whatever runs the model.

- `ChatModel.generate`: chat generation with images, `n` samples per conversation.
- `RewardModel.score`: one scalar per text-only conversation (a reward model's raw output).

Implementations live in `carevl.backends`: OpenAI-compatible endpoints (`openai_api`), Hugging Face
transformers (`hf`), vLLM's offline engine (`vllm`, imported lazily) and the shapes world's
simulations (`simulated`). A backend never raises for one bad item: the item's `Reply` carries the
reason, and the stage records it as failed.
"""

from __future__ import annotations

import base64
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


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


class ChatModel(ABC):
    """Generates replies to chats with images. `name` identifies the model in records."""

    name: str = "chat-model"

    @abstractmethod
    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        """One `Reply` per chat, in order. `schema` (a JSON schema) asks for structured output where
        the backend supports it; others ignore it and the caller parses free text."""

    def generate_each(self, chats: list[Chat], sampling: Sampling, schema: dict | None, on_reply) -> None:
        """Call `on_reply(index, reply)` for every chat; backends that stream (live endpoints) call it
        as each reply arrives, so a caller can write it to disk at once."""
        for index, reply in enumerate(self.generate(chats, sampling, schema)):
            on_reply(index, reply)


class RewardModel(ABC):
    """Scores text-only conversations (user turn + assistant answer) with one raw scalar each."""

    name: str = "reward-model"

    @abstractmethod
    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        """One score per conversation, None where scoring failed."""


def image_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("image bytes are not PNG, JPEG or WebP")


def data_url(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"


def load_image(data: bytes):
    """A PIL RGB image from encoded bytes; raises ValueError for corrupt data."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"unreadable image ({error})") from error
    return image.convert("RGB")


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
