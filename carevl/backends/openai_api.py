"""Any OpenAI-compatible chat endpoint (GPT-4o, or a `vllm serve` process) through the official
`openai` client: a live mode (async, bounded concurrency) and a Batch API mode.

Retries are ours, not the client's (it is built with ``max_retries=0``), so every failure has a
counted reason: 429 waits what Retry-After (or retry-after-ms) says, 408/409/5xx, timeouts and
connection errors back off exponentially, and a 200 whose body or structured output does not
parse is retried as ``malformed_response``. Other 4xx fail their item at once. An item that
exhausts its attempts comes back as a failed `Reply` with the last reason. Only a refusal of the
credentials or the account (401, 403, an exhausted quota) raises `EndpointRefused`, stopping the
stage: no other request could succeed.

The API key is read from the environment variable named by `api_key_env` when a request is made;
it is never an argument, so it never reaches a config, a record or a log.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from carevl.backends.interface import BatchChatModel, Chat, ChatModel, EndpointRefused, Reply, Sampling
from carevl.images import data_url

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 429}
# No request can succeed: wrong key, no access, no money left. The stage stops at once.
REFUSED_STATUS = {401, 403}
REFUSED_CODES = {"insufficient_quota", "invalid_api_key", "account_deactivated"}
BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_MAX_REQUESTS = 50_000  # the Batch API's limit per input file
BATCH_MAX_BYTES = 190_000_000  # under the 200 MB input file limit
BATCH_TERMINAL = {"completed", "expired", "failed", "cancelled"}
TRANSPORTS = ("httpx", "aiohttp")


def api_key(env: str, base_url: str | None) -> str:
    key = os.environ.get(env)
    if key:
        return key
    if base_url:  # a local `vllm serve` endpoint usually needs no key
        return "EMPTY"
    raise RuntimeError(f"set the API key in the environment variable {env} (it is never read from a config)")


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, or retry-after as seconds or an HTTP date."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    try:
        if milliseconds is not None:
            return max(0.0, float(milliseconds) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        date = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, date.timestamp() - time.time()) if date is not None else None


def message_payload(chat: Chat, detail: str = "auto") -> list[dict]:
    """The chat's messages with image placeholders replaced by base64 data URLs."""
    images = iter(chat.images)
    messages = []
    for message in chat.messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "image_url", "image_url": {"url": data_url(next(images)), "detail": detail}}
                if part.get("type") == "image"
                else part
                for part in content
            ]
        messages.append({**message, "content": content})
    return messages


# Snapshots without JSON-schema structured output (OpenAI's structured-outputs guide lists
# gpt-4o-2024-08-06 and later): a schema is refused before any request is sent.
NO_STRUCTURED_OUTPUT = ("gpt-4o-2024-05-13", "gpt-4-turbo", "gpt-4-vision-preview")


def request_body(model: str, chat: Chat, sampling: Sampling, schema: dict | None, detail: str = "auto") -> dict:
    if schema is not None and model.startswith(NO_STRUCTURED_OUTPUT):
        raise ValueError(f"{model} has no structured output: set the judge stage's structured: false")
    body = {
        "model": model,
        "messages": message_payload(chat, detail),
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "max_tokens": sampling.max_tokens,
    }
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        }
    return body


def checked_texts(completion: dict, schema: dict | None) -> list[str]:
    """The choices' texts of a chat completion (as a dict); raises ValueError when the completion, or
    its structured output, is malformed."""
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError("no choices")
    texts = [(choice.get("message") or {}).get("content") for choice in choices]
    if not all(isinstance(text, str) for text in texts):
        raise ValueError("a choice has no text content")
    if schema is not None:
        for text in texts:
            record = json.loads(text)
            missing = [key for key in schema.get("required", []) if not isinstance(record, dict) or key not in record]
            if missing:
                raise ValueError(f"structured output lacks {missing}")
    return texts


