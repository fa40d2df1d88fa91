import json

import pytest
import webdataset as wds

from carevl import schema


def sft(**overrides):
    fields = dict(id="a.b/c", question="q?", responses=["x", "y"], label=2, target="t", source="s", image=b"\x89PNG")
    fields.update(overrides)
    return schema.SFTSample(**fields)


def test_encode_decode_round_trip():
    raw = schema.encode(sft(meta={"k": 1}, weight=0.5))
    assert raw["__key__"] == "a_b_c" and "." not in raw["__key__"]
    back = schema.decode(raw, "sft")
    assert back == sft(meta={"k": 1}, weight=0.5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("json"), "no json"),
        (lambda r: r.pop("png"), "no image"),
        (lambda r: r.update(json=b"{not json"), "unreadable json"),
        (lambda r: r.update(json=json.dumps({"id": "x", "question": "q"}).encode()), "missing field"),
        (
            lambda r: r.update(json=json.dumps({**json.loads(r["json"]), "label": 3}).encode()),
            r"'label' must be one of \(1, 2\)",
        ),
        (lambda r: r.update(json=json.dumps({**json.loads(r["json"]), "responses": ["one"]}).encode()), "two strings"),
    ],
)
def test_decode_rejects_broken_samples(mutate, message):
    raw = schema.encode(sft())
    mutate(raw)
    with pytest.raises(schema.SchemaError, match=message):
        schema.decode(raw, "sft")


def test_writer_manifest_counts_and_readback(tmp_path):
    with schema.ShardWriter(tmp_path, prefix="p", max_count=3, kind="sft") as writer:
        for i in range(7):
            writer.write(sft(id=f"s{i}"))
        with pytest.raises(schema.SchemaError):
            writer.write(schema.InstructSample(id="i", prompt="p", target="t", source="s", image=b""))
    manifest = schema.read_manifest(tmp_path)
    assert manifest["samples"] == 7
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    ids = [schema.decode(raw, "sft").id for raw in wds.WebDataset(manifest["urls"], shardshuffle=False)]
    assert ids == [f"s{i}" for i in range(7)]


def test_preference_group_round_trip_and_errors():
    from carevl.schema import PreferenceGroupSample, SchemaError, decode, encode

    group = PreferenceGroupSample(
        id="g-1",
        question="q",
        responses=["a", "b"],
        label=2,
        chosen="best. Overall Judgment: Answer 2 is better.",
        rejected=["worse", "worst"],
        image=b"img",
        chosen_score=90.0,
        rejected_scores=[60.0, 10.0],
    )
    assert decode(encode(group), "preference_group") == group
    for bad in ({"rejected": []}, {"rejected_scores": [1.0]}, {"label": "tie"}):
        with pytest.raises(SchemaError):
            encode(PreferenceGroupSample(**{**group.__dict__, **bad}))


def write_set(directory, ids, fail_after=None):
    """A shard set of SFT samples `ids`, three to a shard; with `fail_after`, the writer meets an
    exception after that many samples."""
    with schema.ShardWriter(directory, prefix="p", max_count=3, kind="sft") as writer:
        for n, sample_id in enumerate(ids):
            if n == fail_after:
                raise RuntimeError("the stage failed mid-write")
            writer.write(sft(id=sample_id))


def read_ids(directory) -> list[str]:
    manifest = schema.read_manifest(directory)
    return [schema.decode(raw, "sft").id for raw in wds.WebDataset(manifest["urls"], shardshuffle=False)]


def test_a_writer_that_fails_leaves_the_set_before_it_as_it_was(tmp_path):
    write_set(tmp_path / "set", [f"old{i}" for i in range(5)])
    with pytest.raises(RuntimeError, match="mid-write"):
        write_set(tmp_path / "set", [f"new{i}" for i in range(8)], fail_after=7)
    assert read_ids(tmp_path / "set") == [f"old{i}" for i in range(5)]
    assert not (tmp_path / "set" / schema.WRITING).exists()
    with pytest.raises(RuntimeError):
        write_set(tmp_path / "fresh", ["a", "b"], fail_after=1)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        schema.read_manifest(tmp_path / "fresh")


def test_a_rewritten_set_replaces_every_old_shard_and_a_killed_writers_leftovers(tmp_path):
    write_set(tmp_path / "set", [f"old{i}" for i in range(8)])  # three shards
    (tmp_path / "set" / schema.WRITING).mkdir()  # a writer killed mid-write left its folder
    (tmp_path / "set" / schema.WRITING / "p-000000.tar").write_bytes(b"half a tar")
    write_set(tmp_path / "set", ["new0", "new1"])  # one shard
    assert read_ids(tmp_path / "set") == ["new0", "new1"]
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["manifest.json", "p-000000.tar"]


def test_a_shard_cut_short_or_miscounted_is_an_error_naming_it(tmp_path):
    write_set(tmp_path / "set", [f"s{i}" for i in range(6)])
    second = tmp_path / "set" / "p-000001.tar"
    whole = second.read_bytes()
    second.write_bytes(whole[:2000])  # a copy or a disk that stopped inside the second sample
    with pytest.raises(schema.ShardError, match=r"p-000001.tar has \d+ bytes, its manifest says"):
        schema.read_manifest(tmp_path / "set")
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["bytes"]  # a manifest without sizes: the tar is read to its end
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(schema.ShardError, match="p-000001.tar cannot be read to its end"):
        schema.read_manifest(tmp_path / "set")
    second.write_bytes(whole)
    manifest["shards"][0]["samples"] = 16  # a manifest that claims more than its tars hold
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(schema.ShardError, match="p-000000.tar holds 3 samples, its manifest says 16"):
        schema.read_manifest(tmp_path / "set")
    (tmp_path / "set" / "p-000000.tar").unlink()
    with pytest.raises(schema.ShardError, match="p-000000.tar is missing"):
        schema.read_manifest(tmp_path / "set")


def test_text_that_is_not_valid_unicode_is_refused_when_written_not_met_mid_epoch():
    """A lone surrogate (a broken JSON escape in a dataset or a model's output) passed through JSON
    into the shards and stopped training when the tokenizer met it."""
    broken = json.loads('"half a pair \\ud800"')
    with pytest.raises(schema.SchemaError, match="'target' holds text that is not valid Unicode"):
        schema.encode(sft(target=broken))
    with pytest.raises(schema.SchemaError, match="'responses' holds text"):
        schema.encode(sft(responses=["fine", broken]))
