"""Preference groups: each image and prompt processed once, one forward for a whole group, and the
same log-probs as scoring every critique on its own."""

import pytest
import torch

from carevl.backbone import Backbone
from carevl.encoding import Encoder, collate
from carevl.prompts import judge_prompt, user_turn
from carevl.schema import PreferenceGroupSample
from carevl.standins.shapes import judge_items
from datamodules.preference import collate_groups, encode_group
from tests.helpers import image_of


def groups(n=3):
    out = []
    for item in judge_items(n, seed=5):
        good = item.critique()
        bad = good.replace(f"Answer {item.label} is better", f"Answer {3 - item.label} is better")
        rejected = [bad, "The image shows nothing. " + bad, "I cannot tell."][: 1 + len(out)]  # 1, 2, 3 rejected
        out.append(
            PreferenceGroupSample(
                id=item.id,
                question=item.question,
                responses=list(item.responses),
                label=item.label,
                chosen=good,
                rejected=rejected,
                image=item.image,
            )
        )
    return out


@pytest.fixture(scope="module")
def group_batch(tiny_any):
    backbone = Backbone(model=tiny_any)
    backbone.build()
    backbone.eval()
    encoder = Encoder(backbone.processor, max_length=1024)
    samples = groups()
    items = [item for sample in samples for item in encode_group(encoder, None, sample, image_of(sample))]
    return backbone, encoder, samples, collate_groups(items, {}, encoder.pad_token_id)


def test_group_structure(group_batch):
    _, _, samples, batch = group_batch
    assert batch["chosen_index"].tolist() == [0, 2, 5]
    assert batch["rejected_group"].tolist() == [0, 1, 1, 2, 2, 2]
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert batch["inputs"]["input_ids"].shape[0] == 9
    if "pixel_values" in batch["inputs"] and "image_grid_thw" not in batch["inputs"]:
        assert batch["inputs"]["pixel_values"].shape[0] == 3  # one image entry per group, not per sequence


def test_group_logprobs_equal_one_by_one(group_batch):
    backbone, encoder, samples, batch = group_batch
    with torch.no_grad():
        grouped = backbone.group_logprobs(batch)
        features = backbone.image_features(batch["inputs"])
        shared = backbone.group_logprobs(batch, features) if features is not None else grouped
        single = []
        for sample in samples:
            messages = user_turn(judge_prompt(sample.question, sample.responses))
            for text in [sample.chosen, *sample.rejected]:
                features_one = encoder.encode(image_of(sample), messages, text)
                inputs = collate(
                    [{k: v for k, v in features_one.items() if k != "prompt_length"}], encoder.pad_token_id
                )
                single.append(backbone.sequence_logprobs(inputs))
    single = torch.cat(single)
    assert torch.allclose(grouped, single, atol=1e-5), (grouped - single).abs().max()
    assert torch.allclose(shared, single, atol=1e-5), (shared - single).abs().max()
    assert (features is not None) == (backbone.hf.config.model_type == "qwen2_vl")


def test_block_mask():
    from carevl.group_logprobs import block_mask

    # a prompt of 2 tokens, responses of 2 and 1 tokens, one padding position
    mask = block_mask(torch.tensor([[-1, -1, 0, 0, 1, -2]]))[0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # the second response sees the prompt, not the first response
        [0, 0, 0, 0, 0, 1],
    ]


def test_packed_prompts_and_a_chunked_head_give_the_same_logprobs_and_gradients(tiny_qwen):
    backbone = Backbone(model=tiny_qwen)
    backbone.build()
    encoder = Encoder(backbone.processor, max_length=1024)
    samples = groups()
    batch = collate_groups(
        [item for s in samples for item in encode_group(encoder, None, s, image_of(s))], {}, encoder.pad_token_id
    )
    assert backbone.packs_group(batch)
    results = {}
    for pack, chunk in (
        (False, None),
        (True, None),
        (False, 7),
        (True, 7),
    ):  # 7: a chunk boundary inside every critique
        backbone.hf.zero_grad()
        backbone.logit_chunk = chunk
        features = backbone.image_features(batch["inputs"])  # the projector trains: a fresh graph each time
        logps = backbone.group_logprobs(batch, features, pack=pack)
        (logps * torch.linspace(0.5, 1.5, logps.numel())).sum().backward()
        grads = {n: p.grad.clone() for n, p in backbone.hf.named_parameters() if p.grad is not None}
        results[pack, chunk] = (logps.detach(), grads)
    unpacked, grads_unpacked = results[False, None]
    for (pack, chunk), (logps, grads) in results.items():
        assert torch.allclose(logps, unpacked, atol=1e-5), (pack, chunk, (logps - unpacked).abs().max())
        assert grads.keys() == grads_unpacked.keys() and len(grads) > 10
        for name, grad in grads.items():
            assert torch.allclose(grad, grads_unpacked[name], atol=1e-5, rtol=1e-4), (pack, chunk, name)
