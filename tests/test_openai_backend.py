"""The OpenAI-compatible backend against a real HTTP server on loopback that speaks the chat
completions, files and batches protocol and injects faults."""

import email.utils
import json
import time

import pytest

from carevl.backends.interface import Chat, EndpointRefused, Sampling
from carevl.backends.openai_api import OpenAIBatch, OpenAIChat, batch_bounds, retry_after
from carevl.prompts import JUDGMENT_SCHEMA
from carevl.standins.loopback import LoopbackEndpoint

KEY = "sk-test-3f9a1c-never-written"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def chats(n):
    return [Chat.user(f"question {i}") for i in range(n)]


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
def test_faults_end_completed_or_failed_with_their_reason(transport):
    # concurrency 1: requests arrive in order, so each item meets known faults; both transports map
    # their errors (timeouts, refused bodies) to the same reasons
    faults = ["429", "500", "timeout"]  # item 0: three failures -> failed, last reason timeout
    faults += [None]  # item 1: ok
    faults += ["malformed", "bad_output", "malformed"]  # item 2: failed, malformed
    faults += ["500", "429", None]  # item 3: ok on the third try
    faults += ["400"]  # item 4: not retried
    with LoopbackEndpoint(faults=faults, retry_after="0.05", timeout_delay=1.0) as endpoint:
        model = OpenAIChat(
            "gpt-4o",
            base_url=endpoint.base_url,
            concurrency=1,
            max_attempts=3,
            timeout=0.3,
            max_backoff=0.05,
            transport=transport,
        )
        replies = model.generate(chats(6), Sampling(n=2), JUDGMENT_SCHEMA)
    assert [r.error for r in replies] == [
        "timeout: gave up after 3 attempts",
        None,
        "malformed_response: gave up after 3 attempts",
        None,
        "http_400: Error code: 400 - bad request",
        None,
    ]
    assert all(len(r.texts) == 2 and json.loads(r.texts[0])["verdict"] == 1 for r in replies if r.ok)
    assert model.retries == {"rate_limited": 2, "http_500": 2, "timeout": 1, "malformed_response": 3}
    assert len([r for r in endpoint.requests if r["path"].endswith("/chat/completions")]) == 12
    assert all(r["authorization"] == f"Bearer {KEY}" for r in endpoint.requests)


def test_an_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="transport must be one of"):
        OpenAIChat("gpt-4o", transport="requests")


def test_retry_after_is_honoured():
    with LoopbackEndpoint(faults=["429"], retry_after="0.6") as endpoint:
        model = OpenAIChat("gpt-4o", base_url=endpoint.base_url, concurrency=1, max_backoff=5.0)
        assert model.generate(chats(1), Sampling())[0].ok
    first, second = (r["time"] for r in endpoint.requests)
    assert 0.6 <= second - first < 1.5


def test_retry_after_forms():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after({"retry-after": date}) <= 31
    assert retry_after({}) is None


def test_requests_carry_images_as_data_urls_and_the_schema():
    with LoopbackEndpoint() as endpoint:
        OpenAIChat("gpt-4o", base_url=endpoint.base_url).generate(
            [Chat.user("what?", b"\x89PNG\r\n\x1a\nrest")], Sampling(temperature=1.0, seed=3), JUDGMENT_SCHEMA
        )
    body = json.loads(endpoint.requests[0]["body"])
    image, text = body["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,") and text == {"type": "text", "text": "what?"}
    assert body["response_format"]["json_schema"]["schema"] == JUDGMENT_SCHEMA
    assert (body["temperature"], body["seed"]) == (1.0, 3)


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIChat("gpt-4o").generate(chats(1), Sampling())


def test_batch_bounds_respect_both_limits():
    assert batch_bounds([10] * 7, max_requests=3, max_bytes=1000) == [(0, 3), (3, 6), (6, 7)]
    assert batch_bounds([40, 40, 40, 10], max_requests=100, max_bytes=85) == [(0, 2), (2, 4)]
    assert batch_bounds([], 3, 10) == []


