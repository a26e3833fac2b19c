"""The hyperparameter schema: one table drives validation, defaults, warnings and the README's reference.

Pure: no torch, no mlflow, no I/O beyond reading the two JSON files, so `expand` and manifest rendering start fast.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import analysis as analysis_names
from trainer.errors import ConfigError

# Model classes and training loops that exist (kept here so config stays torch-free; a test checks they match the
# registries in trainer.models and trainer.training).
MODEL_TYPES = ("BNCNN", "LN", "LinearStackedBNCNN", "VaryModel", "RetinotopicModel", "RevCorLN")
TRAIN_LOOPS = ("train_loop", "retinotopic_loop")
LOSSES = ("PoissonNLLLoss", "MSELoss")
SCHEDULERS = ("ReduceLROnPlateau", "MultiStepLR", "none")
ORIGINAL_SCHEDULES = ("none", "507decb", "5c2af72", "003f581")  # scheduler_original: commits of training.py
ACTIVATIONS = ("ReLU", "Tanh", "Softplus", "ELU", "LeakyReLU", "Sigmoid", "GELU")


NOT_NULLABLE = object()  # Param.null for keys that do not accept null


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its type, default, help text, and an optional range check."""

    name: str
    kind: str  # str | int | float | bool | ints | strs | cells | optstr | analysis
    default: Any
    help: str
    section: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()
    original: str = ""  # how the original trainer differed, for the README table
    identity: bool = True  # False for keys that say where things are, not what is trained
    null: Any = NOT_NULLABLE  # what a JSON null means for this key (the original's None), if it may be null

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


NAME_LIMIT = 120  # characters of exp_name, dataset, stim_type: each names a folder or file (255 bytes at most)


def _name(v: str) -> str | None:
    if not v.strip():
        return "must not be empty"
    if "/" in v or v in (".", ".."):
        return "must not contain '/' or be '.' or '..' (it names a folder)"
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        return "must not contain control characters (it names a folder)"
    if len(v.encode()) > NAME_LIMIT:
        return f"must be at most {NAME_LIMIT} bytes long (it names a folder)"
    return None


