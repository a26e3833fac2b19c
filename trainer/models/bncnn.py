"""The two-layer batch-normalised CNN of retinal ganglion cells (BNCNN) and a linear-nonlinear (LN) baseline."""

from collections.abc import Sequence

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.models import register
from trainer.models.layers import BN_EPS, GaussianNoise, activation, conv_out_size, output_activation
from trainer.models.readout import ConvGCReadout


class FlatBatchNorm(nn.Module):
    """Batch norm with one affine per unit and location: BatchNorm1d over the flattened map, reshaped back."""

    def __init__(self, shape: tuple[int, int, int], momentum: float = 0.01):
        super().__init__()
        self.shape = tuple(shape)
        n_features = shape[0] * shape[1] * shape[2]
        self.bn = nn.BatchNorm1d(n_features, eps=BN_EPS, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.flatten(1)).view(-1, *self.shape)


def _batch_norm(bnorm_d: int, shape: tuple[int, int, int], momentum: float) -> nn.Module:
    """The batch norm of a conv layer: per unit and location (bnorm_d 1) or per channel (bnorm_d 2)."""
    if bnorm_d == 1:
        return FlatBatchNorm(shape, momentum=momentum)
    return nn.BatchNorm2d(shape[0], eps=BN_EPS, momentum=momentum)


@register("BNCNN")
class BNCNN(ConvGCReadout, nn.Module):
    """Two conv layers (each batch norm, noise, activation), then a linear ganglion-cell readout per unit (or, with
    convgc, a conv with one channel per cell read at the cell's position), batch norm and softplus (or the
    original's Exponential when softplus is off)."""

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
        convgc: bool = False,
    ):
        super().__init__()
        if len(img_shape) != 3:
            raise ConfigError(
                f"img_shape must be [history, height, width], got {list(img_shape)} (in hyperparams)"
            )
        n_kernels = 3 if convgc else 2
        if len(chans) < 2 or len(ksizes) < n_kernels:
            raise ConfigError(
                f"BNCNN needs two conv layers{' and a ganglion-cell conv (convgc)' if convgc else ''}, got chans "
                f"{list(chans)} and ksizes {list(ksizes)} (in hyperparams): give at least two chans and "
                f"{n_kernels} ksizes"
            )
        if bnorm_d not in (1, 2):
            raise ConfigError(
                f"bnorm_d must be 1 (per unit and location) or 2 (per channel), got {bnorm_d} (in hyperparams)"
            )
        if n_units < 1:
            raise ConfigError(f"the model needs at least one unit to predict, got n_units {n_units}")
        history, height, width = (int(s) for s in img_shape)
        c1, c2 = int(chans[0]), int(chans[1])
        k1, k2 = int(ksizes[0]), int(ksizes[1])
        h1, w1 = conv_out_size(height, k1), conv_out_size(width, k1)
        h2, w2 = conv_out_size(h1, k2), conv_out_size(w1, k2)
        maps = [(h1, w1), (h2, w2)]
        if convgc:
            maps.append((conv_out_size(h2, int(ksizes[2])), conv_out_size(w2, int(ksizes[2]))))
        if min(min(m) for m in maps) <= 0:
            chain = " -> ".join(f"{h}x{w}" for h, w in [(height, width), *maps])
            raise ConfigError(
                f"kernels do not fit the input: img_shape {list(img_shape)} with ksizes {list(ksizes)} (the first "
                f"{n_kernels} used) gives feature maps {chain} (in hyperparams): use smaller ksizes or a larger "
                "img_shape"
            )
        self.n_units = n_units
        self.img_shape = (history, height, width)
        self.feature_shapes = [(c1, h1, w1), (c2, h2, w2)]  # feature-map shape after each conv layer
        self.bnorm = bnorm
        self.convgc = convgc

        self.conv1 = nn.Conv2d(history, c1, k1, bias=bias)
        self.bn1 = _batch_norm(bnorm_d, self.feature_shapes[0], bn_moment) if bnorm else nn.Identity()
        self.noise1 = GaussianNoise(noise)
        self.act1 = activation(activ_fxn)

        self.conv2 = nn.Conv2d(c1, c2, k2, bias=bias)
        self.bn2 = _batch_norm(bnorm_d, self.feature_shapes[1], bn_moment) if bnorm else nn.Identity()
        self.noise2 = GaussianNoise(noise)
        self.act2 = activation(activ_fxn)

        if convgc:
            self._init_convgc(c2, int(ksizes[2]), maps[2], gc_bias)
        else:
            self.readout = nn.Linear(c2 * h2 * w2, n_units, bias=gc_bias)
        self.bn_out = nn.BatchNorm1d(n_units, eps=BN_EPS, momentum=bn_moment) if bnorm else nn.Identity()
        self.out_act = output_activation(softplus)

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """The intermediate conv layers by name, for tools (e.g. pruning) that act on their channels."""
        return {"conv1": self.conv1, "conv2": self.conv2}

    def hidden_units(self) -> dict[str, nn.Module]:
        """Per hidden layer, the module whose output (B, C, H, W) is the layer's units for the analyses: its batch
        norm, the pre-activation the original correlated with interneurons (analysis.py: sequential.2, .8)."""
        return {"conv1": self.bn1, "conv2": self.bn2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.noise1(self.bn1(self.conv1(x))))
        x = self.act2(self.noise2(self.bn2(self.conv2(x))))
        x = self.read_cells(self.gc_conv(x)) if self.convgc else self.readout(x.flatten(1))
        return self.out_act(self.bn_out(x))


@register("LN")
class LN(nn.Module):
    """Linear-nonlinear baseline, as the original's LN: dropout (drop_p) on the stimulus, one linear filter per unit
    over the whole stimulus, then softplus (ELU when softplus is off)."""

    def __init__(self, n_units: int = 5, img_shape: Sequence[int] = (40, 50, 50), softplus: bool = True,
                 drop_p: float = 0.0):
        super().__init__()
        if len(img_shape) != 3:
            raise ConfigError(
                f"img_shape must be [history, height, width], got {list(img_shape)} (in hyperparams)"
            )
        if n_units < 1:
            raise ConfigError(f"the model needs at least one unit to predict, got n_units {n_units}")
        self.n_units = n_units
        self.img_shape = tuple(int(s) for s in img_shape)
        history, height, width = self.img_shape
        self.dropout = nn.Dropout(drop_p) if drop_p > 0 else nn.Identity()
        self.readout = nn.Linear(history * height * width, n_units, bias=True)
        self.out_act = nn.Softplus() if softplus else nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.readout(self.dropout(x.flatten(1))))
