"""Append-only JSONL records and the content-addressed image store of a curation work directory.

Every record carries a `key`: the sha256 of the inputs that produced it (see `content_key`). A stage
skips units whose key already has a successful record, so rerunning after a kill redoes only what
was missing, and retries what failed. Every complete line is written in one call and fsync'd.
Reading never changes a file: a line cut short by a kill is left out (the next run that appends
removes it first) and a line that is not a record is left out with a warning naming the file and
line. One run at a time holds a work folder (`work_folder`), so only one process appends.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
LOCK = ".lock"  # held by the run that owns a work folder


def content_key(*parts) -> str:
    """sha256 of the canonical JSON of `parts` (dicts with sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_complete(path: str | Path) -> tuple[list[dict], int, int]:
    """The records of a JSONL file's complete lines, where they end, and the file's size; the file is
    left as it is (another process may still be appending to it). A line that is not a JSON object
    with a "key" is left out and logged with its file and line."""
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1
    found = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or "key" not in record:
            log.warning("%s:%d is not a record: left out", path, number)
            continue
        found.append(record)
    return found, end, len(data)


class FolderBusy(RuntimeError):
    """Another run holds the work folder."""


@contextmanager
def work_folder(workdir: str | Path):
    """Hold `workdir` for this run: a second run on the same folder (a double launch) stops at once,
    naming the first, instead of paying for every request again and interleaving records. The hold
    ends with the process, however it ends."""
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderBusy(f"{workdir} is in use by {holder}: wait for it to finish, or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.ctime()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def holds_work_folder(stage: Callable) -> Callable:
    """A stage function (whose first argument is `workdir`) run while holding its work folder."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        workdir = kwargs["workdir"] if "workdir" in kwargs else args[0]
        with work_folder(workdir):
            return stage(*args, **kwargs)

    return run


def replace_file(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, then an atomic rename."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class Records:
    """One stage's JSONL file. `latest()` holds the last record of each key, a success never being
    replaced by a later failure."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._latest: dict[str, dict] = {}
        self._appended = False
        if self.path.exists():
            self._load()

    def _trim_cut_line(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            end = size
            while end > 0:  # back to the last newline, a block at a time
                start = max(0, end - 65536)
                handle.seek(start)
                block = handle.read(end - start)
                newline = block.rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end < size:
                log.warning("%s: dropping a line cut short by an interrupted run (%d bytes)", self.path, size - end)
                handle.truncate(end)

    def _load(self) -> None:
        records, _, _ = read_complete(self.path)
        for record in records:
            self._remember(record)

    def _remember(self, record: dict) -> None:
        old = self._latest.get(record["key"])
        if old is None or "error" in old or "error" not in record:
            self._latest[record["key"]] = record

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._appended:  # the run that appends removes a line a killed run cut short
            self._trim_cut_line()
            self._appended = True
        with self.path.open("a") as handle:
            handle.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self._remember(record)

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file (for stages that are pure functions of earlier records)."""
        replace_file(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        self._latest = {}
        for record in records:
            self._remember(record)

    def done(self, key: str) -> bool:
        record = self._latest.get(key)
        return record is not None and "error" not in record

    def latest(self) -> list[dict]:
        return list(self._latest.values())

    def ok(self) -> list[dict]:
        return [r for r in self._latest.values() if "error" not in r]

    def failures(self) -> Counter:
        return Counter(r["error"].split(":")[0] for r in self._latest.values() if "error" in r)


class ImageStore:
    """Images stored once under ``images/<sha[:2]>/<sha>.<ext>``, named by the sha256 of their bytes."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir) / "images"

    def path(self, sha: str, ext: str) -> Path:
        return self.root / sha[:2] / f"{sha}.{ext}"

    def put(self, data: bytes, ext: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha, ext)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        return sha

    def get(self, sha: str, ext: str) -> bytes:
        return self.path(sha, ext).read_bytes()
