"""Model FLOPs: the loaders count each batch's work exactly, the counted FLOPs match what torch's
FLOP counter measures on the tiny judge's real passes, and the Throughput callback logs rates over
its window of optimizer steps."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from carevl.backbone import Backbone, LoraSettings
from carevl.encoding import IGNORE_INDEX
from carevl.flops import ModelFlops, batch_work, packed_work, peak_flops
from datamodules import JudgeDataModule
from tests.helpers import fit, metrics


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    from carevl.standins.world import write_preference_groups

    out = tmp_path_factory.mktemp("flops-groups")
    write_preference_groups(str(out), n=6, shard_size=6)
    return out


def first_batch(model, directory, kind, batch_size):
    data = JudgeDataModule(
        processor=model, train=str(directory), kind=kind, batch_size=batch_size, num_workers=0, shuffle_buffer=1
    )
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def eager_backbone(model, lora=None) -> Backbone:
    """Eager attention: its matrix products are what the FLOP counter sees (CPU SDPA is not counted)."""
    backbone = Backbone(
        model=model, attn_implementation="eager", gradient_checkpointing=False, freeze_projector=False, lora=lora
    )
    backbone.build()
    return backbone


def test_packed_work_counts_a_groups_prompt_once():
    # One group: a 10-token prompt with critiques of 5 and 3 tokens (rows of 15 and 13 tokens).
    full = batch_work([15, 13], response_tokens=8, image_grid_thw=None)
    assert (full["tokens"], full["spans"]) == (28, 15**2 + 13**2)
    packed = packed_work([15, 13], [10, 10], [0, 0], response_tokens=8, image_grid_thw=None)
    # the prompt attends to itself once, each critique to the prompt and to itself
    assert (packed["tokens"], packed["spans"]) == (18, 10**2 + (2 * 10 * 5 + 5**2) + (2 * 10 * 3 + 3**2))
    two = packed_work(
        [15, 13, 7], [10, 10, 4], [0, 0, 1], response_tokens=11, image_grid_thw=torch.tensor([[1, 4, 4], [1, 2, 6]])
    )
    assert (two["tokens"], two["spans"]) == (18 + 7, 294 + 16 + (2 * 4 * 3 + 9))
    assert (two["patches"], two["patch_spans"], two["response_tokens"]) == (16 + 12, 16**2 + 12**2, 11)


def test_loaders_count_the_work_of_their_batches(tiny_qwen, world, groups):
    batch = first_batch(tiny_qwen, world / "train", "sft", 4)
    inputs, work = batch["inputs"], batch["work"]
    lengths = inputs["attention_mask"].sum(dim=1)
    patches = inputs["image_grid_thw"].prod(dim=1)
    assert work == {
        "tokens": lengths.sum().item(),
        "spans": (lengths**2).sum().item(),
        "response_tokens": (inputs["labels"] != IGNORE_INDEX).sum().item(),
        "patches": inputs["pixel_values"].shape[0],
        "patch_spans": (patches**2).sum().item(),
    }
    batch = first_batch(tiny_qwen, groups, "preference_group", 2)
    lengths, prompts = batch["inputs"]["attention_mask"].sum(dim=1), batch["prompt_lengths"]
    assert batch["work"]["tokens"] == lengths.sum().item()
    shared = sum(
        int(prompts[batch["image_index"] == g][0]) * (int((batch["image_index"] == g).sum()) - 1) for g in range(2)
    )
    assert batch["packed_work"]["tokens"] == lengths.sum().item() - shared, "each group's prompt is counted once"
    assert batch["work"]["patches"] == batch["inputs"]["pixel_values"].shape[0], "one image per group"


@pytest.mark.parametrize("lora,tolerance", [(None, 0.015), (LoraSettings(r=4, alpha=8, dropout=0.0), 0.05)])
def test_counted_flops_match_the_measured_training_step(tiny_qwen, world, lora, tolerance):
    """Forward and backward of one unpadded sample. What is not counted: norms and biases are
    counted as weights (the counter sees matrix products only), and with LoRA the first layer's
    q/k/v get no input gradient (the embeddings are frozen), hence LoRA's wider tolerance."""
    backbone = eager_backbone(tiny_qwen, lora)
    batch = first_batch(tiny_qwen, world / "train", "sft", 1)
    with FlopCounterMode(display=False) as counter:
        logps, _ = backbone.response_logprobs(batch["inputs"])
        (-logps.sum()).backward()
    counted = ModelFlops.of(backbone.hf).step(batch["work"])
    assert counted == pytest.approx(counter.get_total_flops(), rel=tolerance)


