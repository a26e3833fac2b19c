"""The hyperparameter schema: one table drives validation, defaults, warnings and the README's reference.

Pure: no torch, no mlflow, no I/O beyond reading the two JSON files, so `expand` and manifest rendering start fast.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

# Model classes and training loops that exist (kept here so config stays torch-free; a test checks they match the
# registries in trainer.models and trainer.training).
MODEL_TYPES = ("BNCNN", "LN", "LinearStackedBNCNN", "VaryModel", "RetinotopicModel")
TRAIN_LOOPS = ("train_loop", "retinotopic_loop")
LOSSES = ("PoissonNLLLoss", "MSELoss")
SCHEDULERS = ("ReduceLROnPlateau", "MultiStepLR", "none")
ACTIVATIONS = ("ReLU", "Tanh", "Softplus", "ELU", "LeakyReLU", "Sigmoid", "GELU")


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its type, default, help text, and an optional range check."""

    name: str
    kind: str  # str | int | float | bool | ints | strs | cells | optstr
    default: Any
    help: str
    section: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()
    original: str = ""  # how the original trainer differed, for the README table
    identity: bool = True  # False for keys that say where things are, not what is trained

    @property
    def list_valued(self) -> bool:
        return self.kind in ("ints", "strs", "cells")


def _ge(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _gt(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > lo else f"must be > {lo}"


def _between(lo: float, hi: float, hi_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: float) -> str | None:
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'}"

    return check


def _all_ge(lo: int) -> Callable[[Any], str | None]:
    return lambda v: None if all(x >= lo for x in v) else f"every entry must be >= {lo}"


def _nonempty_all_ge(lo: int) -> Callable[[Any], str | None]:
    return lambda v: (_all_ge(lo)(v) if v else "must not be empty")


def _img_shape(v: list[int]) -> str | None:
    if len(v) != 3:
        return "must have 3 entries: [history, height, width]"
    return _all_ge(1)(v)


def _device(v: str) -> str | None:
    ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
    return None if ok else "must be auto, cpu, cuda, cuda:N or mps"


def _name(v: str) -> str | None:
    if not v.strip():
        return "must not be empty"
    if "/" in v or v in (".", ".."):
        return "must not contain '/' or be '.' or '..' (it names a folder)"
    return None


P = Param
SCHEMA: tuple[Param, ...] = (
    # --- experiment -----------------------------------------------------------------------------------------------
    P("exp_name", "str", "retina", "Experiment name: the MLflow experiment and the folder under save_root that holds "
      "the run folders.", "experiment", _name,
      original="underscores broke run numbering and 'test' was a hidden debug mode; any name works here"),
    P("n_repeats", "int", 1, "Times each hyperparameter combination is trained, each repeat with its own seed.",
      "experiment", _ge(1), original="repeats with a fixed seed were identical; ours derive a seed per repeat"),
    P("seed", "int", 0, "Base random seed. Repeat 0 uses it as is; repeat r > 0 uses a seed derived from it and r.",
      "experiment", _ge(0), original="default was the current time"),
    P("save_every_epoch", "bool", False, "Keep the weights of every epoch's checkpoint (true) or only of the latest "
      "epoch (false). The best epoch's checkpoint is always kept.", "experiment",
      original="there was no best-epoch checkpoint"),
    P("save_root", "str", ".", "Folder that holds <exp_name>/<run name>/ with each run's local checkpoints.",
      "experiment", identity=False),
    P("device", "str", "auto", "Where to train: auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps.",
      "experiment", _device, original="cuda:0 was hard-coded", identity=False),
    # --- model ----------------------------------------------------------------------------------------------------
    P("model_type", "str", "BNCNN", "Model class, looked up by name in the model registry.", "model",
      choices=MODEL_TYPES),
    P("n_layers", "int", 3, "Number of layers of VaryModel (the last is the ganglion-cell layer).", "model", _ge(1)),
    P("bnorm", "bool", True, "Use batch normalisation where the model has it.", "model"),
    P("bnorm_d", "int", 1, "Batch norm kind: 1 = one affine per unit and location, 2 = one per channel.", "model",
      lambda v: None if v in (1, 2) else "must be 1 or 2"),
    P("bias", "bool", True, "Trainable biases in the convolutions.", "model"),
    P("softplus", "bool", True, "Softplus on the model outputs (keeps predicted rates positive).", "model"),
    P("chans", "ints", [8, 8], "Channels of the intermediate layers.", "model", _nonempty_all_ge(1)),
    P("ksizes", "ints", [15, 11, 11], "Kernel sizes of the convolutions, one per layer.", "model",
      _nonempty_all_ge(1)),
    P("img_shape", "ints", [40, 50, 50], "Model input: [history frames, height, width]; history is the window "
      "length in frames.", "model", _img_shape),
    P("stackconvs", "bool", False, "Build large kernels as stacks of linear 3x3 convolutions (VaryModel).", "model"),
    P("convgc", "bool", False, "Convolutional ganglion-cell layer (VaryModel).", "model"),
    P("rand_onehot", "bool", False, "Initialise the one-hot read-out of RetinotopicModel uniformly at random in "
      "[0,1) instead of 1/(H*W).", "model"),
    P("activ_fxn", "str", "ReLU", "Activation between layers.", "model", choices=ACTIVATIONS),
    P("noise", "float", 0.05, "Standard deviation of the Gaussian noise layers (training mode only).", "model",
      _ge(0)),
    P("drop_p", "float", 0.0, "Dropout probability between linearly stacked convolutions.", "model",
      _between(0, 1, hi_open=True)),
    P("gc_bias", "bool", False, "Bias on the ganglion-cell (output) layer.", "model"),
    P("bn_moment", "float", 0.01, "Momentum of the batch-norm layers.", "model", _between(0, 1)),
    # --- data -----------------------------------------------------------------------------------------------------
    P("dataset", "str", "synth01", "Folder under the data root that holds the recording.", "data", _name),
    P("stim_type", "str", "whitenoise", "Recording file name without .h5: <data_root>/<dataset>/<stim_type>.h5.",
      "data", _name),
    P("data_root", "optstr", None, "Data root; null means the --data-root option, else $RETINA_DATA_ROOT, else "
      "~/experiments/data. The original's `datapath` is read as this key.", "data", identity=False,
      original="a custom data root was ignored for the test split, which then scored 0"),
    P("cells", "cells", "all", "\"all\" or a list of row indices into the recording's response arrays.", "data"),
    P("val_frac", "float", 0.1, "Fraction of the training recording held out, as one contiguous stretch at its "
      "end, for validation; a gap of one window separates it from the training samples.", "data",
      _between(0, 1, hi_open=True),
      original="the last 10,000 of a random permutation: validation windows overlapped training windows"),
    P("shuffle", "bool", True, "Shuffle which samples form each batch, every epoch (frames inside a window are "
      "never reordered).", "data"),
    # --- training -------------------------------------------------------------------------------------------------
    P("train_loop", "str", "train_loop", "Training loop of the Trainer, by name.", "training", choices=TRAIN_LOOPS,
      original="ignored; a `retinotopic` flag chose the loop"),
    P("lossfxn", "str", "PoissonNLLLoss", "Loss: PoissonNLLLoss or MSELoss.", "training", choices=LOSSES),
    P("log_poisson", "bool", False, "PoissonNLLLoss only: treat model outputs as log rates.", "training"),
    P("batch_size", "int", 512, "Samples per optimiser step.", "training", _ge(1)),
    P("n_epochs", "int", 10, "Epochs of training (fewer if early stopping ends the run).", "training", _ge(1),
      original="ran one or two epochs more than n_epochs"),
    P("lr", "float", 5e-3, "Adam learning rate.", "training", _gt(0)),
    P("l2", "float", 0.0, "Adam weight decay (L2 penalty on the weights).", "training", _ge(0)),
    P("l1", "float", 0.0, "L1 penalty on the model outputs: l1 x mean |output| over the batch and cells.",
      "training", _ge(0), original="summed over the batch, so it grew with batch_size"),
    P("precision", "str", "fp32", "Arithmetic of the forward pass: fp32, tf32 (TensorFloat-32 matmuls and "
      "convolutions on CUDA; no effect on CPU) or bf16 (bfloat16 autocast; losses and metrics stay fp32). fp32 "
      "is the default: for these 8-channel networks tf32 and bf16 were measured slower on an H200.", "training",
      choices=("fp32", "tf32", "bf16")),
    P("compile", "bool", False, "Compile the model with torch.compile (a few percent faster on a GPU, after a "
      "compilation delay; needs a C++ compiler on CPU).", "training"),
    P("early_stopping", "int", 10, "Stop when the validation correlation has not improved for this many epochs "
      "(0 = never stop early).", "training", _ge(0), original="never fired (its counter reset every epoch)"),
    P("scheduler", "str", "ReduceLROnPlateau", "Learning-rate schedule: ReduceLROnPlateau (on validation "
      "correlation, max mode), MultiStepLR (at scheduler_milestones) or none.", "training", choices=SCHEDULERS,
      original="the plateau scheduler watched a correlation in min mode, so it decayed on a timer"),
    P("scheduler_scale", "float", 0.5, "Factor the learning rate is multiplied by at each decay.", "training",
      _between(0, 1, hi_open=True)),
    P("scheduler_patience", "int", 3, "ReduceLROnPlateau: epochs without improvement before a decay.", "training",
      _ge(0)),
    P("scheduler_thresh", "float", 1e-3, "ReduceLROnPlateau: smallest change of validation correlation that "
      "counts as an improvement.", "training", _ge(0)),
    P("scheduler_milestones", "ints", [], "MultiStepLR: epochs (1-based) after which the learning rate decays.",
      "training", _all_ge(1)),
    # --- pruning and retinotopic read-out (used by the models and loops that have them) -------------------------
    P("prune", "bool", False, "Prune intermediate conv channels after n_epochs of training.", "pruning"),
    P("prune_layers", "strs", [], "Layers to prune; empty means every intermediate conv layer.", "pruning"),
    P("prune_interval", "int", 5, "Epochs of training between two prunings (and before judging the last one).",
      "pruning", _ge(1)),
    P("prune_tolerance", "float", 0.05, "Largest drop of validation correlation a pruning may cause; a larger "
      "drop reverts it and pruning moves to the next layer.", "pruning", _ge(0)),
    P("prune_intg_steps", "int", 10, "Integration steps of the integrated-gradient channel importance.",
      "pruning", _ge(1)),
    P("semantic_scale", "float", 0.0, "Weight of the 'exactly one position' semantic loss (retinotopic_loop).",
      "retinotopic", _ge(0)),
    P("semantic_l1", "float", 0.0, "L1 penalty on the one-hot read-out weights (retinotopic_loop).", "retinotopic",
      _ge(0)),
)
del P

BY_NAME: dict[str, Param] = {p.name: p for p in SCHEMA}

# Keys of the original trainer's shipped configs: some map onto ours, the rest do nothing here.
ALIASES = {"datapath": "data_root"}
IGNORED_LEGACY = ("finalstack", "retinotopic", "cross_val", "zscorey")
NOT_SEARCHABLE = ("n_repeats", "exp_name")


@dataclass
class Loaded:
    """Hyperparameters as read from one file: the values given, and what the user should be told."""

    values: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def defaults() -> dict[str, Any]:
    """Every hyperparameter at its default (lists copied, so callers may mutate)."""
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in SCHEMA}


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Read a JSON object from `path`; every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object {{\"key\": value, ...}}, got {type(data).__name__}")
    return data


def _type_name(kind: str) -> str:
    return {"str": "a string", "optstr": "a string or null", "int": "an integer", "float": "a number",
            "bool": "true or false", "ints": "a list of integers", "strs": "a list of strings",
            "cells": "\"all\" or a list of integers"}[kind]


def _coerce(p: Param, value: Any, where: str) -> Any:
    """Check one value's type and range; return it in canonical form (ints as floats for float keys)."""
    bad = ConfigError(f"{where}: {p.name} must be {_type_name(p.kind)}, got {json.dumps(value)}")
    k = p.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise bad
    elif k == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif k == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif k == "str":
        if not isinstance(value, str):
            raise bad
    elif k == "optstr":
        if value is not None and not isinstance(value, str):
            raise bad
    elif k in ("ints", "strs"):
        item = str if k == "strs" else int
        if not isinstance(value, list) or any(isinstance(x, bool) or not isinstance(x, item) for x in value):
            raise bad
        value = list(value)
    elif k == "cells":
        if value == "all":
            pass
        elif isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool)
                                                       for x in value):
            if any(x < 0 for x in value):
                raise ConfigError(f"{where}: cells must be non-negative row indices, got {json.dumps(value)}")
            if len(set(value)) != len(value):
                raise ConfigError(f"{where}: cells lists a cell twice: {json.dumps(value)}")
            value = list(value)
        else:
            raise bad
    if p.choices and value not in p.choices:
        raise ConfigError(f"{where}: {p.name} {json.dumps(value)} is not one of: {', '.join(p.choices)}")
    if p.check is not None and value is not None:
        problem = p.check(value)
        if problem:
            raise ConfigError(f"{where}: {p.name} {problem}, got {json.dumps(value)}")
    return value


