"""Vision attention by image size: the same outputs and gradients as transformers' per-image loop,
with one attention call per image size and one read of the sizes per forward."""

import copy

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from carevl.backbone import Backbone
from carevl.vision_attention import attend_by_size


class Calls(TorchFunctionMode):
    """Counts calls of the watched torch functions and tensor methods."""

    def __init__(self, *watched):
        super().__init__()
        self.watched, self.counts = watched, {w: 0 for w in watched}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.watched:
            self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def test_attending_by_size_equals_attending_image_by_image():
    torch.manual_seed(0)
    sizes = [4, 9, 4, 16, 9]
    q, k, v = (torch.randn(sum(sizes), 3, 8, requires_grad=True) for _ in range(3))
    one_by_one = torch.cat(
        [
            F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in chunk), scale=0.3).transpose(0, 1)
            for chunk in zip(*(torch.split(t, sizes) for t in (q, k, v)))
        ]
    )
    with Calls(F.scaled_dot_product_attention) as calls:
        batched = attend_by_size(q, k, v, sizes, scale=0.3)
    assert calls.counts[F.scaled_dot_product_attention] == 3, "one call per distinct size"
    torch.testing.assert_close(batched, one_by_one)
    expected = torch.autograd.grad(one_by_one.square().sum(), (q, k, v))
    torch.testing.assert_close(torch.autograd.grad(batched.square().sum(), (q, k, v)), expected)
    # images of one size: a single call on views
    same = [5, 5, 5]
    q3, k3, v3 = (t[:15] for t in (q, k, v))
    alone = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[i * 5 : (i + 1) * 5].transpose(0, 1) for t in (q3, k3, v3)), scale=0.3
            ).transpose(0, 1)
            for i in range(3)
        ]
    )
    torch.testing.assert_close(attend_by_size(q3, k3, v3, same, scale=0.3), alone)


def test_the_vision_tower_gives_the_same_features_with_fewer_calls_and_reads(tiny_qwen):
    per_image = Backbone(model=tiny_qwen, batch_vision_attention=False)
    by_size = Backbone(model=tiny_qwen)
    per_image.build(), by_size.build()
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 4], [1, 6, 2]])  # three sizes over four images
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14)
    depth = len(by_size.hf.model.visual.blocks)
    counts = {}
    for name, backbone in (("per_image", per_image), ("by_size", by_size)):
        with Calls(F.scaled_dot_product_attention, torch.Tensor.tolist) as calls:
            counts[name] = (backbone.hf.model.visual(pixels, grid_thw=grid).last_hidden_state, calls.counts)
    (expected, per_image_calls), (features, by_size_calls) = counts["per_image"], counts["by_size"]
    torch.testing.assert_close(features, expected)
    assert per_image_calls[F.scaled_dot_product_attention] == 4 * depth
    assert by_size_calls[F.scaled_dot_product_attention] == 3 * depth
    # transformers 5.23 reads the sizes back three times in every layer (once per q, k, v split); here once in all
    assert per_image_calls[torch.Tensor.tolist] - by_size_calls[torch.Tensor.tolist] == 3 * depth - 1

    # a copy (the DPO reference) attends with its own weights
    twin = copy.deepcopy(by_size.hf)
    attn = twin.model.visual.blocks[0].attn
    assert attn.forward.__self__ is attn
    with torch.no_grad():
        attn.proj.weight.mul_(2)
    assert not torch.allclose(twin.model.visual(pixels, grid_thw=grid).last_hidden_state, features)


def test_a_trained_vision_tower_gets_the_same_gradients_under_checkpointing(tiny_qwen):
    """With the tower trainable and checkpointed, each layer's recomputation reads the cached sizes
    of its own forward; the gradients equal transformers' per-image attention."""
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 4]])
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14)
    grads = []
    for batched in (False, True):
        backbone = Backbone(
            model=tiny_qwen, freeze_vision=False, gradient_checkpointing=True, batch_vision_attention=batched
        )
        backbone.build()
        visual = backbone.hf.model.visual
        visual(pixels, grid_thw=grid).pooler_output.square().sum().backward()
        grads.append({n: p.grad for n, p in visual.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], msg=name)
