"""DPO on preference groups: the frozen reference stays bit-identical while the policy moves, the
three reference modes agree, and the logged statistics are there."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from carevl.backbone import Backbone, LoraSettings
from carevl.dpo import DPOJudge
from carevl.schema import (
    REFERENCE_FILE,
    PreferenceGroupSample,
    ReferenceMismatch,
    ShardWriter,
    checkpoint_fingerprint,
    decode,
    group_fingerprint,
    read_manifest,
)
from datamodules import JudgeDataModule
from tests.helpers import compiled_graph, fit, metrics
from tools.reference_logps import part_path, precompute_reference


@pytest.fixture(scope="module")
def groups_dir(tmp_path_factory):
    from carevl.standins.world import write_preference_groups

    out = tmp_path_factory.mktemp("groups")
    write_preference_groups(str(out), n=24, shard_size=12)
    return out


def dpo_fit(tmp_path, model, groups, max_steps=3, module_args=None, **overrides):
    return fit(
        tmp_path,
        model,
        groups,
        module="carevl.dpo.DPOJudge",
        module_args={"beta": 0.1, **(module_args or {})},
        kind="preference_group",
        batch_size=2,
        max_steps=max_steps,
        **overrides,
    )


def first_batch(model, groups):
    data = JudgeDataModule(processor=model, train=str(groups), kind="preference_group", batch_size=3, num_workers=0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_copy_reference_stays_frozen_while_the_policy_moves(tiny_qwen, groups_dir, tmp_path):
    before = {n: p.clone() for n, p in AutoModelForImageTextToText.from_pretrained(tiny_qwen).named_parameters()}
    cli = dpo_fit(tmp_path, tiny_qwen, groups_dir)
    module = cli.model
    reference = dict(module.reference_model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in reference.items()), "the reference weights changed"
    assert not any(p.requires_grad for p in reference.values()) and not module.reference_model.training
    assert not any("reference" in key for key in module.state_dict()), "the reference must not be checkpointed"
    policy = {n: p for n, p in module.backbone.hf.named_parameters()}
    vision = module.backbone.vision_parameters()
    assert all(torch.equal(policy[n], before[n]) for n in vision)
    moved = [n for n, p in policy.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == sum(p.requires_grad for p in policy.values())
    logged = set().union(*({k for k, v in row.items() if v} for row in metrics(tmp_path)))
    for name in (
        "loss",
        "reward_accuracy",
        "chosen_beats_all",
        "margin",
        "chosen_reward",
        "rejected_reward",
        "chosen_logp",
        "rejected_logp",
    ):
        assert f"train/{name}" in logged, name


def copied(groups_dir: Path, to: Path) -> Path:
    """The groups without any reference file, copied to `to`."""
    shutil.copytree(groups_dir, to, ignore=shutil.ignore_patterns("reference-logps*"))
    return to


def test_precomputed_reference_equals_the_frozen_copy(tiny_qwen, groups_dir, tmp_path):
    groups = copied(groups_dir, tmp_path / "groups")
    precompute_reference(tiny_qwen, groups, batch_size=5)
    batch = first_batch(tiny_qwen, groups)
    assert "reference_logps" in batch
    module = DPOJudge(Backbone(model=tiny_qwen), reference="copy")
    module.configure_model()
    features = module.backbone.image_features(batch["inputs"])
    copy = module.reference_logprobs(batch, features)
    assert torch.allclose(copy, batch["reference_logps"], atol=1e-4), (copy - batch["reference_logps"]).abs().max()
    precomputed = DPOJudge(Backbone(model=tiny_qwen), reference="precomputed")
    precomputed.configure_model()
    assert precomputed.reference_model is None
    assert torch.equal(precomputed.reference_logprobs(batch, None), batch["reference_logps"])


def reference_logps(shards) -> dict[str, list[float]]:
    return json.loads((shards / REFERENCE_FILE).read_text())["logps"]


def group_samples(shards: Path) -> list[PreferenceGroupSample]:
    import webdataset as wds

    urls = read_manifest(shards)["urls"]
    return [decode(raw, "preference_group") for raw in wds.WebDataset(urls, shardshuffle=False)]


def group_fingerprints(shards: Path) -> dict[str, str]:
    return {sample.id: group_fingerprint(sample) for sample in group_samples(shards)}


def test_the_reference_precompute_splits_into_parts_and_resumes_after_a_kill(tiny_qwen, groups_dir, tmp_path):
    def shards(name):
        return copied(groups_dir, tmp_path / name)

    whole = shards("whole")
    precompute_reference(tiny_qwen, whole, batch_size=5)
    expected = reference_logps(whole)
    assert len(expected) == 24

    split = shards("split")  # two processes' parts, one after the other: the second merges
    assert (
        precompute_reference(tiny_qwen, split, batch_size=3, part=0, parts=2) is None
        and not (split / REFERENCE_FILE).exists()
    )
    assert precompute_reference(tiny_qwen, split, batch_size=3, part=1, parts=2) == split / REFERENCE_FILE
    merged = reference_logps(split)
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(torch.tensor(merged[k]), torch.tensor(expected[k]), atol=1e-4) for k in expected)

    killed = shards("killed")  # a run killed after its first group, halfway through writing the second
    first, second = sorted(expected)[:2]
    marker = [123.0] * len(expected[first])  # not what the model gives: recomputing would overwrite it
    settings = {
        "key": "*settings*",
        "model": tiny_qwen,
        "model_files": checkpoint_fingerprint(tiny_qwen),
        "dtype": "float32",
        "max_length": 4096,
    }
    lines = [settings, {"key": first, "group": group_fingerprints(killed)[first], "logps": marker}]
    part = part_path(killed, 0, 1)
    part.write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + json.dumps({"key": second, "logps": expected[second]})[:20]
    )
    precompute_reference(tiny_qwen, killed, batch_size=5)
    resumed = reference_logps(killed)
    assert resumed[first] == marker, "a group already written is not computed again"
    assert resumed.keys() == expected.keys() and torch.allclose(
        torch.tensor(resumed[second]), torch.tensor(expected[second]), atol=1e-5
    )

    # the starting model written again at the same path: the part file is set aside, every group recomputed
    weights = next(Path(tiny_qwen).glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    precompute_reference(tiny_qwen, killed, batch_size=5)
    assert reference_logps(killed)[first] != marker and part.with_suffix(".stale").exists()


def test_a_reference_of_another_model_or_of_rewritten_groups_is_refused_and_rerun_recomputes_what_changed(
    tiny_qwen, groups_dir, tmp_path
):
    """Before, a reference was matched to groups by id alone: one computed with another checkpoint
    trained on silently (first loss 0.698, not log 2), groups rewritten under the same ids gave a
    first loss of 8.93, and rerunning the precompute kept the stale values."""
    from carevl.standins.tiny import build_tiny_model

    groups = copied(groups_dir, tmp_path / "groups")
    precompute_reference(tiny_qwen, groups, batch_size=5)
    first_batch(tiny_qwen, groups)  # this model, these groups: accepted
    other = str(build_tiny_model(tmp_path / "other", hidden=64, layers=2, seed=1))
    with pytest.raises(ReferenceMismatch, match="computed with the checkpoint .* not with .*other"):
        first_batch(other, groups)

    samples = group_samples(groups)  # one group's critiques rewritten, under the same ids
    samples[5].rejected = [samples[5].rejected[0] + " Both answers say the same."]
    with ShardWriter(groups, prefix="groups", max_count=12, kind="preference_group") as writer:
        for sample in samples:
            writer.write(sample)
    with pytest.raises(ReferenceMismatch, match="written again after reference-logps.json"):
        first_batch(tiny_qwen, groups)

    part = part_path(groups, 0, 1)  # plant a value in an unchanged group: it must survive the rerun
    unchanged, planted = samples[0].id, [7.0] * (1 + len(samples[0].rejected))
    with part.open("a") as handle:
        handle.write(json.dumps({"key": unchanged, "group": group_fingerprint(samples[0]), "logps": planted}) + "\n")
    precompute_reference(tiny_qwen, groups, batch_size=5)
    fresh = copied(groups, tmp_path / "fresh")
    precompute_reference(tiny_qwen, fresh, batch_size=5)
    rerun, expected = reference_logps(groups), reference_logps(fresh)
    assert rerun[unchanged] == planted, "an unchanged group is not computed again"
    changed = samples[5].id
    assert len(rerun[changed]) == 2 and torch.allclose(torch.tensor(rerun[changed]), torch.tensor(expected[changed]))
    first_batch(tiny_qwen, groups)  # accepted again


def test_lora_disabled_reference_equals_the_starting_model(tiny_qwen, groups_dir):
    batch = first_batch(tiny_qwen, groups_dir)
    lora = DPOJudge(Backbone(model=tiny_qwen, lora=LoraSettings(r=4, alpha=8, dropout=0.0)), reference="lora_disabled")
    lora.configure_model()
    with torch.no_grad():  # move the adapters away from their no-op start, so disabling them matters
        for name, param in lora.backbone.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    copy = DPOJudge(Backbone(model=tiny_qwen), reference="copy")
    copy.configure_model()
    copy.eval(), lora.eval()
    reference = lora.reference_logprobs(batch, None)
    assert torch.allclose(reference, copy.reference_logprobs(batch, None), atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(lora.backbone.group_logprobs(batch), reference, atol=1e-3)


def test_bad_reference_settings_are_clear_errors(tiny_qwen, groups_dir):
    with pytest.raises(ValueError, match="reference must be one of"):
        DPOJudge(Backbone(model=tiny_qwen), reference="ema")
    with pytest.raises(ValueError, match="needs LoRA"):
        DPOJudge(Backbone(model=tiny_qwen), reference="lora_disabled").configure_model()
    module = DPOJudge(Backbone(model=tiny_qwen), reference="precomputed")
    with pytest.raises(ValueError, match="python tools/reference_logps.py"):
        module.reference_logprobs({"inputs": {}}, None)


def test_loss_equals_trl_sigmoid_dpo_on_the_same_pairs_and_model(tiny_qwen, tmp_path):
    """Four (chosen, rejected) pairs through TRL's DPOTrainer and through carevl's group path."""
    trl = pytest.importorskip("trl")
    import io

    from datasets import Dataset
    from PIL import Image

    from carevl.encoding import Encoder
    from carevl.losses import dpo_group_loss
    from carevl.schema import PreferenceGroupSample
    from carevl.standins.baselines import trl_pair
    from carevl.standins.shapes import judge_items, worse_critiques
    from datamodules.preference import collate_groups, encode_group

    beta = 0.1
    items = judge_items(4, seed=3)
    rejected = [worse_critiques(item)[0] for item in items]
    policy = Backbone(model=tiny_qwen)
    policy.build()
    with torch.no_grad():  # make the policy differ from the reference
        generator = torch.Generator().manual_seed(0)
        for param in policy.hf.model.language_model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    policy.eval()
    reference = AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()

    encoder = Encoder(policy.processor)
    groups = [
        encode_group(
            encoder,
            None,
            PreferenceGroupSample(
                id=item.id,
                question=item.question,
                responses=list(item.responses),
                label=item.label,
                chosen=item.critique(),
                rejected=[bad],
                image=item.image,
            ),
            Image.open(io.BytesIO(item.image)).convert("RGB"),
        )[0]
        for item, bad in zip(items, rejected)
    ]
    batch = collate_groups(groups, {}, encoder.pad_token_id)
    with torch.no_grad():
        ours = policy.group_logprobs(batch)
        ref = policy.group_logprobs(batch, model=reference)
    c, r = batch["chosen_index"], batch["rejected_index"]
    loss, _ = dpo_group_loss(ours[c], ours[r], ref[c], ref[r], batch["rejected_group"], beta)

    rows = [
        trl_pair(item.image, item.question, list(item.responses), item.critique(), bad)
        for item, bad in zip(items, rejected)
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        beta=beta,
        loss_type=["sigmoid"],
        report_to="none",
        use_cpu=True,
        max_length=None,
        bf16=False,
    )
    trainer = trl.DPOTrainer(
        model=policy.hf,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=policy.processor,
    )
    trl_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    assert abs(loss.item() - 0.6931) > 1e-3, "policy and reference must differ for the comparison to mean anything"
    assert abs(loss.item() - trl_loss.item()) < 1e-4, (loss.item(), trl_loss.item())


def test_group_pair_losses_equal_the_pairs_computed_one_by_one(tiny_qwen):
    """One chosen against three rejected in one group gives the losses of the three pairs apart."""
    from carevl.encoding import Encoder
    from carevl.losses import dpo_group_loss
    from carevl.schema import PreferenceGroupSample
    from carevl.standins.shapes import judge_items, worse_critiques
    from datamodules.preference import collate_groups, encode_group
    from tests.helpers import image_of

    item = judge_items(1, seed=9)[0]
    worse = worse_critiques(item)[:3]
    module = DPOJudge(Backbone(model=tiny_qwen), reference="copy", beta=0.1)
    module.configure_model()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for param in module.backbone.hf.model.language_model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    module.eval()
    encoder = Encoder(module.backbone.processor)

    def losses(groups):
        built = [
            encode_group(
                encoder,
                None,
                PreferenceGroupSample(**item.fields(), chosen=item.critique(), rejected=r),
                image_of(item),
            )[0]
            for r in groups
        ]
        batch = collate_groups(built, {}, encoder.pad_token_id)
        with torch.no_grad():
            features = module.backbone.image_features(batch["inputs"])
            policy = module.backbone.group_logprobs(batch, features)
            reference = module.reference_logprobs(batch, features)
        c, r = batch["chosen_index"], batch["rejected_index"]
        return dpo_group_loss(policy[c], policy[r], reference[c], reference[r], batch["rejected_group"], 0.1)[1][
            "pair_losses"
        ]

    grouped = losses([worse])
    one_by_one = torch.cat([losses([[text]]) for text in worse])
    assert grouped.shape == (3,) and torch.allclose(grouped, one_by_one, atol=1e-5), (grouped, one_by_one)
    assert grouped.std() > 0  # the three pairs really differ


def test_validation_reports_verdicts_and_held_out_group_statistics(tiny_qwen, world, groups_dir, tmp_path):
    dpo_fit(
        tmp_path,
        tiny_qwen,
        groups_dir,
        val=[world / "heldout", groups_dir],
        trainer={"limit_train_batches": 2},
        max_steps=2,
        limit_val_batches=2,
        val_batch_size=4,
    )
    logged = {}
    for row in metrics(tmp_path):
        logged.update({k: float(v) for k, v in row.items() if v})
    for name in (
        "val/verdict_accuracy",
        "val/groups_loss",
        "val/groups_reward_accuracy",
        "val/groups_chosen_beats_all",
        "val/groups_margin",
    ):
        assert name in logged, name
    assert 0.0 <= logged["val/groups_reward_accuracy"] <= 1.0 and logged["val/groups_loss"] > 0


def test_reference_copy_is_refused_under_a_sharding_strategy(tiny_qwen):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from carevl.strategies import FSDP, sharded_strategy

    assert sharded_strategy(FSDP()) == "FSDP"
    assert sharded_strategy(DDPStrategy()) is None and sharded_strategy(None) is None
    module = DPOJudge(Backbone(model=tiny_qwen), reference="copy")
    module._trainer = SimpleNamespace(strategy=FSDP())  # what configure_model sees inside trainer.fit
    with pytest.raises(ValueError, match="does not work under FSDP"):
        module.configure_model()
    assert module.reference_model is None


def test_compiled_copy_reference_keeps_the_starting_model(tiny_qwen, groups_dir):
    """With compiled layers the frozen copy compiles its own: it scores with its weights (the
    starting model) while the policy's compiled layers see the policy's."""
    batch = first_batch(tiny_qwen, groups_dir)
    eager = DPOJudge(Backbone(model=tiny_qwen), reference="copy")
    eager.configure_model()
    start = eager.backbone.group_logprobs(batch, eager.backbone.image_features(batch["inputs"]))
    module = DPOJudge(Backbone(model=tiny_qwen, compile_layers=True), reference="copy")
    module.configure_model()
    with torch.no_grad():
        for layer in module.backbone.hf.model.language_model.layers:
            layer.mlp.down_proj.weight.mul_(3.0)
    features = module.backbone.image_features(batch["inputs"])
    reference = module.reference_logprobs(batch, features)
    policy = module.backbone.group_logprobs(batch, features)
    assert compiled_graph(policy)
    torch.testing.assert_close(reference, start, atol=1e-4, rtol=1e-5)
    assert (policy - start).abs().max() > 1e-2, "the policy's weights were changed, its log-probs must move"
    layers = module.reference_model.model.language_model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers), "the copy runs eager"