def _resolve_key(key: str, path: Path, seen_legacy: list[str]) -> str | None:
    """Map a file's key to a schema key; None for known keys of the original that do nothing here."""
    if key in BY_NAME:
        return key
    if key in ALIASES:
        return ALIASES[key]
    if key in IGNORED_LEGACY:
        seen_legacy.append(key)
        return None
    close = difflib.get_close_matches(key, list(BY_NAME) + list(ALIASES), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `retina-trainer params` for the known keys"
    raise ConfigError(f"{path}: unknown hyperparameter '{key}'{hint}")


def _legacy_warning(path: Path, keys: list[str]) -> list[str]:
    if not keys:
        return []
    return [f"{path}: ignoring keys of the original trainer that do nothing here: {', '.join(sorted(keys))}"]


def load_hyperparams(path: str | Path) -> Loaded:
    """Read and validate hyperparams.json: every key known, every value of the right type and in range."""
    path = Path(path)
    raw = read_json(path, "hyperparams")
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    legacy: list[str] = []
    for key, value in raw.items():
        name = _resolve_key(key, path, legacy)
        if name is None:
            continue
        if name in source:
            raise ConfigError(f"{path}: '{source[name]}' and '{key}' both set {name}; keep one")
        source[name] = key
        values[name] = _coerce(BY_NAME[name], value, f"{path}: key '{key}'")
    return Loaded(values, _legacy_warning(path, legacy))


def load_hyperranges(path: str | Path | None) -> Loaded:
    """Read and validate hyperranges.json: each key maps to a non-empty list of values to search over."""
    if path is None:
        return Loaded({})
    path = Path(path)
    raw = read_json(path, "hyperranges")
    ranges: dict[str, list[Any]] = {}
    source: dict[str, str] = {}
    legacy: list[str] = []
    for key, options in raw.items():
        name = _resolve_key(key, path, legacy)
        if name is None:
            continue
        if name in source:
            raise ConfigError(f"{path}: '{source[name]}' and '{key}' both set {name}; keep one")
        source[name] = key
        if name in NOT_SEARCHABLE:
            raise ConfigError(f"{path}: {name} cannot be searched; set it in hyperparams.json")
        p = BY_NAME[name]
        if not isinstance(options, list) or not options:
            raise ConfigError(f"{path}: key '{key}' must be a non-empty list of values to try, "
                              f"got {json.dumps(options)}")
        if p.list_valued and p.kind != "cells" and not all(isinstance(o, list) for o in options):
            raise ConfigError(f"{path}: key '{key}' takes a list per run, so give a list of lists "
                              f"(e.g. [{json.dumps(p.default or [1, 2])}]), got {json.dumps(options)}")
        if p.kind == "cells" and not all(isinstance(o, list) or o == "all" for o in options):
            raise ConfigError(f"{path}: key 'cells' takes \"all\" or a list per run, so give e.g. "
                              f"[\"all\", [0, 1]], got {json.dumps(options)}")
        ranges[name] = [_coerce(p, o, f"{path}: key '{key}'") for o in options]
    return Loaded(ranges, _legacy_warning(path, legacy))


def resolve(values: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `values`, in schema order: the full configuration of one run."""
    cfg = defaults()
    cfg.update(values)
    return {p.name: cfg[p.name] for p in SCHEMA}


def identity_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a configuration that says what is trained (not where files live or which device)."""
    return {k: v for k, v in cfg.items() if BY_NAME[k].identity}


def check_run(cfg: dict[str, Any], where: str) -> None:
    """Checks that involve several keys of one resolved run configuration."""
    if cfg["scheduler"] == "MultiStepLR" and not cfg["scheduler_milestones"]:
        raise ConfigError(f"{where}: scheduler MultiStepLR needs scheduler_milestones, e.g. [20, 40]")
    if cfg["lossfxn"] != "PoissonNLLLoss" and cfg["log_poisson"]:
        raise ConfigError(f"{where}: log_poisson only applies to lossfxn PoissonNLLLoss; set it to false")
