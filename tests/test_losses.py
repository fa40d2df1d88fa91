import math

import pytest
import torch

from carevl.encoding import IGNORE_INDEX
from carevl.losses import response_token_logprobs, sequence_logprobs, sft_loss
from carevl.sft import warmup_cosine


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
