"""Training losses over LLaVA logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_token_losses(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position and its mask, ``[B, L-1]`` each (fp32).

    ``labels`` are unshifted, -100 where there is no loss (as HF models take them).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    return tok, (shift_labels != -100).float()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean next-token loss on its labelled positions.

    Unlike the token mean, a one-word answer weighs as much as a ten-word caption.
    """
    tok, mask = shifted_token_losses(logits, labels)
    return ((tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)).mean()


def token_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over all labelled positions of the batch (HF's rule)."""
    tok, mask = shifted_token_losses(logits, labels)
    return (tok * mask).sum() / mask.sum().clamp_min(1.0)
