import random
import warnings

import pytest

from carevl import schema
from carevl.encoding import IGNORE_INDEX
from carevl.standins import shapes
from datamodules import JudgeDataModule
from datamodules.stream import cut_batches
from tests.helpers import write_bad_shards


def make_module(processor, directory, **kwargs):
    module = JudgeDataModule(processor=processor, train=str(directory), val=str(directory), max_length=256, **kwargs)
    module.setup("fit")
    return module


def test_bad_samples_are_skipped_and_counted(tiny_qwen, tmp_path):
    write_bad_shards(tmp_path)
    module = make_module(tiny_qwen, tmp_path, batch_size=4, num_workers=0)
    skipped, ids = {}, []
    for batch in module.val_dataloader():
        for reason, count in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        ids += batch["ids"]
    assert skipped == {"corrupt_image": 1, "too_long": 1, "bad_record": 1}
    assert len(ids) == len(set(ids)) == 20


def test_training_batches_are_masked_and_epoch_length_is_exact(tiny_qwen, world):
    module = make_module(tiny_qwen, world / "train", batch_size=8, num_workers=2, shuffle_buffer=16)
    loader = module.train_dataloader()
    assert len(loader) == 96 // 8
    batches = list(loader)
    assert len(batches) == 12
    batch = batches[0]
    inputs = batch["inputs"]
    assert inputs["input_ids"].shape == inputs["labels"].shape == inputs["attention_mask"].shape
    assert ((inputs["labels"] != IGNORE_INDEX) <= inputs["attention_mask"].bool()).all(), "padding is never a target"
    image_token = module.encoder.processor.image_token_id
    assert not ((inputs["input_ids"] == image_token) & (inputs["labels"] != IGNORE_INDEX)).any()
    assert inputs["pixel_values"].shape[0] == 8 * int(inputs["image_grid_thw"][0].prod())
    seen = [i for b in batches for i in b["ids"]]
    assert len(set(seen)) == 96, "one epoch decodes every sample once, whatever the shard sizes"
    second = [i for b in loader for i in b["ids"]]
    assert second != seen, "each epoch reshuffles"


@pytest.mark.parametrize("workers,group", [(0, 0), (3, 0), (2, 2)])
def test_an_epoch_resumed_after_some_batches_continues_their_order(tiny_qwen, tmp_path, workers, group):
    write_bad_shards(tmp_path)  # 23 samples of which 20 usable, in 3 shards: 5 batches of 4
    module = make_module(
        tiny_qwen, tmp_path, batch_size=4, num_workers=workers, shuffle_buffer=6, group_by_length=group
    )
    loader = module.train_dataloader()
    loader.position = lambda: (1, 0)
    whole = [(b["ids"], b["skipped"]) for b in loader]
    assert len(whole) == 5 and any(skipped for _, skipped in whole)
    for done in (1, 2, 4):
        loader.position = lambda done=done: (1, done)
        assert [(b["ids"], b["skipped"]) for b in loader] == whole[done:], f"resumed after {done} batches"
    loader.position = lambda: (2, 0)
    assert [b["ids"] for b in loader] != [ids for ids, _ in whole], (
        "the epoch, not the iteration count, seeds the order"
    )


def test_cut_batches_sorts_a_pool_into_batches_of_neighbouring_lengths():
    pool = [{"length": n, "i": i} for i, n in enumerate([7, 1, 5, 3, 8, 2, 6, 4])]
    assert cut_batches(pool, 3, 0, random.Random(0)) == [pool[0:3], pool[3:6], pool[6:8]]
    grouped = cut_batches(pool, 2, 4, random.Random(0))
    assert sorted(tuple(item["length"] for item in batch) for batch in grouped) == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert grouped == cut_batches(pool, 2, 4, random.Random(0)), (
        "the batch order is the generator's, so a resume repeats it"
    )


def test_grouping_by_length_pads_less_and_keeps_the_epoch(tiny_qwen, tmp_path):
    with schema.ShardWriter(tmp_path, prefix="g", max_count=32, kind="sft") as writer:
        for index, it in enumerate(shapes.judge_items(32, seed=5)):
            writer.write(schema.SFTSample(**it.fields(), target=it.critique() + " red" * 4 * (index % 8), source="t"))

    def epoch(group):
        batches = list(
            make_module(tiny_qwen, tmp_path, batch_size=4, num_workers=0, group_by_length=group).train_dataloader()
        )
        padding = sum(int((b["inputs"]["attention_mask"] == 0).sum()) for b in batches)
        return sorted(i for b in batches for i in b["ids"]), [len(b["ids"]) for b in batches], padding

    shuffled_ids, _, shuffled_padding = epoch(0)
    grouped_ids, sizes, grouped_padding = epoch(8)  # the whole epoch sorted at once
    assert grouped_ids == shuffled_ids and sizes == [4] * 8
    assert grouped_padding < shuffled_padding / 4, (grouped_padding, shuffled_padding)