class OpenAIChat(ChatModel):
    """Live requests with at most `concurrency` in flight.

    Args:
        model: the endpoint's model name (e.g. gpt-4o-2024-08-06).
        base_url: None for api.openai.com, else e.g. http://host:8000/v1 for `vllm serve`.
        api_key_env: the environment variable holding the key.
        concurrency: requests in flight at once.
        max_attempts: tries per request before it is recorded as failed.
        timeout: seconds per request.
        max_backoff: the longest wait between tries, Retry-After included.
        image_detail: "low", "high" or "auto" (GPT-4o's image token budget).
        processes: event loops, each in a process of its own, that share the requests in flight
            (1: this process's). One loop spends ~1-1.5 ms of CPU per request in the SDK, so one
            core sends at most ~700-1000 requests/s, and fewer when replies arrive in bursts; more
            processes spread that over more cores (docs/performance.md).
        pool_size: requests in flight per HTTP client; concurrency / pool_size clients share them.
            The SDK's connection pool scans all of its connections for every request it sends, so
            one client holding hundreds of them spends more CPU on that scan than on the request
            (docs/performance.md).
        transport: the SDK's HTTP transport: "httpx" (its default) or "aiohttp" (its `aiohttp`
            extra: less CPU per request, see docs/performance.md).
    """

    operational = (
        "api_key_env",
        "concurrency",
        "max_attempts",
        "timeout",
        "max_backoff",
        "processes",
        "pool_size",
        "transport",
    )

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 32,
        max_attempts: int = 6,
        timeout: float = 120.0,
        max_backoff: float = 60.0,
        image_detail: str = "auto",
        name: str | None = None,
        processes: int = 1,
        pool_size: int = 16,
        transport: str = "httpx",
    ):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.concurrency, self.max_attempts, self.timeout, self.max_backoff = (
            concurrency,
            max_attempts,
            timeout,
            max_backoff,
        )
        self.image_detail, self.processes, self.pool_size = image_detail, processes, pool_size
        self.name = name or model
        self.retries: Counter = Counter()  # retry reasons over this object's life

    def generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None = None) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(chats)
        self.generate_each(chats, sampling, schema, replies.__setitem__)
        return replies

    def generate_each(self, chats: list[Chat], sampling: Sampling, schema: dict | None, on_reply) -> None:
        if self.processes <= 1 or len(chats) < 2:
            asyncio.run(self._generate(chats, sampling, schema, on_reply))
        else:
            self._generate_in_processes(chats, sampling, schema, on_reply)

    def _generate_in_processes(self, chats: list[Chat], sampling: Sampling, schema: dict | None, on_reply) -> None:
        """`processes` event loops in processes of their own, each with its share of the requests
        in flight; every reply comes back to `on_reply` in this process as it arrives."""
        import multiprocessing
        import queue

        context = multiprocessing.get_context("spawn")  # a forked copy would share the parent's threads' locks
        count = min(self.processes, len(chats))
        worker = copy.copy(self)
        worker.processes, worker.concurrency = 1, -(-self.concurrency // count)
        worker.retries = Counter()
        replies = context.Queue()
        shares = [[(i, chats[i]) for i in range(k, len(chats), count)] for k in range(count)]
        processes = [
            context.Process(target=_serve_share, args=(worker, share, sampling, schema, replies), daemon=True)
            for share in shares
        ]
        for process in processes:
            process.start()
        finished = 0
        try:
            while finished < count:
                try:
                    message = replies.get(timeout=5.0)
                except queue.Empty:
                    dead = [p.exitcode for p in processes if not p.is_alive() and p.exitcode != 0]
                    if dead:
                        raise RuntimeError(
                            f"a request process died (exit code {dead[0]}) before its share was done"
                        ) from None
                    continue
                kind, value = message
                if kind == "reply":
                    on_reply(*value)
                elif kind == "done":
                    self.retries.update(value)
                    finished += 1
                elif kind == "refused":
                    raise EndpointRefused(value)
                else:
                    raise RuntimeError(f"a request process failed: {value}")
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join()

    async def _generate(self, chats: list[Chat], sampling: Sampling, schema: dict | None, on_reply) -> list[Reply]:
        import httpx2
        import openai

        key = api_key(self.api_key_env, self.base_url)
        tls = httpx2.create_ssl_context()  # loading the CA bundle takes ~20 ms: once, not per client
        http_client = openai.DefaultAioHttpClient if self.transport == "aiohttp" else openai.DefaultAsyncHttpxClient
        clients = [
            openai.AsyncOpenAI(
                api_key=key,
                base_url=self.base_url,
                max_retries=0,
                timeout=self.timeout,
                http_client=http_client(verify=tls),
            )
            for _ in range(-(-self.concurrency // self.pool_size))
        ]
        gate = asyncio.Semaphore(self.concurrency)

        async def one(index: int, chat: Chat) -> Reply:
            async with gate:
                reply = await self._request(
                    clients[index % len(clients)],
                    request_body(self.model, chat, sampling, schema, self.image_detail),
                    schema,
                )
            if on_reply is not None:
                on_reply(index, reply)  # on the loop's thread, as the reply arrives
            return reply

        try:
            return await asyncio.gather(*(one(i, chat) for i, chat in enumerate(chats)))
        finally:
            for client in clients:
                await client.close()

    async def _request(self, client, body: dict, schema: dict | None) -> Reply:
        import openai

        reason = "not_attempted"
        for attempt in range(self.max_attempts):
            wait = None
            try:
                # The client's documented raw route: its typed `chat.completions.create` spends ~7 ms
                # of CPU per request transforming parameters, which caps a 2-core machine near 100
                # requests/s; the body here is already in wire format.
                completion = await client.post("/chat/completions", cast_to=dict, body=body)
                texts = checked_texts(completion, schema)
                usage = completion.get("usage") or {}
                return Reply(
                    texts,
                    prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0),
                )
            except openai.APITimeoutError:
                reason = "timeout"
            except openai.APIConnectionError:
                reason = "connection_error"
            except openai.APIStatusError as error:
                reason = "rate_limited" if error.status_code == 429 else f"http_{error.status_code}"
                if error.status_code in REFUSED_STATUS or error.code in REFUSED_CODES:
                    raise EndpointRefused(f"{reason} ({error.code or 'refused'}): {str(error.message)[:200]}") from None
                if error.status_code < 500 and error.status_code not in RETRYABLE_STATUS:
                    return Reply(error=f"{reason}: {str(error.message)[:200]}")
                wait = retry_after(error.response.headers)
            except (ValueError, TypeError, KeyError, openai.APIResponseValidationError):
                reason = "malformed_response"
            self.retries[reason] += 1
            if attempt + 1 < self.max_attempts:
                backoff = min(self.max_backoff, 0.5 * 2**attempt) * (0.5 + random.random() / 2)
                await asyncio.sleep(min(self.max_backoff, wait if wait is not None else backoff))
        return Reply(error=f"{reason}: gave up after {self.max_attempts} attempts")


def _serve_share(
    model: OpenAIChat, share: list[tuple[int, Chat]], sampling: Sampling, schema: dict | None, out
) -> None:
    """A request process of `OpenAIChat` (processes > 1): its share of the chats, each reply sent
    back with its index as it arrives, then the retry counts."""
    try:
        asyncio.run(
            model._generate(
                [chat for _, chat in share], sampling, schema, lambda j, reply: out.put(("reply", (share[j][0], reply)))
            )
        )
        out.put(("done", model.retries))
    except EndpointRefused as error:
        out.put(("refused", str(error)))
    except Exception as error:  # reported to the parent, which raises it
        out.put(("error", f"{type(error).__name__}: {error}"))


class OpenAIBatch(BatchChatModel):
    """The Batch API: requests go up as JSONL files (at most 50,000 requests and ~190 MB each), are
    polled until done, and come back joined by custom_id. Requests of an expired or cancelled batch
    that got no answer are resubmitted, up to `max_resubmits` times.

    The ids of submitted batches are appended to a state file, so a killed run resumes polling the
    batches it already paid for instead of submitting them again.
    """

    operational = ("api_key_env", "poll_seconds", "max_requests", "max_bytes", "max_resubmits")

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        poll_seconds: float = 60.0,
        max_requests: int = BATCH_MAX_REQUESTS,
        max_bytes: int = BATCH_MAX_BYTES,
        max_resubmits: int = 2,
        image_detail: str = "auto",
        name: str | None = None,
        processes: int = 1,
        pool_size: int = 16,
    ):
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.poll_seconds, self.max_requests, self.max_bytes, self.max_resubmits = (
            poll_seconds,
            max_requests,
            max_bytes,
            max_resubmits,
        )
        self.image_detail, self.processes, self.pool_size = image_detail, processes, pool_size
        self.name = name or model

    def client(self):
        import openai

        return openai.OpenAI(api_key=api_key(self.api_key_env, self.base_url), base_url=self.base_url)

    def run(
        self,
        chats: dict[str, Chat],
        sampling: Sampling,
        schema: dict | None,
        state_file: str | Path,
        on_replies: Callable[[dict[str, Reply]], None],
    ) -> None:
        """Get a reply for every chat (keyed by custom_id), handing each finished batch's replies to
        `on_replies` as it completes. A refusal of the key or the account raises `EndpointRefused`."""
        import openai

        try:
            self._run(chats, sampling, schema, state_file, on_replies)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise EndpointRefused(
                f"http_{error.status_code} ({error.code or 'refused'}): {str(error.message)[:200]}"
            ) from None
        except openai.RateLimitError as error:
            if error.code not in REFUSED_CODES:
                raise
            raise EndpointRefused(f"rate_limited ({error.code}): {str(error.message)[:200]}") from None

    def _run(self, chats, sampling, schema, state_file, on_replies) -> None:
        client = self.client()
        state = BatchState(state_file)
        bodies = {
            key: request_body(self.model, chat, sampling, schema, self.image_detail) for key, chat in chats.items()
        }
        waiting = set(state.in_flight_ids())
        self._submit(client, state, {k: v for k, v in bodies.items() if k not in waiting}, round_=0)
        while state.open_batches():
            for batch_id, entry in list(state.open_batches().items()):
                batch = client.batches.retrieve(batch_id)
                if batch.status not in BATCH_TERMINAL:
                    continue
                replies, unanswered = self._collect(client, batch, entry["custom_ids"], schema)
                resubmit = {k: bodies[k] for k in unanswered if k in bodies and entry["round"] < self.max_resubmits}
                for key in unanswered:
                    if key not in resubmit:
                        replies[key] = Reply(
                            error=f"batch_{batch.status}: no answer after {entry['round'] + 1} submissions"
                        )
                on_replies(replies)
                state.close(batch_id)
                log.info("batch %s %s: %d replies, %d resubmitted", batch_id, batch.status, len(replies), len(resubmit))
                self._submit(client, state, resubmit, round_=entry["round"] + 1)
            if state.open_batches():
                time.sleep(self.poll_seconds)

    def _submit(self, client, state: BatchState, bodies: dict[str, dict], round_: int) -> None:
        lines = [
            json.dumps({"custom_id": key, "method": "POST", "url": BATCH_ENDPOINT, "body": body}) + "\n"
            for key, body in bodies.items()
        ]
        for start, stop in batch_bounds([len(line.encode()) for line in lines], self.max_requests, self.max_bytes):
            ids = list(bodies)[start:stop]
            upload = client.files.create(file=("requests.jsonl", "".join(lines[start:stop]).encode()), purpose="batch")
            batch = client.batches.create(input_file_id=upload.id, endpoint=BATCH_ENDPOINT, completion_window="24h")
            state.open(batch.id, ids, round_)
            log.info("submitted batch %s with %d requests (round %d)", batch.id, len(ids), round_)

    def _collect(self, client, batch, custom_ids: list[str], schema: dict | None) -> tuple[dict[str, Reply], list[str]]:
        """Replies from the output and error files; the ids with no answer, to resubmit."""
        replies: dict[str, Reply] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in client.files.content(file_id).text.splitlines():
                if line.strip():
                    key, reply = batch_line_reply(line, schema)
                    if key is not None and (key not in replies or reply.ok):
                        replies[key] = reply
        expired = batch.status in ("expired", "cancelled")
        unanswered = [
            k
            for k in custom_ids
            if k not in replies or (expired and (replies[k].error or "").startswith("batch_expired"))
        ]
        return {k: v for k, v in replies.items() if k not in unanswered}, unanswered


def batch_bounds(sizes: list[int], max_requests: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive requests with at most max_requests and max_bytes each."""
    bounds, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= max_requests or total + size > max_bytes):
            bounds.append((start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


def batch_line_reply(line: str, schema: dict | None) -> tuple[str | None, Reply]:
    """(custom_id, Reply) of one line of a batch output or error file."""
    try:
        record = json.loads(line)
        key = record.get("custom_id")
    except ValueError:
        return None, Reply(error="malformed_response")
    error = record.get("error")
    response = record.get("response") or {}
    if error:
        return key, Reply(error=f"{error.get('code') or 'error'}: {str(error.get('message', ''))[:200]}")
    if response.get("status_code") != 200:
        return key, Reply(error=f"http_{response.get('status_code')}")
    body = response.get("body") or {}
    try:
        texts = checked_texts(body, schema)
    except (ValueError, TypeError, AttributeError):
        return key, Reply(error="malformed_response")
    usage = body.get("usage") or {}
    return key, Reply(
        texts, prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0)
    )


class BatchState:
    """Submitted batches, appended as JSON lines: {"open": id, "custom_ids": [...], "round": k} and
    {"closed": id} once its replies are recorded."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._open: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if "open" in entry:
                    self._open[entry["open"]] = entry
                elif "closed" in entry:
                    self._open.pop(entry["closed"], None)

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def open(self, batch_id: str, custom_ids: list[str], round_: int) -> None:
        entry = {"open": batch_id, "custom_ids": custom_ids, "round": round_}
        self._append(entry)
        self._open[batch_id] = entry

    def close(self, batch_id: str) -> None:
        self._append({"closed": batch_id})
        self._open.pop(batch_id, None)

    def open_batches(self) -> dict[str, dict]:
        return self._open

    def in_flight_ids(self) -> list[str]:
        return [key for entry in self._open.values() for key in entry["custom_ids"]]
