"""Model registry: maps the config's model_type to a model class and builds it from the hyperparameters.

A model class provides `from_config(config, n_units)` and, for pruning, `conv_layers()`. It may also define
`prepare(self, data: DataBundle) -> None`: the launcher calls it right after building the model, when the model
has it, to set up what depends on the recording rather than on the hyperparameters (e.g. VaryModel with convgc
reads each cell at its receptive-field peak, estimated from the training data). Keep what it sets in the state
dict (parameters or persistent buffers) so checkpoints carry it, and do not draw from the global RNG there.
"""

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
    return MODELS[name].from_config(config, n_units)


# Imported last: the model modules use register() defined above to add themselves to MODELS.
from trainer.models import bncnn, retinotopic, stacked, vary  # noqa: F401, E402
