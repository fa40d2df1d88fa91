"""A local OpenAI-compatible endpoint on 127.0.0.1: chat completions, files and batches.

It lets tests and benchmarks drive the real `openai` client over real HTTP with chosen latency and
injected faults, and lets a pipeline be dry-run without spending money. Replies come from a
`responder(body) -> text` function; the default answers a structured-output request with a JSON
object that fits its schema, and anything else with a fixed sentence.

Faults are consumed one per chat request, in order: "429" (with Retry-After), "500", "timeout"
(the reply comes after the client has given up), "malformed" (a 200 whose body is not JSON),
"bad_output" (a valid completion whose content breaks the requested schema), "400" (a request the
server refuses, not worth retrying), "quota" (a 429 whose code says the account's quota is spent),
or None. With `api_key`, every request that does not carry that key gets a 401, as a real
endpoint answers a wrong key.
"""

from __future__ import annotations

import email.parser
import itertools
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # Read when the socket starts listening, inside the constructor: a backlog of the default 5
    # refuses connections when hundreds of clients open at once, which a real endpoint does not.
    request_queue_size = 1024
    daemon_threads = True


def schema_example(schema: dict) -> object:
    """A value that satisfies a (simple) JSON schema: first enum value, else a typed placeholder."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {name: schema_example(sub) for name, sub in schema.get("properties", {}).items()}
    return {"string": "placeholder", "integer": 1, "number": 1.0, "boolean": True, "array": []}.get(kind)


def default_responder(body: dict) -> str:
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return json.dumps(schema_example(response_format["json_schema"]["schema"]))
    return "This is a reply from the loopback endpoint."


def completion(body: dict, texts: list[str]) -> dict:
    prompt_tokens = len(json.dumps(body.get("messages", []))) // 4
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "loopback"),
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
            for i, t in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(len(t) // 4 for t in texts),
            "total_tokens": 0,
        },
    }


class LoopbackEndpoint:
    """Serve in a background thread; use as a context manager. `base_url` is what clients need.

    Args:
        responder: body -> reply text (called once per requested sample).
        latency: seconds each chat request takes.
        faults: faults to inject, one per chat request in arrival order (see the module doc).
        retry_after: the Retry-After header value sent with injected 429s.
        timeout_delay: how long a "timeout" fault stalls.
        expire_batches: how many of the first batches expire with only their first half answered.
        api_key: the key requests must carry (None: any or none).
    """

    def __init__(
        self,
        responder: Callable[[dict], str] = default_responder,
        latency: float = 0.0,
        faults: list[str | None] | None = None,
        retry_after: str = "0.2",
        timeout_delay: float = 2.0,
        expire_batches: int = 0,
        api_key: str | None = None,
    ):
        self.responder, self.latency, self.faults = responder, latency, list(faults or [])
        self.retry_after, self.timeout_delay, self.expire_batches = retry_after, timeout_delay, expire_batches
        self.api_key = api_key
        self.requests: list[dict] = []  # path, time, authorization and body of every request
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _handler(self))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> LoopbackEndpoint:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._ids)}"

    def next_fault(self) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def chat(self, body: dict) -> dict:
        return completion(body, [self.responder(body) for _ in range(int(body.get("n") or 1))])

    def create_batch(self, body: dict) -> dict:
        batch_id = self.next_id("batch")
        lines = [json.loads(line) for line in self.files[body["input_file_id"]].decode().splitlines() if line.strip()]
        with self._lock:
            expire = self.expire_batches > 0
            self.expire_batches -= expire
        answered = lines[: len(lines) // 2] if expire else lines
        output = [
            {
                "id": f"req-{i}",
                "custom_id": r["custom_id"],
                "response": {"status_code": 200, "body": self.chat(r["body"])},
                "error": None,
            }
            for i, r in enumerate(answered)
        ]
        errors = [
            {
                "id": f"req-x{i}",
                "custom_id": r["custom_id"],
                "response": None,
                "error": {"code": "batch_expired", "message": "not completed in time"},
            }
            for i, r in enumerate(lines[len(answered) :])
        ]
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "created_at": int(time.time()),
            "status": "in_progress",
            "polls": 0,
        }
        batch["final"] = {
            "status": "expired" if expire else "completed",
            "output_file_id": self.store(output),
            "error_file_id": self.store(errors) if errors else None,
        }
        self.batches[batch_id] = batch
        return self.public(batch)

    def store(self, records: list[dict]) -> str:
        file_id = self.next_id("file")
        self.files[file_id] = "".join(json.dumps(r) + "\n" for r in records).encode()
        return file_id

    def retrieve_batch(self, batch_id: str) -> dict:
        batch = self.batches[batch_id]
        batch["polls"] += 1
        if batch["polls"] >= 2:  # in progress on the first poll, done on the second
            batch.update(batch["final"])
        return self.public(batch)

    @staticmethod
    def public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in ("final", "polls")}


def _handler(endpoint: LoopbackEndpoint):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout fault)

        def send_json(self, record: dict, status: int = 200, headers: dict | None = None) -> None:
            self.reply(status, json.dumps(record).encode(), headers)

        def read_body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def log_request_seen(self, body: bytes) -> None:
            endpoint.requests.append(
                {
                    "path": self.path,
                    "time": time.monotonic(),
                    "authorization": self.headers.get("Authorization"),
                    "body": body,
                }
            )

        def refused(self) -> bool:
            """Answer a request without the endpoint's key with a 401, as a real endpoint does."""
            if endpoint.api_key is None or self.headers.get("Authorization") == f"Bearer {endpoint.api_key}":
                return False
            error = {
                "message": "Incorrect API key provided",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
            self.send_json({"error": error}, 401)
            return True

        def do_POST(self) -> None:
            raw = self.read_body()
            self.log_request_seen(raw)
            if self.refused():
                return
            if self.path.endswith("/chat/completions"):
                self.chat(json.loads(raw))
            elif self.path.endswith("/files"):
                file_id = endpoint.next_id("file")
                endpoint.files[file_id] = multipart_file(self.headers["Content-Type"], raw)
                self.send_json(
                    {
                        "id": file_id,
                        "object": "file",
                        "bytes": len(endpoint.files[file_id]),
                        "created_at": int(time.time()),
                        "filename": "requests.jsonl",
                        "purpose": "batch",
                        "status": "processed",
                    }
                )
            elif self.path.endswith("/batches"):
                self.send_json(endpoint.create_batch(json.loads(raw)))
            else:
                self.send_json({"error": {"message": f"no route {self.path}"}}, status=404)

        def do_GET(self) -> None:
            self.log_request_seen(b"")
            if self.refused():
                return
            parts = self.path.rstrip("/").split("/")
            if "batches" in parts:
                self.send_json(endpoint.retrieve_batch(parts[-1]))
            elif parts[-1] == "content":
                self.reply(200, endpoint.files[parts[-2]])
            else:
                self.send_json({"error": {"message": f"no route {self.path}"}}, status=404)

        def chat(self, body: dict) -> None:
            fault = endpoint.next_fault()
            time.sleep(endpoint.latency)
            if fault == "quota":
                error = {
                    "message": "You exceeded your current quota",
                    "type": "insufficient_quota",
                    "code": "insufficient_quota",
                }
                self.send_json({"error": error}, 429)
            elif fault == "429":
                self.send_json(
                    {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                    429,
                    {"Retry-After": endpoint.retry_after},
                )
            elif fault == "400":
                self.send_json({"error": {"message": "bad request", "type": "invalid_request_error"}}, 400)
            elif fault == "500":
                self.send_json({"error": {"message": "server error", "type": "server_error"}}, 500)
            elif fault == "timeout":
                time.sleep(endpoint.timeout_delay)
                self.send_json(endpoint.chat(body))
            elif fault == "malformed":
                self.reply(200, b'{"id": "chatcmpl-loopback", "choices": [')
            elif fault == "bad_output":
                self.send_json(completion(body, ["not json at all"] * int(body.get("n") or 1)))
            else:
                self.send_json(endpoint.chat(body))

    return Handler


def multipart_file(content_type: str, raw: bytes) -> bytes:
    """The bytes of the "file" field of a multipart/form-data body."""
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    for part in message.get_payload():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True)
    raise ValueError("multipart body has no 'file' field")


def main() -> None:
    """Serve until interrupted (for benchmarks, and dry runs of a pipeline): prints the base URL."""
    import argparse

    parser = argparse.ArgumentParser(
        description="A local OpenAI-compatible endpoint (chat completions, files, batches)."
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    args = parser.parse_args()
    with LoopbackEndpoint(latency=args.latency) as endpoint:
        print(endpoint.base_url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
