"""Model registry: maps the config's model_type to a model class and builds it from the hyperparameters.

A model class takes `n_units` and its settings as keyword arguments named like the hyperparameters they come
from (the schema keys in trainer/config.py): `build_model` passes each one the config values its `__init__`
names, so a class states what it uses once, in its signature. For pruning it provides `conv_layers()`.
It may also define `prepare(self, data: DataBundle) -> None`: `prepare_model` calls it right after the model is
built, when the model has it, to set up what depends on the recording rather than on the hyperparameters (e.g.
with convgc each cell is read at its receptive-field peak, estimated from the training data). Keep what it sets in
the state dict (parameters or persistent buffers) so checkpoints carry it, and do not draw from the global RNG
there. `prepare_model` then starts the outputs at the cells' mean rates (init_output_rate): it finds the output
shift as the bias of `bn_out` or `gc_bn` (batch norms), else of `readout` or `gc_conv`, and inverts `out_act`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from trainer.data.windows import DataBundle

from trainer.errors import ConfigError

MODELS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator that makes a model buildable by its model_type name."""

    def add(cls: type) -> type:
        if name in MODELS:
            raise ValueError(f"model_type '{name}' is already registered to {MODELS[name].__name__}")
        MODELS[name] = cls
        return cls

    return add


def available() -> list[str]:
    """The registered model_type names, in registration order, for messages and the CLI."""
    return list(MODELS)


def build_model(config: Mapping[str, Any], n_units: int) -> nn.Module:
    """Build the model named by config['model_type'] for n_units recorded cells."""
    name = config.get("model_type")
    if name not in MODELS:
        raise ConfigError(f"unknown model_type '{name}' (in hyperparams): available: {', '.join(available())}")
    cls = MODELS[name]
    return cls(n_units=n_units, **settings_for(cls, config))


def settings_for(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config values of the keyword arguments `cls.__init__` takes (every name but n_units is a schema key)."""
    names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "n_units")]
    return {n: config[n] for n in names}


def prepare_model(model: nn.Module, config: Mapping[str, Any], data: DataBundle) -> None:
    """Set up what depends on the recording: the model's own `prepare` (read-out positions), then, with
    init_output_rate, each cell's initial output at its mean training rate."""
    if callable(getattr(model, "prepare", None)):
        model.prepare(data)
    if config["init_output_rate"]:
        log_rates = config["lossfxn"] == "PoissonNLLLoss" and config["log_poisson"]
        init_output_rates(model, data.train.targets.double().mean(dim=0), log_rates)


def output_shift(model: nn.Module) -> nn.Parameter | None:
    """The parameter that shifts each cell's output just before the output activation, or None."""
    for name in ("bn_out", "gc_bn"):
        bn = getattr(model, name, None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.bias is not None:
            return bn.bias
    for name in ("readout", "gc_conv"):
        layer = getattr(model, name, None)
        if layer is not None and getattr(layer, "bias", None) is not None:
            return layer.bias
    return None


@torch.no_grad()
def init_output_rates(model: nn.Module, rates: torch.Tensor, log_rates: bool) -> bool:
    """Set the output shift so that each cell's output starts at its mean rate `rates` (n_units,): the inverse of
    the output activation at the rate (at its log when outputs are log rates). False when the model has no shift
    (e.g. no batch norm and no output bias) and starts as built."""
    shift = output_shift(model)
    if shift is None:
        return False
    target = rates.clamp_min(1e-4).log() if log_rates else rates
    if isinstance(getattr(model, "out_act", None), nn.Softplus):  # softplus(s) = target
        t = target.clamp_min(1e-4)
        target = t + torch.log(-torch.expm1(-t))
    elif isinstance(getattr(model, "out_act", None), nn.ELU):  # ELU(s) = target, with ELU's range > -1
        target = torch.where(target > 0, target, torch.log1p(target.clamp_min(-1 + 1e-4)))
    shift.copy_(target.to(shift))  # the original's Exponential is the identity while training
    return True


# Imported last: the model modules use register() defined above to add themselves to MODELS.
from trainer.models import bncnn, retinotopic, revcor, stacked, vary  # noqa: F401, E402
