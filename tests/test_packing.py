"""Padding-free SFT (`carevl.packing`): a batch packed into one row gives every response token the
log-prob it gets padded, so the loss, its gradients and a whole training run are the padded ones."""

import pytest
import torch

from carevl import packing
from carevl.backbone import Backbone
from carevl.encoding import Encoder, collate
from carevl.images import load_image
from carevl.losses import sft_loss
from carevl.packing import pack_batch, use_varlen_attention
from carevl.prompts import judge_prompt, user_turn
from carevl.standins.shapes import judge_items
from tests.helpers import fit, metrics


def padded_batch(backbone: Backbone, lengths=(3, 10, 17)) -> dict:
    """Judge samples whose critiques differ in length, so the padded batch holds real padding."""
    encoder = Encoder(backbone.processor)
    features = []
    for item, words in zip(judge_items(len(lengths), seed=1), lengths):
        target = "the image shows " * words + "Overall Judgment: Answer 1 is better."
        encoded = encoder.encode(load_image(item.image), user_turn(judge_prompt(item.question, item.responses)), target)
        features.append({k: v for k, v in encoded.items() if k != "prompt_length"})
    return collate(features, backbone.pad_token_id)


@pytest.fixture(scope="module", params=["block mask", "varlen sdpa"])
def backbone(request, tiny_qwen):
    """The tiny judge on SDPA over the whole row with transformers' block mask, or with one SDPA
    call per sample (`use_varlen_attention`, what `pack_samples` switches on)."""
    backbone = Backbone(model=tiny_qwen, dtype="float32", attn_implementation="sdpa")
    backbone.build()
    if request.param == "varlen sdpa":
        assert use_varlen_attention(backbone.hf)
    return backbone


def test_a_packed_batch_gives_each_response_token_its_padded_logprob_and_gradient(backbone):
    inputs = padded_batch(backbone)
    mask = inputs["attention_mask"]
    assert (mask == 0).sum() > 20, "the batch should hold padding"
    weights = torch.tensor([1.0, 2.0, 0.5])

    def loss_and_grads(packed: bool):
        backbone.hf.zero_grad()
        logps, rows = backbone.response_logprobs(inputs, packed=packed)
        loss = sft_loss(logps, weights, rows)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in backbone.hf.named_parameters() if p.grad is not None}
        return logps.detach(), rows, loss.detach(), grads

    padded, packed = loss_and_grads(False), loss_and_grads(True)
    if backbone.hf.config.text_config._attn_implementation == packing.VARLEN_SDPA:  # it attended sample by sample
        assert packing._lengths.lengths == mask.sum(dim=1).tolist()
    assert torch.equal(padded[1], packed[1])  # each token is counted for its own sample
    assert torch.allclose(padded[0], packed[0], atol=1e-5)
    assert torch.allclose(padded[2], packed[2], atol=1e-6)
    assert padded[3].keys() == packed[3].keys()
    for name, grad in padded[3].items():
        assert torch.allclose(grad, packed[3][name], atol=1e-6, rtol=1e-4), name


def test_without_its_restarting_positions_the_packed_row_would_differ(backbone):
    """The check above can fail: the same row with positions running on through every sample (one
    long sequence, attention across samples) scores the later samples' tokens differently."""
    from carevl.losses import response_token_logprobs

    inputs = padded_batch(backbone)
    row, _ = pack_batch(backbone.hf, inputs)
    plain = {k: v for k, v in row.items() if k != "position_ids"}
    with torch.no_grad():
        packed, _ = backbone.response_logprobs(inputs, packed=True)
        hidden = backbone.hidden_states(plain)
        run_on, _ = response_token_logprobs(hidden, row["labels"], backbone.hf.lm_head)
    assert (packed - run_on).abs().max() > 1e-3


def test_packing_refuses_left_padding_and_other_families(backbone, tmp_path):
    from carevl.standins.tiny import build_tiny_model

    inputs = padded_batch(backbone)
    left = {**inputs, "attention_mask": inputs["attention_mask"].flip(1)}  # padding first
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(backbone.hf, left)
    other = Backbone(model=str(build_tiny_model(tmp_path / "llava", family="llava_onevision", hidden=64, layers=2)))
    other.build()
    with pytest.raises(ValueError, match="pack_samples needs a model of the qwen2_vl"):
        pack_batch(other.hf, inputs)


def test_training_with_packed_samples_logs_the_padded_losses(tiny_qwen, world, tmp_path):
    losses = {}
    for packed in (False, True):
        out = tmp_path / str(packed)
        fit(out, tiny_qwen, world / "train", module_args={"pack_samples": packed}, max_steps=3, limit_val_batches=0)
        losses[packed] = [float(r["train/loss"]) for r in metrics(out) if r.get("train/loss")]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
