"""The convolutional ganglion-cell layer (convgc) shared by BNCNN, LinearStackedBNCNN and VaryModel.

With convgc the ganglion-cell layer is a conv with one output channel per cell, and each cell is read from its own
channel at one spatial position: the peak of its receptive field, estimated from the training data (a
spike-triggered average). The original (custom_modules.py: GrabUnits) took the positions from a hand-made table of
receptive-field centres and clamped them with a formula that put every cell of the published configs at one
position; reading each cell at its own estimated peak is our fix of that bug.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.windows import DataBundle, WindowSet
from trainer.errors import ConfigError

STA_MAX_SAMPLES = 20_000  # training windows averaged for the receptive-field estimate of prepare()
STA_BATCH = 256  # windows gathered at a time (40 x 50 x 50 float32 windows: about 100 MB)


def sta_energy(windows: WindowSet, max_samples: int = STA_MAX_SAMPLES, batch_size: int = STA_BATCH) -> torch.Tensor:
    """Each cell's receptive-field map (n_cells, H, W): temporal variance of its spike-triggered average.

    The STA is the covariance of the z-scored stimulus window with the cell's rate over up to max_samples
    training windows, evenly spaced in time (no random draw, so the global RNG and the run's seed are untouched).
    """
    n = len(windows)
    if n == 0:
        raise ConfigError("no training samples to estimate receptive fields from: use a longer recording")
    idx = torch.linspace(0, n - 1, min(n, max_samples)).round().long().unique()
    device = windows.stimulus.device
    sum_yx = torch.zeros(windows.n_cells, windows.history, *windows.stimulus.shape[1:], dtype=torch.float64,
                         device=device)
    sum_x = torch.zeros(sum_yx.shape[1:], dtype=torch.float64, device=device)
    sum_y = torch.zeros(windows.n_cells, dtype=torch.float64, device=device)
    for i in range(0, len(idx), batch_size):
        x, y = windows.get(idx[i:i + batch_size])
        sum_yx += torch.einsum("bn,bthw->nthw", y, x).double()
        sum_x += x.sum(0).double()
        sum_y += y.sum(0).double()
    count = len(idx)
    sta = sum_yx / count - (sum_y / count)[:, None, None, None] * (sum_x / count)  # (n_cells, history, H, W)
    return sta.var(dim=1).float()


class ConvGCReadout:
    """Mixin for an nn.Module with a convgc ganglion-cell layer: `gc_conv` (one output channel per cell) and the
    buffer `positions` (n_units, 2), each cell's (row, col) in the GC map. The model sets `n_units`, `img_shape`
    and `convgc`, calls `_init_convgc` in its __init__ and `read_cells` in its forward."""

    n_units: int
    img_shape: tuple[int, int, int]
    convgc: bool
    gc_conv: nn.Conv2d
    positions: torch.Tensor

    def _init_convgc(self, in_channels: int, kernel: int, map_size: tuple[int, int], gc_bias: bool) -> None:
        height, width = map_size
        self.gc_conv = nn.Conv2d(in_channels, self.n_units, kernel, bias=gc_bias)
        self.gc_shape = (self.n_units, height, width)
        centre = torch.tensor([(height - 1) // 2, (width - 1) // 2])
        self.register_buffer("positions", centre.repeat(self.n_units, 1))  # (n_units, 2) long: (row, col)

    def read_cells(self, gc_map: torch.Tensor) -> torch.Tensor:
        """(B, n_units, H, W) GC map -> (B, n_units): cell i read from channel i at its own (row, col)."""
        rows, cols = self.positions[:, 0], self.positions[:, 1]
        cells = torch.arange(self.n_units, device=gc_map.device)
        return gc_map[:, cells, rows, cols]

    def rf_offset(self) -> tuple[int, int]:
        """Input (row, col) minus GC-map (row, col) of the same place: half the total kernel shrinkage."""
        _, height, width = self.img_shape
        return (height - self.gc_shape[1]) // 2, (width - self.gc_shape[2]) // 2

    @torch.no_grad()
    def estimate_positions(self, data: DataBundle, max_samples: int = STA_MAX_SAMPLES) -> torch.Tensor:
        """Each cell's receptive-field peak in GC-map coordinates (n_units, 2), from the training data.

        Peak = argmax of the STA's temporal-variance map smoothed over 3x3 pixels; the input (row, col) minus
        rf_offset() is the GC-map pixel centred there, clamped into the map. A cell whose map is flat keeps its
        current position.
        """
        name = type(self).__name__
        if not self.convgc:
            raise ConfigError(f"{name} reads cells at positions only with convgc true (in hyperparams)")
        if data.n_cells != self.n_units or tuple(data.img_shape) != self.img_shape:
            raise ConfigError(
                f"{name} was built for {self.n_units} cells and img_shape {list(self.img_shape)} but the data has "
                f"{data.n_cells} cells and img_shape {list(data.img_shape)}: build the model from the same config"
            )
        energy = sta_energy(data.train, max_samples=max_samples)
        energy = F.avg_pool2d(energy[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
        width = energy.shape[-1]
        peak = energy.flatten(1).argmax(dim=1)
        row_off, col_off = self.rf_offset()
        rows = (peak // width - row_off).clamp(0, self.gc_shape[1] - 1)
        cols = (peak % width - col_off).clamp(0, self.gc_shape[2] - 1)
        found = torch.stack([rows, cols], dim=1).to(self.positions.device)
        flat = (energy.flatten(1).amax(dim=1) <= 0).to(self.positions.device)
        return torch.where(flat[:, None], self.positions, found)

    def prepare(self, data: DataBundle) -> None:
        """Launcher hook: with convgc, set each cell's read-out position to its receptive-field peak; else nothing."""
        if self.convgc:
            self.positions.copy_(self.estimate_positions(data))
