"""Losses and log-prob helpers as pure tensor functions.

Log-probs are taken at response positions only: the language model head is applied to the hidden
states that predict a response token, never to image or prompt positions, so no full-vocabulary
logits exist over the (long) image and prompt part of a sequence. Over many response tokens the
head runs in chunks (`token_logprobs`), so only one chunk's logits exist at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from carevl.encoding import IGNORE_INDEX


def _logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int | None = None
) -> torch.Tensor:
    """(N,) log pi(target) for N rows of hidden states (N, H) through the head (H -> vocabulary).

    Cross-entropy keeps its float32 log-softmax, N x vocabulary, for the backward pass: 4.9 GB for
    8,000 response tokens over Qwen2-VL's 151,936 entries. With `chunk`, rows go through the head
    `chunk` at a time, and each chunk is recomputed in the backward pass (non-reentrant checkpoint,
    through the head module): one chunk's logits exist at a time, for one more head forward per
    chunk. The values and gradients are the same. Not for a head whose weight is released between
    its forward and its backward (ZeRO-3: `Backbone.head_chunk`).
    """
    if not chunk or hidden.shape[0] <= chunk:
        return _logprobs(hidden, targets, head)
    pieces = zip(hidden.split(chunk), targets.split(chunk))
    if not torch.is_grad_enabled():
        return torch.cat([_logprobs(h, t, head) for h, t in pieces])
    return torch.cat([checkpoint(_logprobs, h, t, head, use_reentrant=False) for h, t in pieces])


def response_token_logprobs(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens.

    Args:
        hidden: (B, T, H) last hidden states; position t predicts token t + 1.
        labels: (B, T) token ids at response positions, IGNORE_INDEX elsewhere.
        head: the language model head (H -> vocabulary).
        chunk: rows through the head at a time (`token_logprobs`); None: all at once.
    Returns:
        logps: (N,) log pi(token) for the N response tokens of the batch, row-major order.
        rows: (N,) the batch row of each of them.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = token_logprobs(hidden[:, :-1][mask], targets[mask], head, chunk)
    rows = mask.nonzero()[:, 0]
    return logps, rows


def sequence_logprobs(logps: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B,) summed log-prob of each sequence's response from per-token log-probs and their rows."""
    return torch.zeros(batch_size, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)


def sft_loss(
    logps: torch.Tensor, weights: torch.Tensor | None = None, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Token-mean negative log-likelihood of response tokens, optionally weighted per sample."""
    if logps.numel() == 0:
        raise ValueError("no response tokens in the batch: every label is masked")
    if weights is None:
        return -logps.mean()
    token_weights = weights[rows].to(logps.dtype)
    return -(logps * token_weights).sum() / token_weights.sum().clamp_min(1e-8)


def dpo_group_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    group: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO over groups of one chosen against many rejected responses.

    For each rejected response j of group g: loss_j = -log sigmoid(beta * (mu_g - nu_j)), with
    mu_g = log pi(chosen_g) - log pi_ref(chosen_g) and nu_j = log pi(rejected_j) - log pi_ref(rejected_j)
    (summed response log-probs). The loss is the mean over all pairs of the batch.

    Args:
        policy_chosen, reference_chosen: (G,) log-probs of each group's chosen response.
        policy_rejected, reference_rejected: (R,) log-probs of every rejected response.
        group: (R,) the group (index into the chosen tensors) of each rejected response.
        beta: the DPO temperature.
    Returns:
        the loss and detached statistics: per-pair losses, reward accuracy (pairs whose chosen
        reward is higher), the share of groups whose chosen beats all its rejected, mean margin,
        mean chosen and rejected rewards (beta x log-ratio) and log-probs.
    """
    if policy_rejected.shape != reference_rejected.shape or policy_rejected.shape != group.shape:
        raise ValueError("rejected log-probs, reference log-probs and group indices must have the same shape")
    if policy_chosen.shape != reference_chosen.shape:
        raise ValueError("chosen log-probs and reference log-probs must have the same shape")
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margins = chosen_rewards[group] - rejected_rewards
    losses = -F.logsigmoid(margins)
    with torch.no_grad():
        wins = (margins > 0).float()
        worst = torch.ones_like(chosen_rewards).scatter_reduce(0, group, wins, reduce="amin", include_self=True)
        stats = {
            "pair_losses": losses.detach(),
            "reward_accuracy": wins.mean(),
            "chosen_beats_all": worst[torch.unique(group)].mean(),
            "margin": margins.mean(),
            "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(),
            "chosen_logp": policy_chosen.detach().mean(),
            "rejected_logp": policy_rejected.detach().mean(),
        }
    return losses.mean(), stats
