"""Receptive fields: spike-triggered averages of the model's units to white noise, and their space-time parts.

The STA of a unit is the mean over white-noise windows of the gradient of the unit's response with respect to the
window (the original's utils.compute_sta: "the average of instantaneous receptive fields"), with its noise:
Gaussian, standard deviation `contrast` (1), independent per pixel, at the model's own input shape (the original
made 50x50 noise and cut 40-frame windows whatever the model). Each noise frame is held `analysis_sta_hold` bins
(3, as the recordings hold their frames; the original drew a new frame every bin): a nonlinear model's receptive
field depends on the stimulus' statistics, and it is measured best in those it was trained on. Units: each output
cell's rate, and for each hidden layer the central unit of every channel (the original's revcor_sta "uses the
central unit").

The gradient is taken at the output of the model's first layer, which is linear in the stimulus, averaged there,
and mapped back through that layer's weights: the same mean (a linear map commutes with the average), without a
backward pass through the first convolution per unit and sample, its most expensive part on a CPU.

Each cell's STA is split by SVD into a spatial map and a temporal profile (the rank-1 part, `separability` its
share of the STA's energy) with the signs of trainer/analysis/sta.py: the temporal profile's largest lobe is
positive, the map's net weight gives the polarity (`polarity`, `label`), and an ON cell's centre is positive, an
OFF cell's negative. Time index 0 is the oldest frame of the window, history-1 the frame just before the
predicted bin.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from matplotlib import patheffects
from torch import nn

from trainer.analysis import stimuli
from trainer.analysis.sta import decompose, pearson
from trainer.analysis.units import BATCH, first_linear, hidden_layers, probe
from trainer.data.h5write import atomic_h5
from trainer.evaluation.plots import _figure, _save
from trainer.training.trainer import as_rates

N_FRAMES = 2000  # noise frames (the original: 10000; 2000 give the same maps to r > 0.999, benchmarks/analysis.py)
CONTRAST = 1.0
HOLD = 3  # bins each noise frame is held, as the recordings' frames (analysis_sta_hold; the original: 1)
PER_ROW = 8


@dataclass
class Fields:
    """The receptive fields of one model: cells (n_cells, history, H, W) and each hidden layer's channels."""

    cells: np.ndarray
    layers: dict[str, np.ndarray]
    spatial: np.ndarray = field(init=False)  # (n_cells, H, W), signed: the centre is > 0 for ON
    temporal: np.ndarray = field(init=False)  # (n_cells, history), largest lobe > 0
    polarity: np.ndarray = field(init=False)  # +1 ON, -1 OFF
    center: np.ndarray = field(init=False)  # (n_cells, 2) row, col of the map's peak (local centroid)
    separability: np.ndarray = field(init=False)  # share of each STA's energy in its rank-1 part

    def __post_init__(self) -> None:
        parts = [decompose(s) for s in self.cells]
        self.spatial = np.stack([p[0] for p in parts])
        self.temporal = np.stack([p[1] for p in parts])
        self.polarity = np.array([p[2] for p in parts], dtype=np.int64)
        self.center = np.stack([p[3] for p in parts])
        self.separability = np.array([p[4] for p in parts])

    @property
    def labels(self) -> list[str]:
        return ["ON" if p > 0 else "OFF" for p in self.polarity]


