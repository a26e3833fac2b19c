"""VaryModel: a CNN with a configurable number of layers and a linear or convolutional ganglion-cell layer.

Also holds the hidden conv layer (ConvBlock) and the layer-count checks that RetinotopicModel shares.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.recording import DataBundle, WindowSet
from trainer.errors import ConfigError
from trainer.models import register
from trainer.models.layers import GaussianNoise, activation
from trainer.models.stacked import (
    LinearStackedConv2d,
    check_model_args,
    check_stackable,
    plan_maps,
    positive_batch_norm,
)

STA_MAX_SAMPLES = 20_000  # training windows averaged for the receptive-field estimate of prepare()
STA_BATCH = 256  # windows gathered at a time (40 x 50 x 50 float32 windows: about 100 MB)


class ConvBlock(nn.Module):
    """One hidden layer: conv (plain, or linearly stacked 3x3s) -> positive-scale batch norm -> noise -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        out_shape: tuple[int, int, int],
        bias: bool = True,
        stackconvs: bool = False,
        drop_p: float = 0.0,
        bnorm: bool = True,
        bnorm_d: int = 1,
        bn_moment: float = 0.01,
        noise: float = 0.05,
        activ_fxn: str = "ReLU",
    ):
        super().__init__()
        if stackconvs:
            self.conv: nn.Module = LinearStackedConv2d(in_channels, out_channels, kernel_size, bias=bias,
                                                       drop_p=drop_p)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias)
        self.bn = positive_batch_norm(bnorm_d, out_shape, bn_moment) if bnorm else nn.Identity()
        self.noise = GaussianNoise(noise)
        self.act = activation(activ_fxn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.noise(self.bn(self.conv(x))))


def check_layer_counts(model: str, n_layers: int, chans: Sequence[int], ksizes: Sequence[int],
                       n_kernels: int, why: str) -> None:
    """ConfigError unless there are n_layers >= 1, a chans entry per hidden layer and n_kernels ksizes."""
    if n_layers < 1:
        raise ConfigError(f"{model}: n_layers must be >= 1 (the last layer is the ganglion-cell layer), got "
                          f"{n_layers} (in hyperparams): set n_layers to 1 or more")
    if len(chans) < n_layers - 1:
        raise ConfigError(f"{model}: n_layers {n_layers} has {n_layers - 1} hidden layers but chans {list(chans)} "
                          f"has {len(chans)} entries (in hyperparams): give one chans entry per hidden layer or "
                          "lower n_layers")
    if len(ksizes) < n_kernels:
        raise ConfigError(f"{model}: n_layers {n_layers} needs {n_kernels} ksizes ({why}) but ksizes "
                          f"{list(ksizes)} has {len(ksizes)} (in hyperparams): add entries to ksizes or lower "
                          "n_layers")


def layer_names(n_hidden: int, gc: str | None) -> list[str]:
    """Names of the conv layers for messages: hidden layers conv1.., then the GC conv when there is one."""
    names = [f"layer {i + 1} (conv{i + 1})" for i in range(n_hidden)]
    return names + ([f"layer {n_hidden + 1} ({gc})"] if gc else [])


def hidden_blocks(img_shape: tuple[int, int, int], chans: Sequence[int], ksizes: Sequence[int],
                  sizes: Sequence[tuple[int, int]], **block_settings: Any) -> nn.ModuleList:
    """One hidden ConvBlock per chans/ksizes entry, with output map sizes `sizes` (from plan_maps)."""
    blocks = nn.ModuleList()
    in_channels = img_shape[0]
    for c, k, (h, w) in zip(chans, ksizes, sizes, strict=True):
        blocks.append(ConvBlock(in_channels, int(c), int(k), (int(c), h, w), **block_settings))
        in_channels = int(c)
    return blocks


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


