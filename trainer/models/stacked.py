"""Linearly stacked 3x3 convolutions, positive-scale batch norm, and the BNCNN built from them.

Also holds the argument checks and feature-map planning shared by the models that use these blocks
(LinearStackedBNCNN here, VaryModel and RetinotopicModel in their own modules).
"""

from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError
from trainer.models import register
from trainer.models.layers import BN_EPS, GaussianNoise, activation, conv_out_size, output_activation
from trainer.models.readout import ConvGCReadout

# ------------------------------------------------------------------------------------------------------------
# checks shared by the models of this family


def check_model_args(model: str, img_shape: Sequence[int], bnorm_d: int, n_units: int) -> tuple[int, int, int]:
    """Check the settings every conv model shares and return img_shape as (history, height, width)."""
    if len(img_shape) != 3:
        raise ConfigError(
            f"{model}: img_shape must be [history, height, width], got {list(img_shape)} (in hyperparams)"
        )
    if bnorm_d not in (1, 2):
        raise ConfigError(
            f"{model}: bnorm_d must be 1 (per unit and location) or 2 (per channel), got {bnorm_d} "
            "(in hyperparams)"
        )
    if n_units < 1:
        raise ConfigError(f"{model}: the model needs at least one unit to predict, got n_units {n_units}")
    history, height, width = (int(s) for s in img_shape)
    return history, height, width


def check_stackable(model: str, ksizes: Sequence[int]) -> None:
    """ConfigError unless every kernel size can be built from 3x3 convolutions: odd and at least 3."""
    bad = [int(k) for k in ksizes if k < 3 or k % 2 == 0]
    if bad:
        raise ConfigError(
            f"{model}: ksizes {list(ksizes)} has {bad}, but stacked 3x3 convolutions only make odd kernel "
            "sizes >= 3 (in hyperparams): use odd ksizes such as 15 or 11"
        )


def plan_maps(model: str, img_shape: Sequence[int], layers: Sequence[tuple[str, int]]) -> list[tuple[int, int]]:
    """(height, width) after each named valid k x k conv layer; a ConfigError names the first that does not fit."""
    sizes: list[tuple[int, int]] = [(int(img_shape[1]), int(img_shape[2]))]
    for name, k in layers:
        h, w = sizes[-1]
        out = (conv_out_size(h, k), conv_out_size(w, k))
        if min(out) <= 0:
            chain = " -> ".join(f"{a}x{b}" for a, b in [*sizes, out])
            raise ConfigError(
                f"{model}: {name} (ksize {k}) does not fit its {h}x{w} input: img_shape {list(img_shape)} with "
                f"ksizes {[k for _, k in layers]} gives maps {chain} (in hyperparams): use smaller ksizes, "
                "fewer layers or a larger img_shape"
            )
        sizes.append(out)
    return sizes[1:]


# ------------------------------------------------------------------------------------------------------------
# building blocks


class LinearStackedConv2d(nn.Module):
    """A k x k valid convolution built as (k-1)/2 linear 3x3 convolutions: same receptive field, fewer weights.

    No nonlinearity sits between the 3x3 convolutions (only dropout, when drop_p > 0), so the stack is linear and
    `collapse()` returns the equivalent single k x k convolution (exact in eval mode, where dropout is off).
    Intermediate maps have `out_channels` channels; only the last convolution has a bias.

    Pruning: every output channel c comes from the last convolution alone, so zeroing its `weight[c]` and
    `bias[c]` silences channel c. `self.weight` and `self.bias` are those two parameters of the last convolution,
    so code written for nn.Conv2d prunes a stack the same way.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 drop_p: float = 0.0):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ConfigError(
                f"a stack of 3x3 convolutions makes odd kernel sizes >= 3 only, got {kernel_size} (in "
                "hyperparams: ksizes): use an odd kernel size such as 15 or 11"
            )
        if not 0 <= drop_p < 1:
            raise ConfigError(f"drop_p must be in [0, 1), got {drop_p} (in hyperparams): set drop_p to e.g. 0.1")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        n_convs = (self.kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            nn.Conv2d(self.in_channels if i == 0 else self.out_channels, self.out_channels, 3,
                      bias=bias and i == n_convs - 1)
            for i in range(n_convs)
        )
        self.dropout = nn.Dropout(drop_p) if drop_p > 0 else nn.Identity()

    @property
    def weight(self) -> nn.Parameter:
        """The last 3x3 convolution's weight: zeroing weight[c] (and bias[c]) silences output channel c."""
        return self.convs[-1].weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The stack's only bias, that of the last 3x3 convolution (None when built with bias=False)."""
        return self.convs[-1].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](x)
        for conv in self.convs[1:]:
            x = conv(self.dropout(x))
        return x

    @torch.no_grad()
    def collapse(self) -> nn.Conv2d:
        """The single k x k convolution this stack computes (in eval mode), e.g. to inspect its filters."""
        first = self.convs[0]
        weight = first.weight  # (out, in, kh, kw), grows by 2 per conv
        bias = first.bias
        for conv in self.convs[1:]:
            # composing two cross-correlations = one whose kernel is the full convolution of the two kernels,
            # summed over the channels between them: batch = input channel, channels = middle channel
            pad = (conv.weight.shape[-2] - 1, conv.weight.shape[-1] - 1)
            weight = F.conv2d(weight.transpose(0, 1), conv.weight.flip(-2, -1), padding=pad).transpose(0, 1)
            if bias is not None:  # a constant map through a conv: each output gets sum(kernel) x input constant
                bias = conv.weight.sum((2, 3)) @ bias
            if conv.bias is not None:
                bias = conv.bias.clone() if bias is None else bias + conv.bias
        single = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        single.weight.copy_(weight)
        if bias is not None:
            single.bias.copy_(bias)
        return single

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, n_convs={len(self.convs)}"


class PositiveBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose scale is |weight|, so normalisation never flips a unit's sign (the raw weight may be < 0).

    Use the concrete PositiveBatchNorm1d / PositiveBatchNorm2d / PositiveFlatBatchNorm; running statistics and
    momentum behave as in torch's batch norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or not self.track_running_stats
        scale = self.weight.abs() if self.weight is not None else None
        return F.batch_norm(x, self.running_mean, self.running_var, scale, self.bias, use_batch_stats, factor,
                            self.eps)


class PositiveBatchNorm1d(PositiveBatchNorm, nn.BatchNorm1d):
    """Positive-scale batch norm over (B, C) or (B, C, L) inputs, one affine per feature."""


class PositiveBatchNorm2d(PositiveBatchNorm, nn.BatchNorm2d):
    """Positive-scale batch norm over (B, C, H, W) maps, one affine per channel (bnorm_d 2)."""


class PositiveFlatBatchNorm(PositiveBatchNorm1d):
    """Positive-scale batch norm with one affine per unit and location (bnorm_d 1): over the flattened map."""

    def __init__(self, shape: Sequence[int], momentum: float = 0.01, eps: float = BN_EPS):
        super().__init__(prod(shape), eps=eps, momentum=momentum)
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1)).view(-1, *self.shape)


def positive_batch_norm(bnorm_d: int, shape: tuple[int, int, int], momentum: float) -> PositiveBatchNorm:
    """The positive-scale batch norm of a conv layer with output `shape`: per unit and location (1) or channel (2)."""
    if bnorm_d == 1:
        return PositiveFlatBatchNorm(shape, momentum=momentum)
    return PositiveBatchNorm2d(shape[0], eps=BN_EPS, momentum=momentum)


# ------------------------------------------------------------------------------------------------------------
# the model


@register("LinearStackedBNCNN")
class LinearStackedBNCNN(ConvGCReadout, nn.Module):
    """BNCNN whose two large kernels are linear stacks of 3x3 convolutions, with positive-scale batch norms.

    Layout and submodule names as BNCNN: conv1 -> bn1 -> noise1 -> act1 -> conv2 -> ... -> readout (or, with
    convgc, gc_conv read at each cell's position) -> bn_out -> out_act. Every batch norm (the output one too) has
    scale |weight|, as the original's AbsBatchNorm.
    """

    def __init__(
        self,
        n_units: int = 5,
        img_shape: Sequence[int] = (40, 50, 50),
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
        drop_p: float = 0.0,
        convgc: bool = False,
    ):
        super().__init__()
        name = "LinearStackedBNCNN"
        history, height, width = check_model_args(name, img_shape, bnorm_d, n_units)
        n_kernels = 3 if convgc else 2
        if len(chans) < 2 or len(ksizes) < n_kernels:
            raise ConfigError(
                f"{name} needs two conv layers{' and a ganglion-cell conv (convgc)' if convgc else ''}, got chans "
                f"{list(chans)} and ksizes {list(ksizes)} (in hyperparams): give at least two chans and "
                f"{n_kernels} ksizes"
            )
        c1, c2 = int(chans[0]), int(chans[1])
        kernels = [int(k) for k in ksizes[:n_kernels]]
        check_stackable(name, kernels[:2])
        names = ["layer 1 (conv1)", "layer 2 (conv2)", "layer 3 (ganglion-cell conv)"][:n_kernels]
        sizes = plan_maps(name, img_shape, list(zip(names, kernels, strict=True)))
        (h1, w1), (h2, w2) = sizes[:2]
        self.n_units = n_units
        self.img_shape = (history, height, width)
        self.convgc = convgc
        self.feature_shapes = [(c1, h1, w1), (c2, h2, w2)]  # feature-map shape after each conv layer

        def norm(shape: tuple[int, int, int]) -> nn.Module:
            return positive_batch_norm(bnorm_d, shape, bn_moment) if bnorm else nn.Identity()

        self.conv1 = LinearStackedConv2d(history, c1, kernels[0], bias=bias, drop_p=drop_p)
        self.bn1 = norm(self.feature_shapes[0])
        self.noise1 = GaussianNoise(noise)
        self.act1 = activation(activ_fxn)

        self.conv2 = LinearStackedConv2d(c1, c2, kernels[1], bias=bias, drop_p=drop_p)
        self.bn2 = norm(self.feature_shapes[1])
        self.noise2 = GaussianNoise(noise)
        self.act2 = activation(activ_fxn)

        if convgc:
            self._init_convgc(c2, kernels[2], sizes[2], gc_bias)
        else:
            self.readout = nn.Linear(c2 * h2 * w2, n_units, bias=gc_bias)
        self.bn_out = PositiveBatchNorm1d(n_units, eps=BN_EPS, momentum=bn_moment) if bnorm else nn.Identity()
        self.out_act = output_activation(softplus)

    def conv_layers(self) -> dict[str, nn.Module]:
        """The intermediate conv layers (the stacks) by name, for pruning: see LinearStackedConv2d's docstring."""
        return {"conv1": self.conv1, "conv2": self.conv2}

    def hidden_units(self) -> dict[str, nn.Module]:
        """Per hidden layer, the module whose output is the layer's units for the analyses (see BNCNN's)."""
        return {"conv1": self.bn1, "conv2": self.bn2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.noise1(self.bn1(self.conv1(x))))
        x = self.act2(self.noise2(self.bn2(self.conv2(x))))
        x = self.read_cells(self.gc_conv(x)) if self.convgc else self.readout(x.flatten(1))
        return self.out_act(self.bn_out(x))
