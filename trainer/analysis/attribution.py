"""Attribution: how much of each cell's response each channel of each hidden layer carries (Tanaka et al. 2019).

Integrated gradients of each cell's output with respect to the layer's units (utils.integrated_gradient with
`chans` one cell: a straight path from a zero stimulus, `alpha_steps` points; trainer/training/pruning.py holds
the one implementation, which pruning uses as well). A channel's importance for a cell is the mean over samples of
|the attribution summed over the channel's positions| (the original's pruning importance with abssum false);
`fraction` is its share of the layer's total, `top` the channels in order of importance. `completeness` checks
the attribution: the mean over samples and cells of |sum of all units' attribution - (F(x) - F(0))| over the mean
|F(x) - F(0)| (0 for an exact path integral; it shrinks as alpha_steps grows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.analysis.units import hidden_layers
from trainer.training.pruning import integrated_gradients

TOP = 3  # channels listed as `top`


def compute(model: nn.Module, x: np.ndarray, alpha_steps: int, batch_size: int = 250) -> dict[str, Any]:
    """Per hidden layer and cell: channel fractions, top channels and the completeness of the attribution, for the
    windows `x` (N, history, H, W) in the model's input units."""
    model.eval()
    param = next(model.parameters())
    xt = torch.as_tensor(x, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        change = (model(xt) - model(torch.zeros_like(xt[:1]))).double().cpu().numpy()  # F(x) - F(0): (N, n_cells)
    layers: dict[str, Any] = {}
    for layer in hidden_layers(model):
        per_channel = np.concatenate([  # (n_cells, N, C): each chunk summed over positions at once
            integrated_gradients(model, layer.module, xt[i:i + batch_size], alpha_steps, batch_size, per_cell=True)
            .flatten(3).sum(-1).double().cpu().numpy() for i in range(0, len(xt), batch_size)], axis=1)
        importance = np.abs(per_channel).mean(axis=1)  # (n_cells, C)
        total = importance.sum(axis=1, keepdims=True)
        fraction = np.divide(importance, total, out=np.zeros_like(importance), where=total > 0)
        err = np.abs(per_channel.sum(-1) - change.T).mean() / max(float(np.abs(change).mean()), 1e-12)
        layers[layer.name] = {
            "channels": layer.shape[0],
            "fraction": fraction.tolist(),
            "top": [np.argsort(-f, kind="stable")[:TOP].tolist() for f in fraction],
            "completeness": float(err),
        }
    return layers


def channels_for(fraction: list[float], share: float = 0.9) -> int:
    """How many of the most important channels carry `share` of a cell's attribution."""
    f = np.sort(np.asarray(fraction))[::-1]
    return int(np.searchsorted(np.cumsum(f), share - 1e-12) + 1) if f.sum() > 0 else 0


def metrics(layers: dict[str, Any]) -> dict[str, float]:
    """Per layer: analysis_attr_<layer>_top_fraction (the mean over cells of the top channel's share) and
    analysis_attr_<layer>_channels_90 (the mean number of channels that carry 90% of a cell's attribution)."""
    out = {}
    for name, layer in layers.items():
        out[f"analysis_attr_{name}_top_fraction"] = float(np.mean([max(f) for f in layer["fraction"]]))
        out[f"analysis_attr_{name}_channels_90"] = float(np.mean([channels_for(f) for f in layer["fraction"]]))
    return out
