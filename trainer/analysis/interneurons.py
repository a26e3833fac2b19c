"""Model units against recorded interneurons: for each interneuron, the hidden unit that best predicts its membrane
potential, compared with the same architecture untrained.

Files are in the original's layout (datas.load_interneuron_data): one h5 file per cell type (its name starts with
it: bipolars_late_2012.h5), a group per stimulus; the group `boxes` (the one the original's analysis read:
analysis.get_intr_cors, stim_keys {"boxes"}) holds `stimuli` (T, H, W), binary 0/1, and
`detrended_membrane_potential` (n_cells, T). The stimulus is prepared as the original's prepare_stim did for boxes
(2 x stimulus - 1: contrast -1/+1), padded with zeros to the model's height and width when smaller
(stimuli.spatial_pad), cut into windows of the model's history, and each window's unit responses are paired with
the potential at the frame after it (the potentials from frame `history` on: the original's alignment by the
filter length).

For every unit (layer, channel, row, col) of every hidden layer, Pearson r between its response and each
interneuron's potential, over all windows (intracellular.get_intr_cors, argmax_correlation_recurse_helper): a
unit that barely moves (log std < -12 or log mean |response| < -15) counts r = 0, as does a NaN. The best unit
per interneuron is the argmax of r, first in layer, channel, row, col order on ties. The control is the model's
architecture at its initialisation from the run's seed (the run's own initial weights), scored the same way.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from trainer.analysis import stimuli
from trainer.analysis.units import BATCH, Layer, hidden_layers, probe
from trainer.errors import DataError
from trainer.evaluation.plots import _figure, _save

STIM = "boxes"
STIM_KEY, POT_KEY = "stimuli", "detrended_membrane_potential"
STD_CUTOFF, ABS_MEAN_CUTOFF = -12.0, -15.0  # natural logs, the original's (intracellular.py)
COLUMNS = ("file", "stim", "cell", "layer", "channel", "row", "col", "r")


@dataclass
class Recorded:
    """One file's interneurons on one stimulus: the prepared stimulus (T, H, W) and potentials (n_cells, T)."""

    file: str
    stim: str
    stimulus: np.ndarray
    potentials: np.ndarray


def find_files(paths: list[Path]) -> list[Path]:
    """The interneuron files among `paths`: files as given, folders' *.h5 in name order. A missing path, or a folder
    without .h5 files, is an error."""
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.glob("*.h5") if q.is_file())
            if not found:
                raise DataError(f"interneuron folder {p} holds no .h5 file; give the folder of the cell-type files "
                                "(e.g. bipolars_late_2012.h5) or the files themselves")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"interneuron file or folder not found: {p}")
    return files


def read(path: Path, size: tuple[int, int], history: int) -> Recorded:
    """One file's `boxes` group, checked and prepared; a file of another layout is a DataError naming what it
    lacks."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable h5 file ({exc}); interneuron files are h5") from None
    with f:
        group = f.get(STIM)
        if not isinstance(group, h5py.Group):
            found = ", ".join(sorted(f.keys())) or "nothing"
            raise DataError(f"{path}: no group '{STIM}' (found: {found}); an interneuron file holds "
                            f"{STIM}/{STIM_KEY} (T, H, W) and {STIM}/{POT_KEY} (n_cells, T), the original's layout")
        for key in (STIM_KEY, POT_KEY):
            if not isinstance(group.get(key), h5py.Dataset):
                raise DataError(f"{path}: {STIM}/{key} is missing (found in {STIM}: "
                                f"{', '.join(sorted(group.keys())) or 'nothing'}); the original's layout has "
                                f"{STIM}/{STIM_KEY} and {STIM}/{POT_KEY}")
        stim, pots = group[STIM_KEY], group[POT_KEY]
        if stim.ndim != 3 or pots.ndim != 2 or pots.shape[1] != stim.shape[0]:
            raise DataError(f"{path}: {STIM}/{STIM_KEY} has shape {stim.shape} and {STIM}/{POT_KEY} {pots.shape}; "
                            "they must be (T, H, W) and (n_cells, T) with the same T")
        stimulus = np.asarray(stim, dtype=np.float32)
        potentials = np.asarray(pots, dtype=np.float64)
    if stimulus.shape[0] <= history:
        raise DataError(f"{path}: {stimulus.shape[0]} stimulus frames, not more than the model's history of "
                        f"{history}; the correlation needs windows of {history} frames and a potential after each")
    if stimulus.shape[1] > size[0] or stimulus.shape[2] > size[1]:
        raise DataError(f"{path}: the stimulus is {stimulus.shape[1]}x{stimulus.shape[2]}, larger than the model's "
                        f"input {size[0]}x{size[1]}; crop it to the model's field (smaller ones are padded)")
    if not (np.isfinite(stimulus).all() and np.isfinite(potentials).all()):
        raise DataError(f"{path}: the stimulus or the potentials hold NaN or infinite values")
    return Recorded(path.name, STIM, pad(2 * stimulus - 1, size), potentials)


def pad(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero padding to (H, W), the extra row or column of an odd difference at the end (stimuli.spatial_pad)."""
    dh, dw = size[0] - frames.shape[1], size[1] - frames.shape[2]
    return np.pad(frames, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)))