def test_batch_expired_requests_are_resubmitted(tmp_path):
    got = {}
    with LoopbackEndpoint(expire_batches=1) as endpoint:
        batch = OpenAIBatch("gpt-4o", base_url=endpoint.base_url, poll_seconds=0.01, max_requests=4)
        batch.run(
            {f"k{i}": c for i, c in enumerate(chats(6))},
            Sampling(),
            JUDGMENT_SCHEMA,
            tmp_path / "state.jsonl",
            got.update,
        )
    assert sorted(got) == [f"k{i}" for i in range(6)] and all(r.ok for r in got.values())
    opened = [json.loads(line) for line in (tmp_path / "state.jsonl").read_text().splitlines() if "open" in line]
    # 6 requests at most 4 per file: two batches; the first expired with half answered -> 2 resubmitted
    assert [(len(e["custom_ids"]), e["round"]) for e in opened] == [(4, 0), (2, 0), (2, 1)]


def test_batch_gives_up_after_max_resubmits(tmp_path):
    got = {}
    with LoopbackEndpoint(expire_batches=5) as endpoint:
        batch = OpenAIBatch("gpt-4o", base_url=endpoint.base_url, poll_seconds=0.01, max_resubmits=1)
        batch.run({f"k{i}": c for i, c in enumerate(chats(4))}, Sampling(), None, tmp_path / "state.jsonl", got.update)
    assert sum(r.ok for r in got.values()) == 3  # 2 in round 0, 1 of the 2 resubmitted
    assert [r.error for r in got.values() if not r.ok] == ["batch_expired: no answer after 2 submissions"]


def test_killed_batch_run_resumes_polling_without_resubmitting(tmp_path):
    state = tmp_path / "state.jsonl"

    def crash(replies):
        raise KeyboardInterrupt  # killed after submitting, before anything was recorded

    with LoopbackEndpoint() as endpoint:
        batch = OpenAIBatch("gpt-4o", base_url=endpoint.base_url, poll_seconds=0.01)
        with pytest.raises(KeyboardInterrupt):
            batch.run({f"k{i}": c for i, c in enumerate(chats(3))}, Sampling(), None, state, crash)
        uploads = sum(r["path"].endswith("/files") for r in endpoint.requests)
        got = {}
        batch.run({f"k{i}": c for i, c in enumerate(chats(3))}, Sampling(), None, state, got.update)
        assert sum(r["path"].endswith("/files") for r in endpoint.requests) == uploads == 1
    assert sorted(got) == ["k0", "k1", "k2"] and all(r.ok for r in got.values())


def test_replies_stream_to_the_caller_as_they_arrive():
    seen = []
    with LoopbackEndpoint(latency=0.1) as endpoint:
        model = OpenAIChat("gpt-4o", base_url=endpoint.base_url, concurrency=1)
        model.generate_each(
            chats(4), Sampling(), None, lambda index, reply: seen.append((index, reply.ok, time.monotonic()))
        )
    assert sorted((i, ok) for i, ok, _ in seen) == [(0, True), (1, True), (2, True), (3, True)]
    last_request = max(r["time"] for r in endpoint.requests)
    assert min(t for _, _, t in seen) < last_request  # the first reply was handed over before the last request went out


def echo(body: dict) -> str:
    return json.dumps(body["messages"])


def test_request_processes_answer_every_chat_and_count_their_retries():
    """Requests spread over two event-loop processes and several small connection pools: each
    reply comes back to its own chat, and the retries the processes made are counted here."""
    faults = ["500", "429"]  # the first two requests to arrive, from whichever process
    with LoopbackEndpoint(responder=echo, faults=faults, retry_after="0.05") as endpoint:
        model = OpenAIChat(
            "gpt-4o", base_url=endpoint.base_url, concurrency=4, processes=2, pool_size=1, max_backoff=0.05
        )
        replies = model.generate(chats(12), Sampling())
    assert all(r.ok for r in replies)
    assert all(f"question {i}" in r.texts[0] for i, r in enumerate(replies))
    assert model.retries == {"http_500": 1, "rate_limited": 1}
    assert len(endpoint.requests) == 14


def test_a_refusal_in_a_request_process_stops_the_caller():
    with LoopbackEndpoint(api_key="sk-the-right-one") as endpoint:
        model = OpenAIChat("gpt-4o", base_url=endpoint.base_url, concurrency=4, processes=2)
        with pytest.raises(EndpointRefused, match="http_401"):
            model.generate(chats(6), Sampling())