@pytest.mark.parametrize("pack", [True, False])
def test_counted_reference_forward_matches_the_measured_one(tiny_qwen, groups, pack):
    """The reference's forward on one group with shared image features. Eager attention computes
    the padded square of each row, so the measured count is the counted one with the spans of full
    rows: the packed row's prompt-sharing spans, and each critique's padding, are saved work."""
    backbone = eager_backbone(tiny_qwen)
    batch = first_batch(tiny_qwen, groups, "preference_group", 1)
    features = backbone.image_features(batch["inputs"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.group_logprobs(batch, features, pack=pack)
    flops = ModelFlops.of(backbone.hf)
    work = dict(batch["packed_work" if pack else "work"])
    rows, row = (
        (1, work["tokens"]) if pack else (batch["inputs"]["input_ids"].shape[0], batch["inputs"]["input_ids"].shape[1])
    )
    assert work["spans"] < rows * row**2 if pack else work["spans"] <= rows * row**2
    padded = {
        **work,
        "tokens": rows * row,
        "spans": rows * row**2,
        "patches": 0,
        "patch_spans": 0,
    }  # the features are given
    forward = flops.step(padded, reference_forward=True) - flops.step(padded)
    assert forward == pytest.approx(counter.get_total_flops(), rel=0.015)


def test_peaks_are_dense_half_precision_figures_of_the_named_gpu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("NVIDIA A800-SXM4-80GB", "bf16-true") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "32-true") is None, "no half-precision peak for a float32 run"
    assert peak_flops("Tesla T4", "16-mixed") is None


class WorkRecorder(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        work, reference = module.step_work(batch)
        self.batches.append(
            (work["tokens"], len(batch["ids"]), ModelFlops.of(module.backbone.hf).step(work, reference))
        )


def test_throughput_logs_rates_over_its_window_of_optimizer_steps(tiny_qwen, world, tmp_path):
    peak = 1e-3
    cli = fit(
        tmp_path,
        tiny_qwen,
        world / "train",
        max_steps=4,
        limit_val_batches=0,
        trainer={
            "accumulate_grad_batches": 2,
            "callbacks": [
                {"class_path": "carevl.callbacks.Throughput", "init_args": {"window": 2, "peak_tflops": peak}},
                {"class_path": "tests.test_flops.WorkRecorder"},
            ],
        },
    )
    rows = [r for r in metrics(tmp_path) if r.get("train/tokens_per_s")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3], "the first optimizer step (warm-up) is left out"
    last = rows[-1]
    assert float(last["train/mfu"]) == pytest.approx(float(last["train/tflops_per_s"]) / peak, rel=1e-5)
    recorder = next(
        c for c in cli.trainer.callbacks if type(c).__name__ == "WorkRecorder"
    )  # imported again by class path
    assert len(recorder.batches) == 8
    tokens, samples, flops = (
        sum(column) for column in zip(*recorder.batches[-4:])
    )  # the window: steps 3 and 4, 2 batches each
    assert float(last["train/samples_per_s"]) / float(last["train/tokens_per_s"]) == pytest.approx(
        samples / tokens, rel=1e-5
    )
    assert float(last["train/tflops_per_s"]) * 1e12 / float(last["train/tokens_per_s"]) == pytest.approx(
        flops / tokens, rel=1e-5
    )