P = Param
SCHEMA: tuple[Param, ...] = (
    # --- experiment -----------------------------------------------------------------------------------------------
    P("exp_name", "str", "retina", "Experiment name: the MLflow experiment and the folder under save_root that holds "
      "the run folders.", "experiment", _name,
      original="underscores broke run numbering and 'test' was a hidden debug mode; any name works here"),
    P("n_repeats", "int", 1, "Times each hyperparameter combination is trained, each repeat with its own seed.",
      "experiment", _ge(1), original="repeats with a fixed seed were identical; ours derive a seed per repeat"),
    P("seed", "int", 0, "Base random seed. Repeat 0 uses it as is; repeat r > 0 uses a seed derived from it and r. "
      "null (the original's clock seed) is read as 0, with a warning.", "experiment", _between(0, 2**63 - 1),
      original="default (and null) was the current time", null=0),
    P("save_every_epoch", "bool", False, "Keep the weights of every epoch's checkpoint (true) or only of the latest "
      "epoch (false). The best epoch's checkpoint is always kept.", "experiment",
      original="there was no best-epoch checkpoint"),
    P("save_root", "str", ".", "Folder that holds <exp_name>/<run name>/ with each run's local checkpoints.",
      "experiment", identity=False),
    P("device", "str", "auto", "Where to train: auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps.",
      "experiment", _device, original="cuda:0 was hard-coded", identity=False),
    # --- model ----------------------------------------------------------------------------------------------------
    P("model_type", "str", "BNCNN", "Model class, looked up by name in the model registry. RevCorLN is the published "
      "LN baseline, fitted by reverse correlation and a degree-5 polynomial as the original's train_ln (one epoch, "
      "no gradient descent; the optimiser settings do not apply).", "model", choices=MODEL_TYPES),
    P("n_layers", "int", 3, "Number of layers of VaryModel (the last is the ganglion-cell layer).", "model", _ge(1)),
    P("bnorm", "bool", True, "Use batch normalisation where the model has it.", "model"),
    P("bnorm_d", "int", 1, "Batch norm kind: 1 = one affine per unit and location, 2 = one per channel.", "model",
      lambda v: None if v in (1, 2) else "must be 1 or 2"),
    P("bias", "bool", True, "Trainable biases in the convolutions.", "model"),
    P("softplus", "bool", True, "Softplus on the model outputs (keeps predicted rates positive). false: the "
      "original's Exponential, the identity while training (pair it with log_poisson) and exp at evaluation; LN "
      "ends in ELU instead; RetinotopicModel always uses softplus, as the original.", "model"),
    P("chans", "ints", [8, 8], "Channels of the intermediate layers.", "model", _nonempty_all_ge(1)),
    P("ksizes", "ints", [15, 11, 11], "Kernel sizes of the convolutions, one per layer.", "model",
      _nonempty_all_ge(1)),
    P("img_shape", "ints", [40, 50, 50], "Model input: [history frames, height, width]; history is the window "
      "length in frames.", "model", _img_shape),
    P("stackconvs", "bool", True, "VaryModel and RetinotopicModel: build the hidden layers' kernels as stacks of "
      "linear 3x3 convolutions (odd kernel sizes only), as the original's default.", "model"),
    P("convgc", "bool", False, "Convolutional ganglion-cell layer (BNCNN, LinearStackedBNCNN, VaryModel): a conv "
      "with one channel per cell over the last map (kernel ksizes[n]), each cell read at its own position, the "
      "peak of its receptive field estimated from the training data.", "model",
      original="every cell was read at one clamped position (custom_modules.py: GrabUnits)"),
    P("rand_onehot", "bool", False, "Initialise the one-hot read-out of RetinotopicModel uniformly at random in "
      "[0,1) instead of 1/(H*W).", "model"),
    P("activ_fxn", "str", "ReLU", "Activation between layers.", "model", choices=ACTIVATIONS),
    P("noise", "float", 0.05, "Standard deviation of the Gaussian noise layers (training mode only).", "model",
      _ge(0)),
    P("drop_p", "float", 0.0, "Dropout probability between linearly stacked convolutions, and on the stimulus "
      "pixels of LN.", "model", _between(0, 1, hi_open=True)),
    P("gc_bias", "bool", False, "Bias on the ganglion-cell (output) layer (RetinotopicModel's per-cell conv takes "
      "its bias from `bias`, as the original). null means false.", "model", null=False),
    P("bn_moment", "float", 0.01, "Momentum of the batch-norm layers.", "model", _between(0, 1)),
    P("init_output_rate", "bool", True, "Start each cell's output at its mean training rate: the output batch "
      "norm's shift (RetinotopicModel: the per-cell batch norm's; LN: the read-out bias) is set to the inverse of "
      "the output activation at that rate (its log under log_poisson). false starts as the original, near 0.7 Hz "
      "whatever the cell's rate.", "model", original="not done: outputs started near 0.7 Hz"),
    # --- data -----------------------------------------------------------------------------------------------------
    P("dataset", "str", "synth01", "Folder under the data root that holds the recording.", "data", _name),
    P("stim_type", "str", "whitenoise", "Recording file name without .h5: <data_root>/<dataset>/<stim_type>.h5.",
      "data", _name),
    P("data_root", "optstr", None, "Data root; null means the --data-root option, else $RETINA_DATA_ROOT, else "
      "~/experiments/data. The original's `datapath` is read as this key.", "data", identity=False,
      original="a custom data root was ignored for the test split, which then scored 0"),
    P("cells", "cells", "all", "\"all\" or a list of row indices into the recording's response arrays. \"all\" "
      "is, as in the original, its curated list for the published recordings (datas.py: CELLS, e.g. 15-10-07 -> "
      "0..4); for other recordings the list in the file's `cells` attribute, else every row. The run logs the "
      "rows used as cell_ids.", "data"),
    P("val_frac", "float", 0.1, "Fraction of the training recording held out, as one contiguous stretch at its "
      "end, for validation; a gap of one window separates it from the training samples.", "data",
      _between(0, 1, hi_open=True),
      original="the last 10,000 of a random permutation: validation windows overlapped training windows"),
    P("val_size", "int", 0, "Validation samples held out, as a count (the original's 10,000 at 5c2af72, hard-coded "
      "there); 0 means val_frac decides. The same contiguous stretch at the end, after the same gap.", "data",
      _ge(0)),
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
    P("l1", "float", 0.0, "L1 penalty on the model outputs, as the original: l1 x the sum of |output| over the "
      "batch and cells, added to the batch's mean loss (so it grows with batch_size); validation and test losses "
      "add l1 x the per-sample sum. l1_per_sample makes it l1 x mean |output|.", "training", _ge(0)),
    P("l1_per_sample", "bool", False, "l1 penalises the mean |output| over batch and cells (independent of "
      "batch_size) instead of the original's sum.", "training"),
    P("precision", "str", "fp32", "Arithmetic of the forward pass: fp32, tf32 (TensorFloat-32 matmuls and "
      "convolutions on CUDA; no effect on CPU) or bf16 (bfloat16 autocast; losses and metrics stay fp32). fp32 "
      "is the default: for these 8-channel networks tf32 and bf16 were measured slower on an H200.", "training",
      choices=("fp32", "tf32", "bf16")),
    P("compile", "bool", False, "Compile the model with torch.compile (a few percent faster on a GPU, after a "
      "compilation delay; needs a C++ compiler on CPU).", "training"),
    P("early_stopping", "int", 0, "Stop when the validation correlation has not improved for this many epochs "
      "(0 = never stop early, the original's behaviour).", "training", _ge(0),
      original="never fired (its counter reset every epoch): runs trained n_epochs"),
    P("scheduler", "str", "ReduceLROnPlateau", "Learning-rate schedule: ReduceLROnPlateau (on validation "
      "correlation, max mode), MultiStepLR (at scheduler_milestones) or none (null means none).", "training",
      choices=SCHEDULERS, null="none",
      original="the plateau scheduler watched a correlation in min mode, so it decayed on a timer"),
    P("scheduler_scale", "float", 0.5, "ReduceLROnPlateau: factor the learning rate is multiplied by at each "
      "decay.", "training", _between(0, 1, hi_open=True)),
    P("scheduler_patience", "int", 10, "ReduceLROnPlateau: epochs without improvement before a decay.", "training",
      _ge(0)),
    P("scheduler_thresh", "float", 1e-2, "ReduceLROnPlateau: an improvement is a validation correlation above "
      "best x (1 + scheduler_thresh) (relative, as the original).", "training", _ge(0)),
    P("scheduler_milestones", "ints", [10, 20, 30], "MultiStepLR: epochs (1-based) after which the learning rate "
      "decays.", "training", _all_ge(1)),
    P("scheduler_gamma", "float", 0.1, "MultiStepLR: factor the learning rate is multiplied by at each milestone "
      "(the original's fixed 0.1).", "training", _between(0, 1, hi_open=True)),
    P("scheduler_original", "str", "none", "Reproduce the learning-rate schedule of the original at one commit, "
      "its bugs included (docs/differences.md): 507decb (the newest: ReduceLROnPlateau in min mode stepped with the "
      "validation correlation, so it decays every scheduler_patience + 1 epochs while r rises; in train_loop "
      "MultiStepLR is stepped with that correlation as its epoch, so it never decays), 5c2af72 (the same, with "
      "the plateau factor fixed at 0.1; retinotopic_loop steps either schedule with the training loss), 003f581 "
      "(ReduceLROnPlateau in min mode on the validation loss, factor 0.1, patience 10, threshold 1e-4, whatever "
      "scheduler says). MultiStepLR's gamma is the original's 0.1. none: ours (max mode on validation r).",
      "training", choices=ORIGINAL_SCHEDULES),
    # --- pruning and retinotopic read-out (used by the models and loops that have them) -------------------------
    P("prune", "bool", False, "Prune intermediate conv channels after n_epochs of training.", "pruning"),
    P("prune_layers", "strs", [], "Layers to prune; empty means every intermediate conv layer.", "pruning"),
    P("prune_intvl", "int", 10, "Epochs of training between two prunings (and before judging the last one).",
      "pruning", _ge(1)),
    P("prune_tolerance", "float", 0.05, "Largest drop of validation correlation a pruning may cause; a larger "
      "drop reverts it and pruning moves to the next layer.", "pruning", _ge(0),
      original="no default (a KeyError when missing); the revert restored nothing (the saved state aliased the "
      "live weights)"),
    P("alpha_steps", "int", 5, "Integrated-gradient channel importance: points on the path from a zero stimulus "
      "to the stimulus (0 and 1 included).", "pruning", _ge(2)),
    P("intg_bsize", "int", 500, "Integrated-gradient channel importance: training samples it is averaged over, "
      "drawn at random each time.", "pruning", _ge(1)),
    P("abssum", "bool", False, "Channel importance: mean over samples of the sum of |attribution| over positions "
      "(true) or of |the sum| (false).", "pruning"),
    P("zero_bias", "bool", True, "Pruning zeroes a channel's bias as well as its filter.", "pruning"),
    P("semantic_scale", "float", 10.0, "Weight of the 'exactly one position' semantic loss (retinotopic_loop).",
      "retinotopic", _ge(0)),
    P("semantic_l1", "float", 0.0, "L1 penalty on the one-hot read-out weights (retinotopic_loop): semantic_l1 x "
      "the mean over cells of the L1 norm of each cell's weights, as the original.", "retinotopic", _ge(0)),
    # --- analysis after training (trainer/analysis, docs/analysis.md) ------------------------------------------
    P("analysis", "analysis", "all", "Analyses each run does after its evaluation, on its best checkpoint, logged "
      "with it (docs/analysis.md): \"all\", \"none\", or a list of receptive_fields, phenomena, interneurons, "
      "attribution and single phenomena (step_response, paired_flash, reversing_grating, contrast_adaptation, oms, "
      "osr, motion_reversal, motion_anticipation). `search --no-analysis` is \"none\" for every run.", "analysis",
      analysis_names.check, identity=False,
      original="the analysis pipeline (analysis.py: analysis_pipeline) ran as a separate step over the run folders"),
    P("analysis_sta_hold", "int", 3, "Receptive fields: each white-noise frame of the STA is held this many bins, "
      "as the published recordings hold each stimulus frame 3 bins (1: a new frame every bin, the original's "
      "noise). A model's receptive field is measured in the temporal statistics it was trained on: on the synthetic "
      "subunit recordings the maps matched the true cells' at r >= 0.97 held 3, >= 0.86 held 1 "
      "(benchmarks/analysis.py).", "analysis", _ge(1), identity=False,
      original="utils.compute_sta: a new Gaussian frame every bin (hold 1)"),
    P("analysis_interneurons", "optstr", None, "Interneuron recordings for the interneurons analysis: an h5 file or a "
      "folder of them in the original's layout (one file per cell type, group boxes). null: the folder "
      "interneurons/ beside the recording, when there is one.", "analysis", identity=False,
      original="read from ~/interneuron_data, a fixed path"),
)
del P

