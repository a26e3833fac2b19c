"""Small building blocks shared by the models: noise, activations by name, conv output sizes."""

import torch
from torch import nn

from trainer.errors import ConfigError

# The activations a config may name; an explicit table so a typo cannot pick up an arbitrary torch class.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "ReLU": nn.ReLU,
    "Tanh": nn.Tanh,
    "Softplus": nn.Softplus,
    "ELU": nn.ELU,
    "LeakyReLU": nn.LeakyReLU,
    "Sigmoid": nn.Sigmoid,
    "GELU": nn.GELU,
}


# Batch-norm eps of every model-level batch norm: the original's TDRModel classes pass eps=1e-3 to each of them
# (torchdeepretina/models.py, e.g. BNCNN.__init__), not torch's default 1e-5.
BN_EPS = 1e-3


class Exponential(nn.Module):
    """The original's output layer when softplus is off (custom_modules.py: Exponential(train_off=True)): the
    identity while training, so the loss sees log rates (pair it with log_poisson), and exp at evaluation, so the
    evaluated model outputs rates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else torch.exp(x)


def output_activation(softplus: bool) -> nn.Module:
    """The last layer of BNCNN, LinearStackedBNCNN and VaryModel: softplus, or the original's Exponential."""
    return nn.Softplus() if softplus else Exponential()


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise in training mode only, a regulariser that is the identity at evaluation."""

    def __init__(self, std: float = 0.05):
        super().__init__()
        if std < 0:
            raise ConfigError(f"noise must be >= 0, got {std} (in hyperparams): set noise to 0 or more")
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.std == 0:
            return x
        return x + self.std * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"std={self.std}"


def activation(name: str) -> nn.Module:
    """Build the activation module named in the config (e.g. 'ReLU'), so models stay config-driven."""
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activ_fxn '{name}' (in hyperparams): use one of {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]()


def conv_out_size(size: int, ksize: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Spatial size after a convolution along one axis, to size layers before building them."""
    return (size + 2 * padding - dilation * (ksize - 1) - 1) // stride + 1
