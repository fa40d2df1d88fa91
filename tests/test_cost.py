"""Token and cost estimates: GPT-4o's image token rule and the arithmetic of the estimate."""

import pytest

from carevl.backends.interface import Chat, Sampling
from carevl.curation.cost import Prices, estimate, image_tokens
from carevl.standins.shapes import judge_items


@pytest.mark.parametrize(
    "size, detail, tokens",
    [
        ((1024, 1024), "high", 765),  # scaled to 768 x 768: 4 tiles
        ((2048, 4096), "high", 1105),  # 1024 x 2048, then 768 x 1536: 6 tiles
        ((4096, 8192), "auto", 1105),
        ((56, 56), "high", 255),  # small images are not enlarged: one tile
        ((4096, 4096), "low", 85),
    ],
)
def test_image_tokens(size, detail, tokens):
    assert image_tokens(*size, detail=detail) == tokens


def test_estimate_arithmetic():
    item = judge_items(1, seed=0)[0]
    chat = Chat.user("x" * 400, item.image)  # 100 text tokens + 4 per message + 255 for the image
    figures = estimate(
        [chat] * 10,
        Sampling(n=2, max_tokens=500),
        Prices(input_per_million=2.0, output_per_million=10.0),
        expected_output_tokens=300,
    )
    assert figures["input_tokens"] == 10 * (100 + 4 + 255)
    assert (figures["output_tokens"], figures["output_tokens_max"]) == (10 * 2 * 300, 10 * 2 * 500)
    assert figures["usd"] == pytest.approx((3590 * 2.0 + 6000 * 10.0) / 1e6)
    batch = estimate(
        [chat] * 10,
        Sampling(n=2, max_tokens=500),
        Prices(input_per_million=2.0, output_per_million=10.0),
        batch=True,
        expected_output_tokens=300,
    )
    assert batch["usd"] == pytest.approx(figures["usd"] / 2)
