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
