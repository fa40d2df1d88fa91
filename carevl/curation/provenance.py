"""Who produced a curation record, and which records a stage's current config asks for.

Every record is keyed by, and holds, the identity of its producer (`producer`): the model's class,
the settings that decide its output (all its settings but the ones its class declares
`operational`: concurrency, timeouts, devices), and the fingerprint of the local checkpoint it
names. Keys also hold the prompt template and the sampling settings, so a changed model,
checkpoint, prompt or decoding is sampled afresh instead of reusing old records.

A stage also writes the keys its config asked for (`select`, ``<records file>.selection.json``);
the stages after it read those records only (`selected`), so the records of a model removed from
the config, or of a model replaced, stay on disk but never reach a split, a pair or a shard.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from carevl.backends.interface import BatchChatModel, ChatModel, RewardModel
from carevl.curation.records import Records, replace_file
from carevl.schema import checkpoint_fingerprint


def producer(factory: Any) -> dict[str, Any]:
    """The identity of the model `factory` builds, without building it. A factory as a config gives
    it (a class with its settings) is known by its class, its settings but the `operational` ones
    and the fingerprint of the local checkpoint it names; a model handed over already built, by its
    class and `name`; any other callable (a function) by nothing more than the name the stage
    gives it."""
    if isinstance(factory, functools.partial):  # jsonargparse's factory: the class and its settings
        classes = [arg for arg in factory.args if isinstance(arg, type)]
        if classes:
            cls, settings = classes[-1], dict(factory.keywords)
            ignored = set(getattr(cls, "operational", ()))
            identity: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
            identity["settings"] = {k: v for k, v in sorted(settings.items()) if k not in ignored}
            model = settings.get("model")
            if isinstance(model, str) and Path(model).is_dir():
                identity["checkpoint"] = checkpoint_fingerprint(model)
            return identity
    if isinstance(factory, (ChatModel, RewardModel, BatchChatModel)):
        return {"class": f"{type(factory).__module__}.{type(factory).__qualname__}", "name": factory.name}
    return {}


def selection_path(records_path: Path) -> Path:
    return records_path.with_name(records_path.stem + ".selection.json")


def select(records: Records, keys: list[str], **about: Any) -> None:
    """Write the keys of the records the stage's current config asks for (and what it was run with)."""
    path = selection_path(records.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps({**about, "keys": keys}))


def selection(records: Records) -> dict[str, Any] | None:
    """What the last run of the stage was asked for, None when it wrote no selection."""
    path = selection_path(records.path)
    return json.loads(path.read_text()) if path.exists() else None


def selected(records: Records, failed_too: bool = False) -> list[dict]:
    """The records (successful ones, unless `failed_too`) the stage's last run was asked for; every
    record when the stage wrote no selection."""
    found = records.latest() if failed_too else records.ok()
    chosen = selection(records)
    if chosen is None:
        return found
    keys = set(chosen["keys"])
    return [record for record in found if record["key"] in keys]
