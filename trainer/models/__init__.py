"""Model registry: maps the config's model_type to a model class and builds it from the hyperparameters.

A model class takes `n_units` and its settings as keyword arguments named like the hyperparameters they come
from (the schema keys in trainer/config.py): `build_model` passes each one the config values its `__init__`
names, so a class states what it uses once, in its signature. For pruning it provides `conv_layers()`.
It may also define `prepare(self, data: DataBundle) -> None`: the launcher calls it right after building the
model, when the model has it, to set up what depends on the recording rather than on the hyperparameters (e.g.
VaryModel with convgc reads each cell at its receptive-field peak, estimated from the training data). Keep what it
sets in the state dict (parameters or persistent buffers) so checkpoints carry it, and do not draw from the
global RNG there.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

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


# Imported last: the model modules use register() defined above to add themselves to MODELS.
from trainer.models import bncnn, retinotopic, stacked, vary  # noqa: F401, E402
