"""Evaluation metrics: Pearson correlation between predicted and recorded firing rates, per cell."""

import torch


def pearson_per_cell(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column (cell) of pred vs target, shape (B, n) -> (n,); float64, constant columns give 0."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() != 2:
        raise ValueError(f"expected (batch, n_cells) tensors, got shape {tuple(pred.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("cannot correlate an empty batch: pred and target have no rows")
    x = pred.detach().to(torch.float64)
    y = target.detach().to(torch.float64)
    # Test constancy exactly: after subtracting a rounded mean a constant column can leave tiny nonzero residues.
    constant = (x.amax(dim=0) == x.amin(dim=0)) | (y.amax(dim=0) == y.amin(dim=0))
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    cov = (x * y).sum(dim=0)
    norm = torch.sqrt((x * x).sum(dim=0) * (y * y).sum(dim=0))
    defined = ~constant & (norm > 0)
    r = torch.where(defined, cov / torch.where(defined, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return r.clamp(-1.0, 1.0)


def mean_pearson(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over cells of the per-cell Pearson r, the headline validation score."""
    return pearson_per_cell(pred, target).mean().item()