BY_NAME: dict[str, Param] = {p.name: p for p in SCHEMA}

# Keys of the original's shipped configs (training_scripts/*.json at every commit found; tests/data/
# original_configs.json) that are not ours. Each maps onto one of our keys, or changes nothing here.
ALIASES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {  # original key -> (our key, value conversion)
    "datapath": ("data_root", None),
    "semantic_loss_scale": ("semantic_scale", None),  # its earlier name (training.py: retinotopic_loop)
    "bnorm_momentum": ("bn_moment", None),  # earlier name (models.py)
    "linear_bias": ("gc_bias", lambda v: bool(v) if v is None or isinstance(v, bool) else v),  # null: no bias
    # the original chose the loop by this flag and ignored train_loop (training.py: hyper_search)
    "retinotopic": ("train_loop", lambda v: ("retinotopic_loop" if v else "train_loop")
                    if v is None or isinstance(v, bool) else v),
    # validation was the last 1/n_cv_folds of the samples (training.py, datas.py: DataDistributor)
    "n_cv_folds": ("val_frac", lambda v: 1.0 / v if isinstance(v, int) and not isinstance(v, bool) and v > 1
                   else v),
    # in hyperparams_template.json (5845142) beside no `dataset`; no code reading it was found: it names the dataset
    "data_set": ("dataset", None),
    "prune_interval": ("prune_intvl", None),  # our earlier names
    "prune_intg_steps": ("alpha_steps", None),
}
ANY = object()
# original key -> (the values at which it changes nothing here, or ANY; what it does otherwise)
LEGACY_NOOP: dict[str, tuple[Any, str]] = {
    "starting_exp_num": (ANY, "run numbering"), "exp_num_offset": (ANY, "run numbering"),
    "description": (ANY, "a note"), "skip_nums": (ANY, "skipping run numbers"),
    "finalstack": (ANY, "nothing (read by no code of the original)"),
    "bnaftrelu": (ANY, "nothing (read by no code of the original)"),
    "min_prune_acc": (ANY, "nothing (read by no code of the original)"),
    "start_checkpt": (ANY, "nothing (read by no code of the original)"),
    "lr_bk": (ANY, "nothing (read by no code of the original)"),
    "final_bias": (ANY, "nothing (read by no code of the original found; gc_bias sets that bias)"),
    "cross_val_idx": (ANY, "nothing: the original's validation split ignored it (datas.py: DataDistributor.torch)"),
    "datasets": (ANY, "the multi-recording scripts"), "stim_types": (ANY, "the multi-recording scripts"),
    "intl_pop": (ANY, "recurrent models"), "recur_seq_len": (ANY, "recurrent models"),
    "reset_hs": (ANY, "recurrent models"), "rnn_chans": (ANY, "recurrent models"),
    "rnn_type": (ANY, "recurrent models"), "scale_kinet": (ANY, "recurrent models"),
    "rand_sample": ((True, None), "a sample order fixed across epochs (false)"),
    "cross_val": ((False,), "cross-validation folds"), "zscorey": ((False,), "z-scored firing rates"),
    "shift_labels": ((False,), "the shifted-labels null model"), "adapt_gauss": ((False,), "adaptive noise"),
    "inference_exp": ((False,), "exp of the outputs at evaluation (use softplus false)"),
    "one2one": ((False,), "one-to-one stacked convolutions"), "startpt": ((None,), "starting from a checkpoint"),
    "reset_lr": ((False,), "learning-rate resets while pruning"),
    "reset_sd": ((False,), "weight resets while pruning"), "altn_layers": ((False,), "alternating pruned layers"),
}
# What users type for a setting under other trainers' names: the hint of the unknown-key error.
SPELLINGS = {
    "learning_rate": "lr", "lr_rate": "lr", "learningrate": "lr", "epochs": "n_epochs", "num_epochs": "n_epochs",
    "nepochs": "n_epochs", "max_epochs": "n_epochs", "batchsize": "batch_size", "bs": "batch_size",
    "weight_decay": "l2", "wd": "l2", "l2_reg": "l2", "dropout": "drop_p", "kernel_sizes": "ksizes",
    "kernel_size": "ksizes", "channels": "chans", "patience": "early_stopping", "model": "model_type",
    "loss": "lossfxn", "loss_fn": "lossfxn", "momentum": "bn_moment", "data_path": "data_root",
    "data_dir": "data_root", "datadir": "data_root", "repeats": "n_repeats", "experiment": "exp_name",
    "experiment_name": "exp_name", "input_shape": "img_shape", "random_seed": "seed", "rand_seed": "seed",
    "activation": "activ_fxn",
}
# Model classes of the original that retina-trainer does not provide, with what to use instead.
ORIGINAL_ONLY_MODELS = {
    "BNCNN2D": "model_type BNCNN with bnorm_d 2 is the same network",
    "AbsBNBNCNN": "the nearest is LinearStackedBNCNN (positive-scale batch norms) or BNCNN",
    "PracticalBNCNN": "the nearest is BNCNN (noise instead of dropout, batch norm before the activation)",
    "MultiDataBNCNN": "train one BNCNN per recording", "ParallelDataBNCNN": "train one BNCNN per recording",
    "KineticsModel": "recurrent kinetics models are not provided",
}
NOT_SEARCHABLE = ("n_repeats", "exp_name", "analysis", "analysis_sta_hold", "analysis_interneurons")


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
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); save the file as "
                          "UTF-8") from None

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{path}: key '{key}' appears twice; keep one")
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; a hyperparameter file is one flat object") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: a number has more digits than can be read ({sys.get_int_max_str_digits()} at "
                          "most); use a plain number") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object {{\"key\": value, ...}}, got {type(data).__name__}")
    return data


def _type_name(kind: str) -> str:
    return {"str": "a string", "optstr": "a string or null", "int": "an integer", "float": "a number",
            "bool": "true or false", "ints": "a list of integers", "strs": "a list of strings",
            "cells": "\"all\" or a list of integers",
            "analysis": "\"all\", \"none\" or a list of analysis names"}[kind]


INT_LIMIT = 2**63  # integers beyond this fit neither torch nor numpy


def _short(value: Any, limit: int = 60) -> str:
    """A value for a message: JSON, cut to `limit` characters (a 5,000-digit number stays readable)."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _coerce(p: Param, value: Any, where: str) -> Any:
    """Check one value's type and range; return it in canonical form (ints as floats for float keys)."""
    bad = ConfigError(f"{where}: {p.name} must be {_type_name(p.kind)}, got {_short(value)}")
    k = p.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise bad
    elif k == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise ConfigError(f"{where}: {p.name} must be an integer below 2^63 in size, got one with "
                              f"{len(str(abs(value)))} digits")
    elif k == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {p.name} must be a finite number, got {_short(value)}")
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
        if item is int and any(not -INT_LIMIT <= x < INT_LIMIT for x in value):
            raise ConfigError(f"{where}: {p.name} entries must be integers below 2^63 in size")
        value = list(value)
    elif k == "analysis":
        if value not in ("all", "none") and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise bad
        value = list(value) if isinstance(value, list) else value
    elif k == "cells":
        if value == "all":
            pass
        elif isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool)
                                                       for x in value):
            if any(x < 0 for x in value):
                raise ConfigError(f"{where}: cells must be non-negative row indices, got {_short(value)}")
            if len(set(value)) != len(value):
                raise ConfigError(f"{where}: cells lists a cell twice: {_short(value)}")
            value = list(value)
        else:
            raise bad
    if p.choices and value not in p.choices:
        hint = ""
        if p.name == "model_type" and value in ORIGINAL_ONLY_MODELS:
            hint = f" ({value} is a model of the original that retina-trainer does not provide: " \
                   f"{ORIGINAL_ONLY_MODELS[value]})"
        raise ConfigError(f"{where}: {p.name} {_short(value)} is not one of: {', '.join(p.choices)}{hint}")
    if p.check is not None and value is not None:
        problem = p.check(value)
        if problem:
            raise ConfigError(f"{where}: {p.name} {problem}, got {_short(value)}")
    return value