def test_resuming_with_another_stream_layout_warns(tiny_qwen, tmp_path):
    write_bad_shards(tmp_path)
    module = make_module(tiny_qwen, tmp_path, num_workers=2)
    state = module.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.load_state_dict(state)  # the same layout: silent
    module.num_workers = 4
    with pytest.warns(UserWarning, match="cannot be continued"):
        module.load_state_dict(state)


def test_a_resumed_position_moves_to_the_batches_that_hold_as_many_samples():
    """A checkpoint's place in its epoch, moved from batches of 2 processes x 3 samples to batches of
    4 x 2: 5 batches (30 samples) become 3 (24; rounded down, so 6 samples come twice). Lightning's
    counters move together (`completed` one behind, as saved at a batch's end); so do the totals
    across epochs. (tests/test_ddp.py resumes real runs on another number of processes.)"""
    from datamodules.judge import moved_position

    counters = lambda n: {"ready": n, "started": n, "processed": n, "completed": n - 1}  # noqa: E731
    loops = {"epoch_loop.batch_progress": {"current": counters(5), "total": counters(17), "is_last_batch": False}}
    assert moved_position(loops, {"processes": 2, "batch_size": 3}, {"processes": 4, "batch_size": 2}) == (5, 3)
    assert loops["epoch_loop.batch_progress"]["current"] == counters(3)
    assert loops["epoch_loop.batch_progress"]["total"] == counters(15)
    assert moved_position(loops, {"processes": 4, "batch_size": 2}, {"processes": 1, "batch_size": 3}) == (3, 8)
    assert loops["epoch_loop.batch_progress"]["current"] == counters(8)
    assert moved_position(loops, {"processes": 1, "batch_size": 3}, {"processes": 1, "batch_size": 3}) == (8, 8)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_same_number_of_batches(tiny_qwen, tmp_path, world_size):
    # Uneven shards: 5 + 5 + 5 + 2 samples.
    items = shapes.judge_items(17, seed=4)
    with schema.ShardWriter(tmp_path, prefix="u", max_count=5, kind="sft") as writer:
        for it in items:
            writer.write(schema.SFTSample(**it.fields(), target=it.critique(), source="t"))
    counts, val_ids = [], []
    for rank in range(world_size):
        module = make_module(tiny_qwen, tmp_path, batch_size=2, num_workers=2)
        module._rank = lambda rank=rank: (rank, world_size)
        counts.append(sum(1 for _ in module.train_dataloader()))
        val_ids += [i for b in module.val_dataloader() for i in b["ids"]]
    assert counts == [17 // (world_size * 2)] * world_size
    assert sorted(val_ids) == sorted(it.id for it in items), "validation sees every sample exactly once"


def test_datamodule_errors_are_clear(tiny_qwen, tmp_path, world):
    with pytest.raises(ValueError, match="kind"):
        JudgeDataModule(processor=tiny_qwen, kind="nope")
    with pytest.raises(ValueError, match="group_by_length"):
        JudgeDataModule(processor=tiny_qwen, group_by_length=-1)
    with pytest.raises(FileNotFoundError, match="manifest"):
        make_module(tiny_qwen, tmp_path).train_dataloader()
    module = make_module(tiny_qwen, world / "heldout", batch_size=64)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        module.train_dataloader()


@pytest.mark.parametrize(
    "sizes", [{"batch_size": 0}, {"val_batch_size": 0}, {"max_length": 0}, {"num_workers": -1}, {"shuffle_buffer": -1}]
)
def test_impossible_sizes_are_refused_when_the_config_is_read(sizes):
    """Before, `batch_size: 0` divided by zero after the model had loaded."""
    with pytest.raises(ValueError, match="must be at least 1|cannot be negative"):
        JudgeDataModule(processor="unused", **sizes)


@pytest.mark.parametrize("problem", ["missing shards", "kind mismatch", "missing checkpoint"])
def test_missing_or_mismatched_inputs_fail_before_the_model_loads(tiny_qwen, world, tmp_path, problem):
    """A shard set that is not there, or holds another kind than data.kind says (before, never
    compared), and a checkpoint folder that is not there (before, the hub was tried while offline),
    fail with their names before any weight loads."""
    from carevl.cli import run
    from tests.helpers import fit_config

    train, options = world / "train", {}
    if problem == "missing shards":
        train = tmp_path / "no-such-shards"
    elif problem == "kind mismatch":
        options = {"kind": "preference_group"}
    model = str(tmp_path / "no-such-checkpoint") if problem == "missing checkpoint" else tiny_qwen
    config = fit_config(tmp_path, model, train, **options)
    if problem == "missing checkpoint":
        with pytest.raises((FileNotFoundError, ValueError), match="no checkpoint folder at .*no-such-checkpoint"):
            run(["--config", str(config)], subcommand=False)
        return
    cli = run(["--config", str(config)], subcommand=False)
    expected = {
        "missing shards": "no manifest.json in .*no-such-shards",
        "kind mismatch": "holds 'sft' samples and data.kind is 'preference_group'",
    }
    with pytest.raises((FileNotFoundError, ValueError), match=expected[problem]):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.backbone.model is None, "the model was never loaded"
