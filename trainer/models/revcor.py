"""RevCorLN: the published LN baseline, fitted as the original fitted it (no gradient descent).

The original's `models.RevCorLN` with `training.train_ln` / `fit_ln_nonlin` (@507decb), per cell:

* the linear filter is the reverse correlation of the stimulus windows with the cell's rate, both z-scored by
  their own mean and (population) standard deviation over the training samples, +1e-5 in the divisors
  (`utils.revcor`): sta = mean over samples of ((x - mean_x) / (std_x + 1e-5)) * ((y - mean_y) / (std_y + 1e-5));
* the linear output of a window is sta . (x - mean_x) / (std_x + 1e-7) (`RevCorLN.normalize`, `convolve`);
* the nonlinearity is a polynomial of degree 5 fitted by least squares (`np.polyfit`) to the rates against the
  linear outputs of `fit_size` (15,000) training samples drawn at random with replacement (all of them when there
  are fewer).

Here the filter and the normalisation are folded into one linear layer (`readout`: weight sta / (std_x +
1e-7), bias -mean_x x sum(sta) / (std_x + 1e-7), the same map), so the analyses read it as they read LN's, and the
polynomial's coefficients are a buffer: both are in the state dict and checkpoints. Ours in two details: the
polynomial is fitted in float64 (the original cast to float32 first: a degree-5 Vandermonde system in float32 loses
most of its digits), and a predicted rate below 0 is 0 (a polynomial leaves the range of rates at the extremes of
its input; a negative rate has no Poisson loss). `Trainer` fits it in the run's one epoch (`fit_revcor`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.models import register

DEGREE = 5  # train_ln: fit_ln_nonlin(..., degree=[5], fit_size=15000)
FIT_SIZE = 15_000
STA_EPS, NORM_EPS = 1e-5, 1e-7  # utils.revcor's divisor offset; RevCorLN.normalize's
BATCH = 2048  # training samples per pass step (memory only: the sums are the same)


@register("RevCorLN")
class RevCorLN(nn.Module):
    """An LN model whose filter is each cell's STA and whose nonlinearity is a fitted polynomial (see the module
    docstring). Built unfitted (zero filter, zero polynomial); `fit_revcor` fits it to a training split."""

    fitted_by_revcor = True  # the Trainer fits it once instead of training it

    def __init__(self, n_units: int = 5, img_shape: Sequence[int] = (40, 50, 50)):
        super().__init__()
        if len(img_shape) != 3:
            raise ConfigError(f"img_shape must be [history, height, width], got {list(img_shape)} (in hyperparams)")
        if n_units < 1:
            raise ConfigError(f"the model needs at least one unit to predict, got n_units {n_units}")
        self.n_units = n_units
        self.img_shape = tuple(int(s) for s in img_shape)
        self.readout = nn.Linear(int(np.prod(self.img_shape)), n_units, bias=True)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)  # left differentiable for the analyses; the Trainer never steps it
        self.register_buffer("coefs", torch.zeros(n_units, DEGREE + 1))  # highest power first, as np.polyfit

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Each cell's linear output: its filter applied to the normalised window (B, n_units)."""
        return self.readout(x.flatten(1))

    def nonlinearity(self, u: torch.Tensor) -> torch.Tensor:
        """Each cell's polynomial at its linear outputs u (B, n_units) (Horner's rule), rates below 0 as 0."""
        c = self.coefs.to(u.dtype)
        out = c[:, 0].expand_as(u)
        for k in range(1, c.shape[1]):
            out = out * u + c[:, k]
        return out.clamp_min(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinearity(self.linear(x))


@torch.no_grad()
def fit_revcor(model: RevCorLN, windows, seed: int, fit_size: int = FIT_SIZE) -> None:
    """Fit `model` to the training WindowSet `windows` (its samples as the model sees them, its targets the rates):
    the STA filters, the folded normalisation, then each cell's polynomial (module docstring)."""
    dev = model.readout.weight.device
    n = len(windows)
    if n < DEGREE + 1:
        raise ConfigError(f"RevCorLN needs at least {DEGREE + 1} training samples to fit its polynomial, got {n}; "
                          "use a longer recording")
    d = model.readout.in_features
    sx = sxx = 0.0
    sy = torch.zeros(model.n_units, dtype=torch.float64, device=dev)
    syy = torch.zeros_like(sy)
    for x, y in windows.batches(BATCH):
        x, y = x.to(dev, torch.float64).flatten(1), y.to(dev, torch.float64)
        sx, sxx = sx + float(x.sum()), sxx + float((x * x).sum())
        sy, syy = sy + y.sum(0), syy + (y * y).sum(0)
    mean_x = sx / (n * d)
    std_x = max(sxx / (n * d) - mean_x ** 2, 0.0) ** 0.5
    mean_y = sy / n
    std_y = (syy / n - mean_y ** 2).clamp_min(0).sqrt()
    sta = torch.zeros(d, model.n_units, dtype=torch.float64, device=dev)
    for x, y in windows.batches(BATCH):
        x = (x.to(dev, torch.float64).flatten(1) - mean_x) / (std_x + STA_EPS)
        sta += x.T @ ((y.to(dev, torch.float64) - mean_y) / (std_y + STA_EPS))
    sta /= n
    weight = sta.T / (std_x + NORM_EPS)
    model.readout.weight.copy_(weight.to(model.readout.weight.dtype))
    model.readout.bias.copy_((-mean_x * weight.sum(1)).to(model.readout.bias.dtype))
    lin = torch.cat([model.linear(x.to(dev)).double() for x, _ in windows.batches(BATCH)]).cpu().numpy()
    rates = windows.targets.double().cpu().numpy()
    rng = np.random.default_rng(seed)
    for cell in range(model.n_units):
        pick = rng.integers(0, n, fit_size) if fit_size < n else np.arange(n)
        with warnings.catch_warnings():  # a silent cell's filter is 0, its outputs constant: a rank-deficient fit
            warnings.simplefilter("ignore", np.exceptions.RankWarning)
            coefs = np.polyfit(lin[pick, cell], rates[pick, cell], DEGREE)
        model.coefs[cell] = torch.from_numpy(coefs).to(model.coefs)