def _candidates() -> list[str]:
    return list(BY_NAME) + list(ALIASES) + list(LEGACY_NOOP)


def _resolve_key(key: str, where: str) -> tuple[str | None, Callable[[Any], Any] | None]:
    """Map a file's key to (schema key, conversion of the original's values); (None, None) for a key of the
    original that changes nothing here. An unknown key is an error that suggests the closest known one."""
    if key in BY_NAME:
        return key, None
    if key in ALIASES:
        return ALIASES[key]
    if key in LEGACY_NOOP:
        return None, None
    close = [SPELLINGS[key.lower()]] if key.lower() in SPELLINGS else \
        difflib.get_close_matches(key, _candidates(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `retina-trainer params` for the known keys"
    raise ConfigError(f"{where}: unknown hyperparameter '{key}'{hint}")


def _check_noop(key: str, value: Any, where: str) -> None:
    """A key of the original that we do not implement may only take the values at which it changed nothing."""
    allowed, what = LEGACY_NOOP[key]
    if allowed is not ANY and value not in allowed:
        ok = " or ".join(json.dumps(v) for v in allowed)
        raise ConfigError(f"{where}: key '{key}' {_short(value)} asks for {what}, which retina-trainer does "
                          f"not do; remove the key or set it to {ok}")


def _value(p: Param, key: str, value: Any, convert: Callable[[Any], Any] | None, where: str,
           notes: list[str]) -> Any:
    """One value of key `key` (ours or the original's) as a valid value of our `p`."""
    if convert is not None:
        value = convert(value)
    if value is None and p.null is not NOT_NULLABLE:
        if p.name == "seed":
            notes.append(f"{where}: seed null (the original's clock seed) is read as {p.null}, so that the run "
                         "can be repeated")
        return p.null
    return _coerce(p, value, f"{where}: key '{key}'")


def _notes(where: str, ignored: list[str], notes: list[str]) -> list[str]:
    out = list(notes)
    if ignored:
        out.append(f"{where}: ignoring keys of the original trainer that change nothing here: "
                   f"{', '.join(sorted(ignored))} (docs/differences.md)")
    return out


def _set(name: str, key: str, source: dict[str, str], where: str, notes: list[str]) -> bool:
    """Record that `key` sets schema key `name`; False when an earlier key wins. Two keys for one setting are an
    error, except the original's `retinotopic` flag, which wins over train_loop as it did there."""
    if name not in source:
        source[name] = key
        return True
    first = source[name]
    if "retinotopic" in (first, key) and name == "train_loop":
        notes.append(f"{where}: '{first if first != 'retinotopic' else key}' is overridden by 'retinotopic', "
                     "which chose the loop in the original")
        if key == "retinotopic":
            source[name] = key
            return True
        return False
    raise ConfigError(f"{where}: '{first}' and '{key}' both set {name}; keep one")


def parse_hyperparams(raw: dict[str, Any], where: str) -> Loaded:
    """Validate a hyperparams object (read from `where`): every key known, every value of the right type and in
    range; the original's keys mapped onto ours or, where they change nothing, named in one warning."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    ignored: list[str] = []
    notes: list[str] = []
    for key, value in raw.items():
        name, convert = _resolve_key(key, where)
        if name is None:
            _check_noop(key, value, where)
            ignored.append(key)
            continue
        if _set(name, key, source, where, notes):
            values[name] = _value(BY_NAME[name], key, value, convert, where, notes)
    return Loaded(values, _notes(where, ignored, notes))


def load_hyperparams(path: str | Path) -> Loaded:
    """Read and validate hyperparams.json (see parse_hyperparams)."""
    return parse_hyperparams(read_json(path, "hyperparams"), str(path))


@dataclass(frozen=True)
class Range:
    """A numeric range to sample from (`{"low": 1e-4, "high": 1e-2, "log": true}`, `{"low": 4, "high": 16,
    "step": 4}`): hyperranges.json's second form, which only the sampled strategies (random, tpe) take."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


RANGE_KEYS = frozenset({"low", "high", "log", "step"})


def _range(p: Param, key: str, spec: dict[str, Any], where: str) -> Range:
    """A range form of key `key`, checked: a number key, low < high, both ends valid values, log with low > 0 and no
    step, a positive step (an integer one for integer keys)."""
    at = f"{where}: key '{key}'"
    extra = set(spec) - RANGE_KEYS
    if extra or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{at}: a range is {{\"low\": L, \"high\": H}} with optional \"log\": true or "
                          f"\"step\": S, got {_short(spec)}")
    if p.kind not in ("int", "float"):
        raise ConfigError(f"{at}: {p.name} is not a number, so it takes a list of values to try, not a range")
    low, high = (_coerce(p, spec[end], f"{at} {end}") for end in ("low", "high"))
    for end, v in (("low", low), ("high", high)):
        bad = p.check(v) if p.check else None
        if bad:
            raise ConfigError(f"{at}: {end} {v!r} {bad}")
    if not low < high:
        raise ConfigError(f"{at}: low must be below high, got low {low!r}, high {high!r}")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log must be true or false, got {_short(log)}")
    if log and low <= 0:
        raise ConfigError(f"{at}: a log range needs low > 0, got {low!r}")
    if step is not None:
        if log:
            raise ConfigError(f"{at}: a range takes log or step, not both")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0 or \
                (p.kind == "int" and not isinstance(step, int)):
            kind = "a positive integer" if p.kind == "int" else "a positive number"
            raise ConfigError(f"{at}: step must be {kind}, got {_short(step)}")
    return Range(low, high, log, step, integer=p.kind == "int")


def parse_hyperranges(raw: dict[str, Any], where: str, ranges_ok: bool = False) -> Loaded:
    """Validate a hyperranges object: each key maps to a non-empty list of values to search over or, with
    `ranges_ok` (the sampled strategies), a numeric key to a `Range`."""
    ranges: dict[str, list[Any] | Range] = {}
    source: dict[str, str] = {}
    ignored: list[str] = []
    notes: list[str] = []
    for key, options in raw.items():
        name, convert = _resolve_key(key, where)
        if isinstance(options, dict) and name is not None and name not in NOT_SEARCHABLE:
            if not ranges_ok:
                raise ConfigError(f"{where}: key '{key}' gives a range ({_short(options)}), which only the sampled "
                                  "strategies take (search --strategy random or tpe); for the grid, list the values "
                                  "to try")
            if convert is not None:
                raise ConfigError(f"{where}: key '{key}' is the original's name of {name}; give the range as '{name}'")
            if _set(name, key, source, where, notes):
                ranges[name] = _range(BY_NAME[name], key, options, where)
            continue
        if not isinstance(options, list) or not options:
            raise ConfigError(f"{where}: key '{key}' must be a non-empty list of values to try, "
                              f"got {_short(options)}")
        if name is None:
            for o in options:
                _check_noop(key, o, where)
            ignored.append(key)
            continue
        if name in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: {name} cannot be searched; set it in hyperparams.json")
        if not _set(name, key, source, where, notes):
            continue
        p = BY_NAME[name]
        if p.list_valued and p.kind != "cells" and not all(isinstance(o, list) for o in options):
            raise ConfigError(f"{where}: key '{key}' takes a list per run, so give a list of lists "
                              f"(e.g. [{json.dumps(p.default or [1, 2])}]), got {_short(options)}")
        if p.kind == "cells" and not all(isinstance(o, list) or o == "all" for o in options):
            raise ConfigError(f"{where}: key 'cells' takes \"all\" or a list per run, so give e.g. "
                              f"[\"all\", [0, 1]], got {_short(options)}")
        ranges[name] = [_value(p, key, o, convert, where, notes) for o in options]
    return Loaded(ranges, _notes(where, ignored, notes))


def load_hyperranges(path: str | Path | None, ranges_ok: bool = False) -> Loaded:
    """Read and validate hyperranges.json (see parse_hyperranges); no file means no ranges."""
    if path is None:
        return Loaded({})
    return parse_hyperranges(read_json(path, "hyperranges"), str(path), ranges_ok)


def unset_log_poisson(params: Loaded, ranges: Loaded, where: str) -> list[str]:
    """The one-line warning for a search whose Poisson loss leaves log_poisson unset (in both files): the original
    then built PoissonNLLLoss() with torch's log_input=True, treating its rate outputs as log rates; retina-trainer
    takes false (docs/differences.md), which every later config of the lab set."""
    given = set(params.values) | set(ranges.values)
    losses = ranges.values.get("lossfxn", [params.values.get("lossfxn", BY_NAME["lossfxn"].default)])
    if "log_poisson" in given or "PoissonNLLLoss" not in losses:
        return []
    return [f"{where}: log_poisson is not set, so it is false (outputs are rates); the original then trained with "
            "PoissonNLLLoss(log_input=True), torch's default: set \"log_poisson\": false to keep this, or true "
            "to train as the original did"]


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
    if cfg["model_type"] == "RevCorLN" and cfg["prune"]:
        raise ConfigError(f"{where}: model_type RevCorLN has no channels to prune; set prune to false")
    if cfg["scheduler_original"] == "003f581" and cfg["scheduler"] != "ReduceLROnPlateau":
        raise ConfigError(f"{where}: scheduler_original 003f581 always built ReduceLROnPlateau; set scheduler to "
                          "ReduceLROnPlateau, or scheduler_original to 507decb or 5c2af72")
    if cfg["scheduler"] == "MultiStepLR" and not cfg["scheduler_milestones"]:
        raise ConfigError(f"{where}: scheduler MultiStepLR needs scheduler_milestones, e.g. [20, 40]")
    if cfg["lossfxn"] != "PoissonNLLLoss" and cfg["log_poisson"]:
        raise ConfigError(f"{where}: log_poisson only applies to lossfxn PoissonNLLLoss; set it to false")
