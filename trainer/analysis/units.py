"""What the analyses read of a model: its rates for a batch of windows, and its hidden layers' units.

A hidden layer's units are the output (B, C, H, W) of the module the model names in `hidden_units()`: the batch
norm after each hidden conv, the pre-activation that the original correlated with interneurons (analysis.py:
analyze_model, layers sequential.2 and sequential.8 of its BNCNN). A model without hidden layers (LN, a VaryModel
with n_layers 1) names none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.training.trainer import as_rates

BATCH = 256  # windows per forward pass (the Trainer's scoring batch)


@dataclass(frozen=True)
class Layer:
    """One hidden layer: its name (conv1, conv2, ...: the names pruning uses), the module whose output is its units,
    and their shape (channels, height, width)."""

    name: str
    module: nn.Module
    shape: tuple[int, int, int]


def hidden_layers(model: nn.Module) -> list[Layer]:
    """The model's hidden layers, input side first; [] for a model without any."""
    units = model.hidden_units() if callable(getattr(model, "hidden_units", None)) else {}
    shapes = getattr(model, "feature_shapes", [])
    return [Layer(name, module, tuple(int(s) for s in shape))
            for (name, module), shape in zip(units.items(), shapes, strict=True)]


def first_linear(model: nn.Module) -> nn.Module | None:
    """The model's first layer when it is linear in the stimulus (a conv, a stack of linear convs or LN's linear
    read-out), so that a gradient with respect to its output maps back to the stimulus through its weights alone."""
    convs = model.conv_layers() if callable(getattr(model, "conv_layers", None)) else {}
    if convs:
        return next(iter(convs.values()))
    readout = getattr(model, "readout", None)
    if isinstance(readout, nn.Linear) and readout.in_features == int(np.prod(model.img_shape)):
        return readout  # LN: dropout (off in eval mode), then one linear filter per cell over the stimulus
    return None


@contextmanager
def probe(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Keep the latest output of each module while inside the block: outs[i] is modules[i]'s."""
    outs: list[torch.Tensor | None] = [None] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def keep(module: nn.Module, args: Any, out: torch.Tensor, i: int = i) -> None:
            outs[i] = out
        handles.append(m.register_forward_hook(keep))
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def rates(model: nn.Module, cfg: dict[str, Any], inputs: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """The model's predicted rates (N, n_cells) in Hz, float64, for windows (N, history, H, W) in its input units
    (eval mode: no noise, batch norms at their running statistics)."""
    model.eval()
    param = next(model.parameters())
    out = []
    for i in range(0, len(inputs), batch_size):
        x = torch.as_tensor(np.ascontiguousarray(inputs[i:i + batch_size]), dtype=param.dtype, device=param.device)
        out.append(as_rates(cfg, model(x)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))
