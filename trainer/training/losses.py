"""Extra training losses: the semantic 'exactly one position' loss on the one-hot read-out of RetinotopicModel."""

from __future__ import annotations

import torch


def semantic_loss(probs: torch.Tensor) -> torch.Tensor:
    """-log P(exactly one position is on), summed over cells: pushes each cell's map towards a single position.

    probs: (n_cells, L) (or (n_cells, H, W)), each entry the probability that the cell sits at that position.
    For one cell: -log sum_i p_i prod_{j != i} (1 - p_j), computed in log space so that it stays finite and
    differentiable when an entry reaches 0 or 1: log prod_{j != i} (1 - p_j) = S - log(1 - p_i) with
    S = sum_j log(1 - p_j), and the sum over i is a logsumexp.
    """
    if probs.dim() < 2:
        raise ValueError(f"expected probabilities of shape (n_cells, positions), got {tuple(probs.shape)}")
    p = probs.flatten(1)
    info = torch.finfo(p.dtype)
    # Clamping keeps log(1 - p_i) finite at p_i = 1; the subtraction S - log(1 - p_i) then removes it exactly
    # enough (its size is at most -log(eps)), so a one-hot map still scores ~0.
    log_p = p.clamp_min(info.tiny).log()
    log_not_p = torch.log1p(-p.clamp_max(1 - info.eps))
    total = log_not_p.sum(dim=1, keepdim=True)  # S per cell
    log_exactly_one = torch.logsumexp(log_p + total - log_not_p, dim=1)
    return -log_exactly_one.sum()
