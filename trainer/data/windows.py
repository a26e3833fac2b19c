"""Samples of a loaded recording, held on the device: a WindowSet gathers history windows (frames s..s+h-1 ->
the rate at frame s+h) from a stimulus stored once, in batches; a DataBundle is a recording's train/val/test
WindowSets with its cells and stimulus normalisation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.errors import ConfigError


class WindowSet:
    """Samples of a stimulus held once: sample k = frames s..s+h-1 (oldest first, frames as channels),
    target = rates[s+h], s = starts[k]."""

    def __init__(self, stimulus: torch.Tensor, rates: torch.Tensor, starts: torch.Tensor, history: int,
                 mean: float, std: float):
        if stimulus.ndim != 3 or rates.ndim != 2 or rates.shape[0] != stimulus.shape[0]:
            raise ValueError(f"need stimulus (T, H, W) and rates (T, n_cells); got {tuple(stimulus.shape)} "
                             f"and {tuple(rates.shape)}")
        starts = starts.to(device=stimulus.device, dtype=torch.int64)
        if starts.numel() and (int(starts.min()) < 0 or int(starts.max()) + history >= stimulus.shape[0]):
            raise ValueError(f"window starts must lie in [0, {stimulus.shape[0] - history}) "
                             f"for history {history}")
        self.stimulus = stimulus  # (T, H, W) in the stored dtype, shared between WindowSets of one split
        self.rates = rates  # (T, n_cells) float32 (float64 for a float64 model): the dtype of the samples
        self.starts = starts  # (N,) int64
        self.history = int(history)
        self.mean = float(mean)
        self.std = float(std)
        self._offsets = torch.arange(self.history, device=stimulus.device)

    def __len__(self) -> int:
        return self.starts.numel()

    @property
    def n_cells(self) -> int:
        """Number of cells (columns of the targets)."""
        return self.rates.shape[1]

    @property
    def targets(self) -> torch.Tensor:
        """Rates at the target frames, in sample order: (N, n_cells)."""
        return self.rates[self.starts + self.history]

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the samples at positions `idx`: x (B, h, H, W) z-scored, y (B, n_cells), both in the rates' dtype
        (float32 unless the recording was loaded for a float64 model)."""
        s = self.starts[torch.as_tensor(idx, device=self.starts.device)]
        frames = (s[:, None] + self._offsets).reshape(-1)  # only this batch's frames are copied
        x = self.stimulus.index_select(0, frames).view(len(s), self.history, *self.stimulus.shape[1:])
        x = x.to(self.rates.dtype).sub_(self.mean).div_(self.std)  # in place: one float copy of the batch
        return x, self.rates[s + self.history]

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches covering each sample once; shuffle reorders samples, not a window's frames.
        drop_last leaves out a last partial batch (training does, as the original: a batch of one sample would
        make batch norm fail)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.starts.device)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            yield self.get(order[i:i + batch_size])

    def to(self, device: str | torch.device) -> WindowSet:
        """This WindowSet on `device` (moving two WindowSets separately copies a shared stimulus twice)."""
        return WindowSet(self.stimulus.to(device), self.rates.to(device), self.starts.to(device),
                         self.history, self.mean, self.std)


@dataclass
class DataBundle:
    """A loaded recording: train/val/test windows, the chosen cells and the stimulus normalisation."""

    train: WindowSet
    val: WindowSet
    test: WindowSet
    n_cells: int
    cell_ids: list[int]  # row indices into the file's response arrays
    img_shape: tuple[int, int, int]  # (history, H, W)
    stim_mean: float  # training statistics, saved with the model
    stim_std: float
    path: Path
    test_repeats: np.ndarray | None  # (n_repeats, n_test_samples, n_cells) aligned with test samples, or None
    cells_source: str = "the config"  # where cell_ids came from (see trainer/data/cells.py)

    def norm_stats(self) -> dict:
        """The stimulus normalisation, to save with a model so it sees new stimuli the way it was trained."""
        return {"mean": self.stim_mean, "std": self.stim_std}