def white_noise(n_frames: int, size: tuple[int, int], hold: int, contrast: float, rng: np.random.Generator
                ) -> np.ndarray:
    """Gaussian noise frames (n_frames, H, W) float32 of standard deviation `contrast`, independent per pixel, each
    frame held `hold` frames."""
    frames = contrast * rng.standard_normal((-(-n_frames // hold), *size))
    return np.repeat(frames, hold, axis=0)[:n_frames].astype(np.float32)


def compute(model: nn.Module, cfg: dict[str, Any], seed: int, n_frames: int = N_FRAMES,
            contrast: float = CONTRAST, batch_size: int = BATCH, hold: int = HOLD) -> Fields:
    """The STAs of every cell and of the central unit of every hidden-layer channel (see the module docstring)."""
    model.eval()
    param = next(model.parameters())
    history, height, width = (int(s) for s in cfg["img_shape"])
    layers = hidden_layers(model)
    first = first_linear(model)
    rng = np.random.default_rng(seed)
    noise = white_noise(n_frames, (height, width), hold, contrast, rng)
    n_windows = n_frames - history
    sums: list[torch.Tensor] | None = None
    modules = ([first] if first is not None else []) + [layer.module for layer in layers]
    with probe(modules) as outs, torch.enable_grad():
        for start in range(0, n_windows, batch_size):
            stop = min(start + batch_size, n_windows)
            x = torch.as_tensor(stimuli.windows(noise[start:stop + history], history), dtype=param.dtype,
                                device=param.device)
            if first is None:
                x.requires_grad_(True)
            out = as_rates(cfg, model(x))
            at = outs[0] if first is not None else x
            hidden = outs[1:] if first is not None else outs
            targets = [out[:, k] for k in range(out.shape[1])]
            for layer, act in zip(layers, hidden, strict=True):
                c, h_, w_ = layer.shape
                targets += [act[:, ch, h_ // 2, w_ // 2] for ch in range(c)]
            grads = [torch.autograd.grad(t.sum(), at, retain_graph=i < len(targets) - 1)[0].sum(0)
                     for i, t in enumerate(targets)]
            sums = grads if sums is None else [a + g for a, g in zip(sums, grads, strict=True)]
    assert sums is not None
    means = [s / n_windows for s in sums]
    stas = [_through(first, m, cfg["img_shape"]) for m in means] if first is not None else \
        [m.detach().cpu().numpy() for m in means]
    n_cells = int(out.shape[1])
    cells = np.stack(stas[:n_cells])
    by_layer, i = {}, n_cells
    for layer in layers:
        by_layer[layer.name] = np.stack(stas[i:i + layer.shape[0]])
        i += layer.shape[0]
    return Fields(cells, by_layer)


def _through(first: nn.Module, grad_out: torch.Tensor, img_shape: list[int]) -> np.ndarray:
    """A gradient at the output of the linear first layer, as a gradient at the stimulus (history, H, W)."""
    param = next(first.parameters())
    z = torch.zeros((1, *img_shape), dtype=param.dtype, device=param.device, requires_grad=True)
    with torch.enable_grad():
        y = first(z.flatten(1) if isinstance(first, nn.Linear) else z)
        (g,) = torch.autograd.grad(y, z, grad_outputs=grad_out.unsqueeze(0))
    return g[0].detach().cpu().numpy()


def truth_scores(fields: Fields, recording: Path | None, cell_ids: list[int], hold: int = HOLD
                 ) -> dict[str, Any] | None:
    """Against a synthetic recording's ground truth (ground_truth/sta: the spike-triggered average of each cell's
    noise-free rate on the training stimulus, trainer/data/synth.py), split the same way: per cell the Pearson r of
    the spatial map and of the temporal profile with the true cell's, and whether the ON/OFF label is the true
    cell's. None without a ground truth of the model's shape (real recordings) or of this noise (`hold`)."""
    if recording is None or not Path(recording).is_file():
        return None
    with h5py.File(recording, "r") as f:
        if "ground_truth/sta" not in f:
            return None
        node = f["ground_truth/sta"]
        if int(node.attrs.get("hold", 1)) != hold:
            return None
        true_sta = np.asarray(node, dtype=np.float64)
    if true_sta.shape[1:] != fields.cells.shape[1:] or max(cell_ids) >= true_sta.shape[0]:
        return None
    rows = []
    for i, cell in enumerate(cell_ids):
        spatial, temporal, polarity, _, _ = decompose(true_sta[cell])
        rows.append({"cell": int(cell), "spatial_r": pearson(fields.spatial[i], spatial),
                     "temporal_r": pearson(fields.temporal[i], temporal),
                     "true_label": "ON" if polarity > 0 else "OFF",
                     "label_right": polarity == int(fields.polarity[i])})
    return {"cells": rows}


def summary(fields: Fields, truth: dict[str, Any] | None) -> dict[str, float]:
    """The receptive fields' metrics (analysis_rf_*)."""
    out = {"analysis_rf_on_fraction": float(np.mean(fields.polarity > 0)),
           "analysis_rf_separability_mean": float(fields.separability.mean())}
    if truth is not None:
        cells = truth["cells"]
        out["analysis_rf_truth_r_mean"] = float(np.mean([c["spatial_r"] for c in cells]))
        out["analysis_rf_truth_r_min"] = float(np.min([c["spatial_r"] for c in cells]))
        out["analysis_rf_truth_temporal_r_mean"] = float(np.mean([c["temporal_r"] for c in cells]))
        out["analysis_rf_truth_label_right"] = float(np.mean([c["label_right"] for c in cells]))
    return out


def write(fields: Fields, cell_ids: list[int], path: Path, settings: dict[str, Any],
          truth: dict[str, Any] | None) -> Path:
    """receptive_fields.h5: cells/{sta, spatial, temporal, center, polarity, label, cell_ids, separability} and
    layers/<layer>/sta, with the settings as attributes (written atomically)."""
    with atomic_h5(path) as f:
        g = f.create_group("cells")
        g["sta"] = fields.cells.astype(np.float32)
        g["spatial"] = fields.spatial.astype(np.float32)
        g["temporal"] = fields.temporal.astype(np.float32)
        g["center"] = fields.center
        g["polarity"] = fields.polarity
        g["label"] = np.array(fields.labels, dtype=h5py.string_dtype())
        g["cell_ids"] = np.asarray(cell_ids, dtype=np.int64)
        g["separability"] = fields.separability
        if truth is not None:
            g["truth_spatial_r"] = np.array([c["spatial_r"] for c in truth["cells"]])
        for name, sta in fields.layers.items():
            f.create_group(f"layers/{name}")["sta"] = sta.astype(np.float32)
        f.attrs.update({k: v for k, v in settings.items() if v is not None})
        f.attrs["time_axis"] = "index 0 is the oldest frame of the window, history-1 the frame before the predicted bin"
    return path


def plot(fields: Fields, cell_ids: list[int], path: Path, truth: dict[str, Any] | None = None,
         bin_s: float = 0.01) -> Path:
    """Per cell: its spatial map (colour bar: STA units, red > 0 > blue; + the centre) above its temporal profile."""
    n_cells, history = fields.temporal.shape
    lags_ms = -(history - np.arange(history)) * bin_s * 1000
    cols = min(n_cells, PER_ROW)
    groups = math.ceil(n_cells / cols)
    width = max(2.2 * cols, 6.5)
    fig = _figure(width, 4.2 * groups + 0.8)
    grid = fig.add_gridspec(2 * groups, cols, height_ratios=[1.4, 1] * groups)
    for i in range(n_cells):
        g, c = divmod(i, cols)
        # the map in STA units at the temporal peak: spatial x temporal value there
        scale = float(fields.temporal[i].max())
        m = fields.spatial[i] * scale
        limit = float(np.abs(m).max()) or 1.0
        ax = fig.add_subplot(grid[2 * g, c])
        im = ax.imshow(m, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.plot(fields.center[i, 1], fields.center[i, 0], marker="+", color="k", markersize=9, markeredgewidth=1.5,
                path_effects=[patheffects.withStroke(linewidth=3.5, foreground="white")])
        title = f"cell {cell_ids[i]}: {fields.labels[i]}"
        if truth is not None:
            title += f"\nr with truth {truth['cells'][i]['spatial_r']:.2f}"
        ax.set_title(title, fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize="xx-small")
        ax = fig.add_subplot(grid[2 * g + 1, c])
        ax.axhline(0, color="0.7", linewidth=0.8)
        ax.plot(lags_ms, fields.temporal[i], color="k", linewidth=1)
        ax.tick_params(labelsize="x-small")
        ax.set_xlabel("time before response (ms)", fontsize="x-small")
        if c == 0:
            ax.set_ylabel("temporal profile", fontsize="x-small")
    note = ("spike-triggered average of each cell's predicted rate to Gaussian white noise, split by SVD: spatial map "
            "(at the temporal peak; ON cells have a positive centre) and temporal profile (largest lobe positive)")
    fig.suptitle("Model receptive fields\n" + textwrap.fill(note, int(width * 13)), fontsize="medium")
    return _save(fig, path)
