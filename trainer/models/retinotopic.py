"""RetinotopicModel: a fully convolutional CNN whose last map has one channel per cell, read out by a learned
"one-hot" probability map over positions (OneHotReadout).

Layer order as the original's (models.py: RetinotopicModel): hidden layers, a conv with one channel per cell and a
bias (`bias`, not gc_bias), positive-scale batch norm per channel, softplus (always: the original ignores
`softplus` here), then the one-hot read-out. The learnt one-hot maps are this model's scientific output.
"""

from collections.abc import Sequence

import torch
from torch import nn

from trainer.models import register
from trainer.models.layers import BN_EPS
from trainer.models.stacked import PositiveBatchNorm2d, check_model_args, check_stackable, plan_maps
from trainer.models.vary import check_layer_counts, hidden_blocks, layer_names

EPS = 1e-12  # floor of a row's weight sum, so a row the L1 penalty drove to all zeros does not divide by 0


class OneHotReadout(nn.Module):
    """Reads each cell's output from its own channel as an expectation over positions under a learned distribution.

    Per cell, raw weights w (n_units, H*W); the distribution is p = |w| / sum(|w|) (|w| rather than softplus, so
    an L1 penalty on w drives p towards one position: softplus(0) would leave a uniform floor), and
    output_cell = sum_pos p[cell, pos] * map[cell, pos]. The gradient of w_pos is (map_pos - output) / sum(|w|)
    (signed), non-zero from the first step for the constant init too, wherever the map is not flat.
    """

    def __init__(self, n_units: int, map_shape: tuple[int, int], rand_init: bool = False):
        super().__init__()
        self.n_units = int(n_units)
        self.map_shape = (int(map_shape[0]), int(map_shape[1]))
        n_pos = self.map_shape[0] * self.map_shape[1]
        init = torch.rand(self.n_units, n_pos) if rand_init else torch.full((self.n_units, n_pos), 1.0 / n_pos)
        self.weight = nn.Parameter(init)

    def probs(self) -> torch.Tensor:
        """Each cell's distribution over positions (n_units, H*W): non-negative rows that sum to 1; differentiable."""
        positive = self.weight.abs()
        return positive / positive.sum(dim=1, keepdim=True).clamp_min(EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_units, H, W) maps -> (B, n_units) outputs."""
        return (x.flatten(2) * self.probs()).sum(dim=2)

    def extra_repr(self) -> str:
        return f"n_units={self.n_units}, map_shape={self.map_shape}"


@register("RetinotopicModel")
class RetinotopicModel(nn.Module):
    """n_layers-1 hidden ConvBlocks, a conv with one channel per cell (`gc_conv`, bias from `bias`), positive-scale
    batch norm per channel (`gc_bn`), softplus, then a OneHotReadout (`onehot`). Same hidden layers as VaryModel
    (stackconvs, positive-scale batch norm)."""

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
        noise: float = 0.05,
        bn_moment: float = 0.01,
        activ_fxn: str = "ReLU",
        stackconvs: bool = False,
        drop_p: float = 0.0,
        rand_onehot: bool = False,
    ):
        super().__init__()
        name = "RetinotopicModel"
        self.img_shape = check_model_args(name, img_shape, bnorm_d, n_units)
        n_hidden = n_layers - 1
        check_layer_counts(name, n_layers, chans, ksizes, n_layers,
                           "one per hidden layer and one for the per-cell conv")
        kernels = [int(k) for k in ksizes[:n_layers]]
        if stackconvs:
            check_stackable(f"{name} with stackconvs", kernels[:n_hidden])
        layers = list(zip(layer_names(n_hidden, "per-cell conv"), kernels, strict=True))
        sizes = plan_maps(name, self.img_shape, layers)
        hidden_chans = [int(c) for c in chans[:n_hidden]]
        self.n_units = n_units
        self.feature_shapes = [(c, h, w) for c, (h, w) in zip(hidden_chans, sizes[:n_hidden], strict=True)]
        self.hidden = hidden_blocks(
            self.img_shape, hidden_chans, kernels[:n_hidden], sizes[:n_hidden], bias=bias, stackconvs=stackconvs,
            drop_p=drop_p, bnorm=bnorm, bnorm_d=bnorm_d, bn_moment=bn_moment, noise=noise, activ_fxn=activ_fxn)
        in_channels = hidden_chans[-1] if n_hidden else self.img_shape[0]
        self.gc_conv = nn.Conv2d(in_channels, n_units, kernels[-1], bias=bias)
        self.gc_shape = (n_units, *sizes[-1])
        self.gc_bn = PositiveBatchNorm2d(n_units, eps=BN_EPS, momentum=bn_moment) if bnorm else nn.Identity()
        self.out_act = nn.Softplus()
        self.onehot = OneHotReadout(n_units, sizes[-1], rand_init=rand_onehot)

    def conv_layers(self) -> dict[str, nn.Module]:
        """The hidden conv layers by name (conv1, conv2, ...; not the per-cell conv), for pruning their channels."""
        return {f"conv{i + 1}": block.conv for i, block in enumerate(self.hidden)}

    def hidden_units(self) -> dict[str, nn.Module]:
        """Per hidden layer, the module whose output is the layer's units for the analyses (see BNCNN's): each
        block's batch norm."""
        return {f"conv{i + 1}": block.bn for i, block in enumerate(self.hidden)}

    def onehot_probs(self) -> torch.Tensor:
        """Each cell's read-out distribution over the last map's positions (n_units, H*W), differentiable."""
        return self.onehot.probs()

    def onehot_weights(self) -> torch.Tensor:
        """The raw one-hot weights (n_units, H*W) the distributions are made from, for an L1 penalty."""
        return self.onehot.weight

    def gc_map(self, x: torch.Tensor) -> torch.Tensor:
        """The per-cell rate map (B, n_units, H, W) that the one-hot read-out reads: conv, batch norm, softplus."""
        for block in self.hidden:
            x = block(x)
        return self.out_act(self.gc_bn(self.gc_conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.onehot(self.gc_map(x))