@register("VaryModel")
class VaryModel(nn.Module):
    """n_layers layers: n_layers-1 hidden ConvBlocks, then a ganglion-cell (GC) layer, batch norm and softplus.

    GC layer: linear over the flattened last map (`readout`), or, with convgc, a conv with one output channel
    per cell (`gc_conv`) whose map is read for each cell at its own position `positions[cell] = (row, col)` in
    GC-map coordinates. Positions start at the map centre; `prepare(data)` moves each to the peak of the cell's
    receptive field estimated from the training data.
    """

    def __init__(
        self,
        n_units: int = 5,
        img_shape: Sequence[int] = (40, 50, 50),
        n_layers: int = 3,
        chans: Sequence[int] = (8, 8),
        ksizes: Sequence[int] = (15, 11, 11),
        bnorm: bool = True,
        bnorm_d: int = 1,
        bias: bool = True,
        gc_bias: bool = False,
        softplus: bool = True,
        noise: float = 0.05,
        bn_moment: float = 0.01,
        activ_fxn: str = "ReLU",
        stackconvs: bool = False,
        convgc: bool = False,
        drop_p: float = 0.0,
    ):
        super().__init__()
        name = "VaryModel"
        self.img_shape = check_model_args(name, img_shape, bnorm_d, n_units)
        n_hidden = n_layers - 1
        why = "one per hidden layer and one for the ganglion-cell conv" if convgc else "one per hidden layer"
        check_layer_counts(name, n_layers, chans, ksizes, n_hidden + int(convgc), why)
        hidden_k = [int(k) for k in ksizes[:n_hidden]]
        if stackconvs:
            check_stackable(f"{name} with stackconvs", hidden_k)
        kernels = [int(k) for k in ksizes[:n_hidden + int(convgc)]]
        layers = list(zip(layer_names(n_hidden, "ganglion-cell conv" if convgc else None), kernels, strict=True))
        sizes = plan_maps(name, self.img_shape, layers)  # every layer fits, or a ConfigError names the first
        self.n_units = n_units
        self.convgc = convgc
        hidden_chans = [int(c) for c in chans[:n_hidden]]
        self.feature_shapes = [(c, h, w) for c, (h, w) in zip(hidden_chans, sizes[:n_hidden], strict=True)]
        self.hidden = hidden_blocks(
            self.img_shape, hidden_chans, hidden_k, sizes[:n_hidden], bias=bias, stackconvs=stackconvs,
            drop_p=drop_p, bnorm=bnorm, bnorm_d=bnorm_d, bn_moment=bn_moment, noise=noise, activ_fxn=activ_fxn)
        last = self.feature_shapes[-1] if n_hidden else self.img_shape  # (C, H, W) seen by the GC layer
        if convgc:
            height, width = sizes[-1]
            self.gc_conv = nn.Conv2d(last[0], n_units, kernels[-1], bias=gc_bias)
            self.gc_shape = (n_units, height, width)
            centre = torch.tensor([(height - 1) // 2, (width - 1) // 2])
            self.register_buffer("positions", centre.repeat(n_units, 1))  # (n_units, 2) long: (row, col)
        else:
            self.readout = nn.Linear(last[0] * last[1] * last[2], n_units, bias=gc_bias)
        self.bn_out = nn.BatchNorm1d(n_units, momentum=bn_moment) if bnorm else nn.Identity()
        self.out_act = nn.Softplus() if softplus else nn.Identity()

    def conv_layers(self) -> dict[str, nn.Module]:
        """The hidden conv layers by name (conv1, conv2, ...; not the GC layer), for pruning their channels."""
        return {f"conv{i + 1}": block.conv for i, block in enumerate(self.hidden)}

    def gc_map(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional GC layer's map (B, n_units, H, W), before each cell is read at its position."""
        for block in self.hidden:
            x = block(x)
        return self.gc_conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.convgc:
            rows, cols = self.positions[:, 0], self.positions[:, 1]
            cells = torch.arange(self.n_units, device=x.device)
            x = self.gc_map(x)[:, cells, rows, cols]  # (B, n_units): cell i at its own (row, col)
        else:
            for block in self.hidden:
                x = block(x)
            x = self.readout(x.flatten(1))
        return self.out_act(self.bn_out(x))

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
        if not self.convgc:
            raise ConfigError("VaryModel reads cells at positions only with convgc true (in hyperparams)")
        if data.n_cells != self.n_units or tuple(data.img_shape) != self.img_shape:
            raise ConfigError(
                f"VaryModel was built for {self.n_units} cells and img_shape {list(self.img_shape)} but the data has "
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