def correlations(model: nn.Module, rec: Recorded, history: int, batch_size: int = BATCH) -> dict[str, np.ndarray]:
    """Pearson r of every hidden unit with every interneuron: {layer: (n_cells, C, H, W)}, accumulated over
    batches in float64 (no layer's responses are held whole)."""
    layers = hidden_layers(model)
    param = next(model.parameters())
    pots = rec.potentials[:, history:]  # (n_cells, N): potential at the frame after each window
    n = pots.shape[1]
    sums: dict[str, dict[str, np.ndarray]] = {}
    model.eval()
    with probe([layer.module for layer in layers]) as outs, torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x = torch.as_tensor(stimuli.windows(rec.stimulus[start:stop + history], history), dtype=param.dtype,
                                device=param.device)
            model(x)
            p = pots[:, start:stop]
            for layer, act in zip(layers, outs, strict=True):
                a = act.double().cpu().numpy().reshape(stop - start, -1)  # (B, C*H*W)
                s = sums.setdefault(layer.name, {"a": 0, "aa": 0, "abs": 0, "ap": 0})
                s["a"] = s["a"] + a.sum(0)
                s["aa"] = s["aa"] + (a * a).sum(0)
                s["abs"] = s["abs"] + np.abs(a).sum(0)
                s["ap"] = s["ap"] + p @ a
    mp, sp = pots.mean(axis=1), pots.std(axis=1)
    out = {}
    for layer in layers:
        s = sums[layer.name]
        ma = s["a"] / n
        sa = np.sqrt(np.clip(s["aa"] / n - ma * ma, 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (s["ap"] / n - mp[:, None] * ma[None]) / (sp[:, None] * sa[None])
            quiet = (np.log(sa) < STD_CUTOFF) | (np.log(s["abs"] / n) < ABS_MEAN_CUTOFF)
        r = np.where(np.isfinite(r) & (r > -1) & ~quiet[None], r, 0.0)
        out[layer.name] = r.reshape(len(pots), *layer.shape)
    return out


def best_units(cors: dict[str, np.ndarray], rec: Recorded, layers: list[Layer]) -> list[dict[str, Any]]:
    """Per interneuron, its best unit: one row of interneurons.csv."""
    rows = []
    for cell in range(rec.potentials.shape[0]):
        best: dict[str, Any] | None = None
        for layer in layers:
            r = cors[layer.name][cell]
            flat = int(np.argmax(r))  # the first maximum in channel, row, col order
            if best is None or r.flat[flat] > best["r"]:
                ch, row, col = np.unravel_index(flat, r.shape)
                best = {"file": rec.file, "stim": rec.stim, "cell": cell, "layer": layer.name, "channel": int(ch),
                        "row": int(row), "col": int(col), "r": float(r.flat[flat])}
        assert best is not None
        rows.append(best)
    return rows


def analyze(model: nn.Module, control: nn.Module, recorded: list[Recorded], history: int
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The best units of the trained model and of its untrained control, for every recorded interneuron."""
    trained, untrained = [], []
    for rec in recorded:
        trained += best_units(correlations(model, rec, history), rec, hidden_layers(model))
        untrained += best_units(correlations(control, rec, history), rec, hidden_layers(control))
    return trained, untrained


def _key(name: str) -> str:
    """A file name as part of a metric key: its stem, characters other than letters, digits and _ as _."""
    return re.sub(r"[^A-Za-z0-9_]", "_", Path(name).stem)


def metrics(trained: list[dict[str, Any]], untrained: list[dict[str, Any]]) -> dict[str, float]:
    """analysis_intr_r_mean / _max (the original's intr_cor: the mean best r), the control's, their difference, and
    per file analysis_intr_<file>_r_mean / _max."""
    r = np.array([t["r"] for t in trained])
    rc = np.array([t["r"] for t in untrained])
    out = {"analysis_intr_r_mean": float(r.mean()), "analysis_intr_r_max": float(r.max()),
           "analysis_intr_control_r_mean": float(rc.mean()), "analysis_intr_control_r_max": float(rc.max()),
           "analysis_intr_r_gain": float(r.mean() - rc.mean()), "analysis_intr_n_cells": float(len(r))}
    for name in dict.fromkeys(t["file"] for t in trained):
        rs = [t["r"] for t in trained if t["file"] == name]
        out[f"analysis_intr_{_key(name)}_r_mean"] = float(np.mean(rs))
        out[f"analysis_intr_{_key(name)}_r_max"] = float(np.max(rs))
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({**row, "r": f"{row['r']:.6f}"})
    return path


def plot(trained: list[dict[str, Any]], untrained: list[dict[str, Any]], path: Path) -> Path:
    """Each interneuron's best r: trained model against its untrained control."""
    fig = _figure(5.5, 5)
    ax = fig.subplots(1, 1)
    files = list(dict.fromkeys(t["file"] for t in trained))
    for i, name in enumerate(files):
        pairs = [(u["r"], t["r"]) for t, u in zip(trained, untrained, strict=True) if t["file"] == name]
        ax.scatter(*zip(*pairs, strict=True), s=18, label=name, color=f"C{i % 10}")
    lo = min(0.0, min(t["r"] for t in trained + untrained))
    ax.plot([lo, 1], [lo, 1], color="0.6", linestyle="--", linewidth=0.8)
    ax.set_xlabel("best r, untrained control")
    ax.set_ylabel("best r, trained model")
    r, rc = np.mean([t["r"] for t in trained]), np.mean([u["r"] for u in untrained])
    ax.set_title(f"Interneurons: mean best r {r:.3f} trained, {rc:.3f} control", fontsize="medium")
    ax.legend(fontsize="x-small")
    return _save(fig, path)


def n_layers_message(model: nn.Module) -> str | None:
    """Why a model cannot be compared with interneurons (no hidden layers), or None."""
    if hidden_layers(model):
        return None
    return f"{type(model).__name__} has no hidden layers to compare with interneurons"

