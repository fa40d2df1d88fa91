"""Losses and log-prob helpers as pure tensor functions.

Log-probs are taken at response positions only: the language model head is applied to the hidden
states that predict a response token, never to image or prompt positions, so no full-vocabulary
logits exist over the (long) image and prompt part of a sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carevl.encoding import IGNORE_INDEX


def response_token_logprobs(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens.

    Args:
        hidden: (B, T, H) last hidden states; position t predicts token t + 1.
        labels: (B, T) token ids at response positions, IGNORE_INDEX elsewhere.
        head: the language model head (H -> vocabulary).
    Returns:
        logps: (N,) log pi(token) for the N response tokens of the batch, row-major order.
        rows: (N,) the batch row of each of them.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask]).float()
    logps = -F.cross_entropy(logits, targets[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    return logps, rows


def sequence_logprobs(logps: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B,) summed log-prob of each sequence's response from per-token log-probs and their rows."""
    return torch.zeros(batch_size, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)


def sft_loss(logps: torch.Tensor, weights: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood of response tokens, optionally weighted per sample."""
    if logps.numel() == 0:
        raise ValueError("no response tokens in the batch: every label is masked")
    if weights is None:
        return -logps.mean()
    token_weights = weights[rows].to(logps.dtype)
    return -(logps * token_weights).sum() / token_weights.sum().clamp_min(1e-8)
