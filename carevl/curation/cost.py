"""Token and cost estimates printed before any paid run.

Text tokens are estimated at 4 characters each. Image tokens follow GPT-4o's published rule: 85 at
"low" detail; at "high" (and "auto") the image is scaled to fit 2048 x 2048, then its short side to
768, and costs 85 + 170 per 512-pixel tile. Prices are USD per million tokens, GPT-4o's list prices
when this was written (2024-08-06 snapshot); set them in the config for other models or dates.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from carevl.backends.interface import Chat, Sampling


@dataclass
class Prices:
    input_per_million: float = 2.50
    output_per_million: float = 10.00
    batch_discount: float = 0.5  # the Batch API charges half


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def estimate(
    chats: list[Chat],
    sampling: Sampling,
    prices: Prices,
    detail: str = "auto",
    batch: bool = False,
    expected_output_tokens: int = 300,
) -> dict:
    """Requests, input tokens, output tokens (expected and at most) and their cost in USD."""
    from PIL import Image

    input_tokens = 0
    for chat in chats:
        input_tokens += text_tokens(chat.text()) + 4 * len(chat.messages)
        for data in chat.images:
            with Image.open(io.BytesIO(data)) as image:
                input_tokens += image_tokens(*image.size, detail=detail)
    outputs = len(chats) * sampling.n
    expected, most = outputs * min(expected_output_tokens, sampling.max_tokens), outputs * sampling.max_tokens
    factor = prices.batch_discount if batch else 1.0

    def usd(out_tokens: int) -> float:
        return factor * (input_tokens * prices.input_per_million + out_tokens * prices.output_per_million) / 1e6

    return {
        "requests": len(chats),
        "input_tokens": input_tokens,
        "output_tokens": expected,
        "output_tokens_max": most,
        "usd": usd(expected),
        "usd_max": usd(most),
    }


def describe(figures: dict) -> str:
    return (
        f"{figures['requests']:,} requests, ~{figures['input_tokens']:,} input tokens, ~{figures['output_tokens']:,} "
        "output tokens "
        f"(at most {figures['output_tokens_max']:,}): about ${figures['usd']:,.2f} (at most ${figures['usd_max']:,.2f})"
    )


def check(
    label: str,
    chats: list[Chat],
    sampling: Sampling,
    prices: Prices,
    detail: str = "auto",
    batch: bool = False,
    max_usd: float | None = None,
) -> dict:
    """Print the estimate of a paid run before it starts; refuse it when above `max_usd`."""
    figures = estimate(chats, sampling, prices, detail, batch=batch)
    print(f"{label}: {describe(figures)}", flush=True)
    if max_usd is not None and figures["usd"] > max_usd:
        raise RuntimeError(f"expected cost ${figures['usd']:.2f} is above max_usd ${max_usd:.2f}")
    return figures
