import math

import pytest
import torch

from carevl.encoding import IGNORE_INDEX
from carevl.judge import warmup_cosine
from carevl.losses import response_token_logprobs, sequence_logprobs, sft_loss, token_logprobs


def test_response_logprobs_match_hand_computation():
    # Vocabulary of 3, identity head: logits are the hidden states themselves.
    head = torch.nn.Linear(3, 3, bias=False)
    head.weight.data = torch.eye(3)
    hidden = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX]])  # position 0 predicts 2, position 1 predicts 0
    logps, rows = response_token_logprobs(hidden, labels, head)
    expected_first = 3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
    expected_second = 0.0 - math.log(3.0)
    assert torch.allclose(logps, torch.tensor([expected_first, expected_second]), atol=1e-6)
    assert rows.tolist() == [0, 0]
    assert sft_loss(logps).item() == pytest.approx(-(expected_first + expected_second) / 2, abs=1e-6)


def saved_bytes(function) -> tuple[torch.Tensor, int]:
    """What `function` returns, and the bytes autograd keeps from it for the backward pass."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return function(), total


def test_chunked_head_gives_the_same_logprobs_and_gradients_and_keeps_no_logits():
    torch.manual_seed(0)
    rows, width, vocabulary = 64, 8, 1000
    head = torch.nn.Linear(width, vocabulary, bias=False)
    hidden = torch.randn(rows, width, requires_grad=True)
    targets = torch.randint(vocabulary, (rows,))
    results = {}
    for chunk in (None, 16, 48):
        logps, kept = saved_bytes(lambda chunk=chunk: token_logprobs(hidden, targets, head, chunk))
        grads = torch.autograd.grad((logps * torch.linspace(-1, 1, rows)).sum(), (hidden, head.weight))
        results[chunk] = (logps, grads, kept)
    whole, _, whole_kept = results[None]
    assert whole_kept >= rows * vocabulary * 4, "cross-entropy keeps its float32 log-softmax"
    for chunk in (16, 48):
        logps, grads, kept = results[chunk]
        torch.testing.assert_close(logps, whole)
        for got, expected in zip(grads, results[None][1]):
            torch.testing.assert_close(got, expected)
        assert kept < rows * vocabulary * 4 / 20, f"chunks of {chunk} keep no logits, only their inputs"
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(hidden, targets, head, 16), whole)


def test_sequence_logprobs_and_weighted_loss():
    logps = torch.tensor([-1.0, -2.0, -3.0])
    rows = torch.tensor([0, 0, 2])
    assert sequence_logprobs(logps, rows, 3).tolist() == [-3.0, 0.0, -3.0]
    weights = torch.tensor([1.0, 5.0, 3.0])
    # tokens weighted 1, 1, 3: (1 + 2 + 9) / 5
    assert sft_loss(logps, weights, rows).item() == pytest.approx(12 / 5)


def test_loss_refuses_batches_without_response_tokens():
    with pytest.raises(ValueError, match="no response tokens"):
        sft_loss(torch.tensor([]))
    with pytest.raises(ValueError, match="do not match"):
        response_token_logprobs(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long), torch.nn.Identity())


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_dpo_group_loss_matches_hand_computation():
    from carevl.losses import dpo_group_loss

    beta = 0.1
    # Two groups: group 0 has one chosen and two rejected; group 1 one chosen and one rejected.
    policy_chosen, reference_chosen = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -19.0])
    policy_rejected, reference_rejected = torch.tensor([-15.0, -9.0, -25.0]), torch.tensor([-14.0, -10.0, -24.0])
    group = torch.tensor([0, 0, 1])
    loss, stats = dpo_group_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, group, beta)
    # mu = (2, -1); nu = (-1, 1, -1). Margins beta*(mu_g - nu_j): 0.3, 0.1, 0.0.
    margins = [0.3, 0.1, 0.0]
    expected = [math.log1p(math.exp(-m)) for m in margins]
    assert torch.allclose(stats["pair_losses"], torch.tensor(expected), atol=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert stats["reward_accuracy"].item() == pytest.approx(2 / 3)
    assert stats["chosen_beats_all"].item() == pytest.approx(0.5)  # group 1's margin is 0: not a win
    assert stats["margin"].item() == pytest.approx(sum(margins) / 3)
    assert stats["chosen_reward"].item() == pytest.approx(beta * (2 - 1) / 2)


def test_dpo_group_loss_equals_pairs_one_by_one():
    from carevl.losses import dpo_group_loss

    generator = torch.Generator().manual_seed(0)
    chosen, ref_chosen = torch.randn(3, generator=generator) * 5, torch.randn(3, generator=generator) * 5
    rejected, ref_rejected = torch.randn(7, generator=generator) * 5, torch.randn(7, generator=generator) * 5
    group = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    _, stats = dpo_group_loss(chosen, rejected, ref_chosen, ref_rejected, group, beta=0.01)
    for j in range(7):
        g = group[j]
        single, _ = dpo_group_loss(
            chosen[g : g + 1],
            rejected[j : j + 1],
            ref_chosen[g : g + 1],
            ref_rejected[j : j + 1],
            torch.tensor([0]),
            beta=0.01,
        )
        assert abs(single.item() - stats["pair_losses"][j].item()) < 1e-6
    with pytest.raises(ValueError, match="same shape"):
        dpo_group_loss(chosen, rejected, ref_chosen, ref_rejected, group[:3], beta=0.01)
