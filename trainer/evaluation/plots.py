"""Figures for a run and a search, written as PNG files for MLflow artifacts.

Each function draws on its own matplotlib Figure rendered by the Agg canvas: no display is needed, pyplot's global
state and backend are left alone, and nothing stays in memory after the file is written.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

# matplotlib keeps a font cache in $HOME/.cache unless told otherwise: keep it in the system temp folder (one per
# user, reused; a user's own MPLCONFIGDIR wins).
os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / f"retina-trainer-matplotlib-{os.getuid()}"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

DPI = 110
FILTERS_PER_ROW = 8  # filter panels wrap after this many units


def _figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas (PNG without a display), sized in inches."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG at `path` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------------------------
# one run


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss (train, val) and Pearson r (val, test) per epoch, two panels, the best validation epoch marked."""
    if not history:
        raise ValueError("history is empty: no epoch to plot")
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig = _figure(10, 4)
    ax_loss, ax_r = fig.subplots(1, 2)
    panels = ((ax_loss, (("train_loss", "train"), ("val_loss", "validation")), "loss", "Loss per epoch"),
              (ax_r, (("val_pearson", "validation"), ("test_pearson", "test")), "mean Pearson r over cells",
               "Correlation with recorded rate per epoch"))
    for ax, series, ylabel, title in panels:
        for key, label in series:
            pts = [(e, h[key]) for e, h in zip(epochs, history, strict=True)
                   if h.get(key) is not None and math.isfinite(h[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    val = [(h["val_pearson"], e) for e, h in zip(epochs, history, strict=True)
           if h.get("val_pearson") is not None and math.isfinite(h["val_pearson"])]
    if val:
        best_r, best_epoch = max(val)
        for ax in (ax_loss, ax_r):
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best val r {best_r:.3f} (epoch {best_epoch})")
    for ax in (ax_loss, ax_r):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(fig, path)


def plot_predictions(pred: np.ndarray, target: np.ndarray, cell_ids: Sequence[int], scores: np.ndarray,
                     path: str | Path, bin_s: float = 0.01, window_s: float | None = 10.0,
                     score_name: str = "score") -> Path:
    """Predicted and recorded test rate over time for the best and the worst cell by `scores` (NaN ignored).

    Only the first `window_s` seconds are drawn (None: all), since a minute of 10-ms bins is unreadable at any
    width; the scores in the titles are the caller's, computed over the whole test segment.
    """
    pred, target, scores = np.asarray(pred, float), np.asarray(target, float), np.asarray(scores, float)
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (T, n_cells), got {pred.shape} and {target.shape}")
    n = pred.shape[1]
    if len(cell_ids) != n or scores.shape != (n,):
        raise ValueError(f"need one cell id and one score per cell ({n}), got {len(cell_ids)} and {scores.shape}")
    if np.isfinite(scores).any():
        best, worst = int(np.nanargmax(scores)), int(np.nanargmin(scores))
    else:
        best = worst = 0
    shown = [(best, "best")] if best == worst else [(best, "best"), (worst, "worst")]
    total_s = pred.shape[0] * bin_s
    shown_bins = pred.shape[0] if window_s is None else max(1, min(pred.shape[0], round(window_s / bin_s)))
    time_s = np.arange(shown_bins) * bin_s
    fig = _figure(12, 2.8 * len(shown) + 0.4)
    axes = np.atleast_1d(fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0])
    for ax, (i, which) in zip(axes, shown, strict=True):
        ax.plot(time_s, target[:shown_bins, i], color="0.3", linewidth=1.0, label="recorded (trial average)")
        ax.plot(time_s, pred[:shown_bins, i], color="tab:red", linewidth=1.0, alpha=0.85, label="predicted")
        ax.set(ylabel="firing rate (Hz)", title=f"{which} cell: cell {cell_ids[i]}, {score_name} {scores[i]:.3f} "
               f"(over all {total_s:.1f} s; first {shown_bins * bin_s:.1f} s shown)")
        ax.set_xlim(time_s[0], time_s[-1] if len(time_s) > 1 else time_s[0] + bin_s)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("time in the test segment, from the first predicted bin (s)")
    return _save(fig, path)


def _first_filters(model: nn.Module) -> tuple[np.ndarray, str, str]:
    """The first layer's filters as (units, history, H, W), where they come from, and what one unit is called."""
    for module in model.modules():
        if callable(getattr(module, "collapse", None)):  # a stack of linear convs: its equivalent single kernel
            weight = module.collapse().weight.detach().cpu().numpy()
            return weight, f"first conv layer (a {type(module).__name__}, collapsed to one kernel)", "channel"
        if isinstance(module, nn.Conv2d):
            return module.weight.detach().cpu().numpy(), "first conv layer", "channel"
    shape = getattr(model, "img_shape", None)
    if shape is not None:
        size = int(np.prod(shape))
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.in_features == size:
                weight = module.weight.detach().cpu().numpy().reshape(-1, *shape)
                return weight, "linear filter of each cell (no conv layer)", "cell"
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d and no linear layer over its whole input "
                     f"(img_shape); nothing to plot as first-layer filters")


def plot_filters(model: nn.Module, path: str | Path, bin_s: float = 0.01) -> Path:
    """Spatial map (at the frame of largest spatial variance) and temporal profile (at the map's peak) per filter.

    The filters are those of the first nn.Conv2d in model.modules() (for a stack of linear convs with `collapse()`,
    the equivalent single kernel); a model without one, like LN, shows its linear weights reshaped to (n_cells, h,
    H, W). Frame j of h is the stimulus j bins after the window's start, i.e. (h - j) bins before the predicted bin.
    """
    with torch.no_grad():
        weights, source, unit = _first_filters(model)
    n_units, history = weights.shape[:2]
    lags_ms = -(history - np.arange(history)) * bin_s * 1000
    cols = min(n_units, FILTERS_PER_ROW)
    groups = math.ceil(n_units / cols)
    width = max(1.9 * cols, 6.5)
    fig = _figure(width, 3.9 * groups + 0.7)
    grid = fig.add_gridspec(2 * groups, cols, height_ratios=[1.3, 1] * groups)
    for u in range(n_units):
        g, c = divmod(u, cols)
        w = weights[u]
        frame = int(np.argmax(w.reshape(history, -1).var(axis=1)))
        spatial = w[frame]
        py, px = np.unravel_index(int(np.argmax(np.abs(spatial))), spatial.shape)
        limit = float(np.abs(spatial).max()) or 1.0
        ax = fig.add_subplot(grid[2 * g, c])
        ax.imshow(spatial, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.plot(px, py, marker="+", color="k", markersize=9, markeredgewidth=1.5,
                path_effects=[patheffects.withStroke(linewidth=3.5, foreground="white")])
        ax.set_title(f"{unit} {u}\nmap at {lags_ms[frame]:.0f} ms", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
        ax = fig.add_subplot(grid[2 * g + 1, c])
        ax.axhline(0, color="0.7", linewidth=0.8)
        ax.plot(lags_ms, w[:, py, px], color="k", linewidth=1)
        ax.plot(lags_ms[frame], w[frame, py, px], marker="o", color="tab:red", markersize=4)
        ax.tick_params(labelsize="x-small")
        ax.set_xlabel("time before response (ms)", fontsize="x-small")
        if c == 0:
            ax.set_ylabel("weight at peak", fontsize="x-small")
    note = ("top: spatial map (stimulus pixels) at the frame of largest spatial variance, red > 0 > blue, "
            "+ marks the peak; bottom: the weight at that peak across the history")
    fig.suptitle(f"{type(model).__name__}: {source}\n" + textwrap.fill(note, int(width * 13)), fontsize="medium")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------------
# a search


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def plot_search(rows: list[dict], keys: list[str], metric: str, path: str | Path) -> Path:
    """The metric against each searched hyperparameter, one panel per key, a point per run and a mean per value.

    A key whose values are all numbers gets a numeric x axis (log when positive and spanning 100x or more);
    otherwise its values are categories in sorted order. Rows without a finite metric are left out.
    """
    if not keys:
        raise ValueError("no searched hyperparameters (keys) to plot against")
    scored = [r for r in rows if _is_number(r.get(metric))]
    if not scored:
        raise ValueError(f"no run has a finite value of '{metric}' to plot")
    cols = min(len(keys), 3)
    n_rows = math.ceil(len(keys) / cols)
    fig = _figure(4.2 * cols, 3.4 * n_rows + 0.4)
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    jitter = np.random.default_rng(0)
    for ax, key in zip(axes, keys, strict=False):
        pts = [(r[key], float(r[metric])) for r in scored if key in r]
        xs, ys = [p[0] for p in pts], np.array([p[1] for p in pts])
        if xs and all(_is_number(x) for x in xs):
            x = np.array(xs, dtype=float)
            values = np.unique(x)
            ax.scatter(x, ys, alpha=0.6, s=22, label="run")
            ax.plot(values, [ys[x == v].mean() for v in values], color="k", marker="_", markersize=14,
                    linestyle="none", label="mean")
            if values.min() > 0 and values.max() / values.min() >= 100:
                ax.set_xscale("log")
        else:
            labels = [str(v) for v in xs]
            cats = sorted(set(labels))
            pos = np.array([cats.index(s) for s in labels], dtype=float)
            ax.scatter(pos + jitter.uniform(-0.12, 0.12, len(pos)), ys, alpha=0.6, s=22, label="run")
            ax.plot(range(len(cats)), [ys[pos == i].mean() for i in range(len(cats))], color="k", marker="_",
                    markersize=14, linestyle="none", label="mean")
            ax.set_xticks(range(len(cats)), cats, rotation=30 if max(map(len, cats), default=0) > 6 else 0,
                          fontsize="small")
            ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key} ({len(pts)} runs)")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    return _save(fig, path)
