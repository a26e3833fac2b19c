"""VaryModel: a CNN with a configurable number of layers and a linear or convolutional ganglion-cell layer.

Also holds the hidden conv layer (ConvBlock) and the layer-count checks that RetinotopicModel shares.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.models import register
from trainer.models.layers import BN_EPS, GaussianNoise, activation, output_activation
from trainer.models.readout import ConvGCReadout
from trainer.models.stacked import (
    LinearStackedConv2d,
    PositiveBatchNorm1d,
    check_model_args,
    check_stackable,
    plan_maps,
    positive_batch_norm,
)


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


@register("VaryModel")
class VaryModel(ConvGCReadout, nn.Module):
    """n_layers layers: n_layers-1 hidden ConvBlocks, then a ganglion-cell (GC) layer, positive-scale batch norm
    and softplus (or the original's Exponential when softplus is off).

    GC layer: linear over the flattened last map (`readout`), or, with convgc, a conv with one output channel
    per cell (`gc_conv`) whose map is read for each cell at its own position `positions[cell] = (row, col)` in
    GC-map coordinates (trainer/models/readout.py). Positions start at the map centre; `prepare(data)` moves each
    to the peak of the cell's receptive field estimated from the training data.
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
            self._init_convgc(last[0], kernels[-1], sizes[-1], gc_bias)
        else:
            self.readout = nn.Linear(last[0] * last[1] * last[2], n_units, bias=gc_bias)
        # positive-scale, as the original's AbsBatchNorm1d (models.py: VaryModel)
        self.bn_out = PositiveBatchNorm1d(n_units, eps=BN_EPS, momentum=bn_moment) if bnorm else nn.Identity()
        self.out_act = output_activation(softplus)

    def conv_layers(self) -> dict[str, nn.Module]:
        """The hidden conv layers by name (conv1, conv2, ...; not the GC layer), for pruning their channels."""
        return {f"conv{i + 1}": block.conv for i, block in enumerate(self.hidden)}

    def hidden_units(self) -> dict[str, nn.Module]:
        """Per hidden layer, the module whose output is the layer's units for the analyses (see BNCNN's): each
        block's batch norm."""
        return {f"conv{i + 1}": block.bn for i, block in enumerate(self.hidden)}

    def gc_map(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional GC layer's map (B, n_units, H, W), before each cell is read at its position."""
        for block in self.hidden:
            x = block(x)
        return self.gc_conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.convgc:
            x = self.read_cells(self.gc_map(x))  # (B, n_units): cell i at its own (row, col)
        else:
            for block in self.hidden:
                x = block(x)
            x = self.readout(x.flatten(1))
        return self.out_act(self.bn_out(x))
