"""Import a model trained with the original torchdeepretina (github.com/baccuslab/torch-deep-retina).

The original's training loop saves `<folder>/test_epoch_<N>.pt` every epoch (torchdeepretina/io.py:
save_checkpoint @15dde56; older runs wrote `test_epoch_<N>.pth`, the name analysis.py: read_model @f67a275 reads):
a dict with `model_type`, `model_state_dict` (its nn.Sequential's `sequential.N.*` tensors), `hyps` (older
versions: `model_hyps`), `norm_stats` ({'mean', 'std'} of the training stimulus), `epoch`, `val_acc`,
`test_pearson`, ... and every hyperparameter copied to the top level. Without save_every_epoch only the newest file
keeps the weights. `import_checkpoint` turns one such file (or the newest one of a run folder that has weights)
into our `best.pt`, so `evaluate`, `predict` and `trainer.inference.load_model` use it.

Model families (torchdeepretina/models.py, read at 00bb0ca, a0c756d, fb78691 and the stored version whose
RetinotopicModel has `collapsed`; custom_modules.py at fb78691 and the torch_utils.py of a0c756d's time):
BNCNN, LinearStackedBNCNN and VaryModel, each with a linear or (convgc) convolutional ganglion-cell layer, and
RetinotopicModel. The weights are assigned by walking `sequential.N` in increasing N and matching each module by
what its tensors are (conv weight 4-D, linear weight 2-D, batch norm, the original's AbsBatchNorm with scale/shift,
a stack of 3x3 convs, OneHot's `w`, GaussianNoise's `sigma` or its older name `cuda_param`, which are dropped) to
the layers of our model built from the checkpoint's hyperparameters, in forward order, every shape checked;
nothing depends on module indices, so the layouts of every version (Reshape after the second batch norm or not,
bnorm_d 1 or 2, dropout inside the stacks, n_layers) map. A key that maps nowhere is an error that names it.

What the state dict does not hold is rebuilt as the original computed it:
- convgc: GrabUnits kept no tensors; it read every cell at one position computed from the recording's centres
  (hyps['centers']) by centers2coords (custom_modules.py @fb78691), a clamp that puts every cell of the shipped
  configs at one place (a negative row or column reads from the map's far edge). Our model reads cell i at
  `positions[i]`, so the import stores the original's position for each cell: the imported model computes what
  the original computed, while a model trained here reads each cell at its own receptive-field peak (a note says
  so).
- RetinotopicModel: OneHot read each cell as sum(x * p) with p = (w - min w) / sum(w - min w) (the normalised
  OneHot; fb78691's unnormalised one could not build a RetinotopicModel, it never stored rand_onehot); our
  OneHotReadout computes p = |v| / sum |v|, so v = w - min w keeps the learnt maps and the outputs as they were.
- a0c756d's LinearStackedBNCNN with convgc built its output AbsBatchNorm1d without eps=1e-3 (torch_utils' default
  1e-5); such a checkpoint (told apart by its layout: noise right after the first batch norm, which is flat) keeps
  that eps through the checkpoint's `bn_eps`, which trainer.inference.load_checkpoint applies.

Epochs: the original counted from 0 (training.py: train_loop @5c2af72 starts at epoch 0 and saves
test_epoch_0.pt after the first epoch); ours count epochs trained, from 1. The original's epoch N (its file
test_epoch_<N>) is our epoch N + 1: `epoch` and `best_epoch` of the checkpoint are N + 1, `imported_from['epoch']`
is N with `imported_from['epoch_counted_from']` 0, and a note says so.

Scores: the original's val_acc came from its own validation split (the last 1/n_cv_folds of the training
samples, next to what it trained on); it is kept as `original_val_acc` (with `original_test_pearson`,
`original_val_loss`), never as our `best_val_pearson`. With the recording at hand (`recording`), the import scores
the model on our validation split (trainer.data.recording.load_data with the config's val_frac/val_size, windows
normalised with the checkpoint's norm_stats, Pearson r per cell of the evaluated rates, averaged) and on the test
split: those are `best_val_pearson` and `best_test`, which `register` and the champion alias compare.

Loading never unpickles code: the file is read with `weights_only=True`; numpy scalars, arrays and dtypes are
allowed, and anything else the original pickled by reference (e.g. the model class it kept in hyps['model_class'])
is replaced by an inert stand-in and reported in a note.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import config
from trainer.errors import ConfigError, UserError
from trainer.models import build_model
from trainer.models.bncnn import FlatBatchNorm
from trainer.models.retinotopic import OneHotReadout
from trainer.models.stacked import LinearStackedConv2d, PositiveBatchNorm
from trainer.training import checkpoint

SUPPORTED = ("BNCNN", "LinearStackedBNCNN", "VaryModel", "RetinotopicModel", "LN")
CONVGC_MODELS = ("BNCNN", "LinearStackedBNCNN", "VaryModel")  # RetinotopicModel never read convgc
EPOCH_FILE = re.compile(r"^.+_epoch_(\d+)\.pth?$")  # .pt (io.py: save_checkpoint) or .pth (analysis.py: read_model)
DEFAULT_ROOT = Path("imported")
# Settings that shape the model: a bad value of one of these stops the import (others are dropped with a note).
MODEL_KEYS = ("model_type", "img_shape", "chans", "ksizes", "bnorm_d", "bias", "gc_bias", "softplus", "convgc",
              "drop_p", "activ_fxn", "noise", "bn_moment", "bnorm", "n_layers", "stackconvs")
MAX_NAMED = 8  # keys named in one error line
OLD_GC_BN_EPS = 1e-5  # a0c756d's LinearStackedBNCNN with convgc: AbsBatchNorm1d(n_units) at torch_utils' default
SCORE_BATCH = 256  # windows per forward pass when scoring on the recording


@dataclass
class Imported:
    """What an import wrote: the checkpoint file, its contents and what the user should be told."""

    path: Path
    source: Path
    state: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ---- reading the original's files ------------------------------------------------------------------------------


class LeftOut:
    """Stands in for an object the original pickled by reference (e.g. its model class in hyps['model_class']):
    nothing of the checkpoint's code is imported or run, and nothing the import needs is one of these."""

    def __new__(cls, *args: Any, **kwargs: Any) -> LeftOut:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    dump_patches = False  # torch's pre-1.6 loader asks a saved module class whether to write a source patch


def _numpy_global(name: str) -> Any:
    """The numpy object a checkpoint names for its scalars, arrays and dtypes (numpy 1 or 2 names), else None."""
    parts = name.split(".")
    if parts[0] != "numpy":
        return None
    core = getattr(np, "_core", None) or np.core
    tail = parts[1:]
    if tail[:1] in (["core"], ["_core"]):
        if tail[1:] in (["multiarray", "scalar"], ["multiarray", "_reconstruct"]):
            return getattr(core.multiarray, tail[2])
        return None
    if tail in (["ndarray"], ["dtype"]):
        return getattr(np, tail[0])
    dtypes = getattr(np, "dtypes", None)
    if len(tail) == 2 and tail[0] == "dtypes" and tail[1].endswith("DType") and dtypes is not None:
        return getattr(dtypes, tail[1], None)
    return None


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a zip-format checkpoint names that torch does not allow by default (read without unpickling)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        return []
    try:
        return sorted(scan(str(path)))
    except Exception:  # e.g. the pre-1.6 (non-zip) format, which the restricted unpickler reads
        return []


def _dtype_classes() -> list[Any]:
    """The classes of numpy's dtype instances (a pickled dtype is rebuilt as one, then given its state)."""
    classes = {type(np.dtype(code)) for code in np.typecodes["All"]}
    return [(c, f"{c.__module__}.{c.__qualname__}") for c in sorted(classes, key=lambda c: c.__qualname__)]


def _allow(names: list[str], left_out: list[str]) -> list[Any]:
    """safe_globals entries for `names`: numpy's own objects, an inert stand-in for anything else."""
    entries = []
    for name in names:
        obj = _numpy_global(name)
        if obj is None:
            obj = LeftOut
            if name not in left_out:
                left_out.append(name)
        elif obj is np.dtype:
            entries.extend(_dtype_classes())
        entries.append((obj, name))
    return entries


class _RestrictedUnpickler(pickle.Unpickler):
    """For files in torch's pre-1.6 format, which torch's weights-only loader refuses when they hold a module class
    (torch.save stored those with their source, as a persistent id): the standard restricted unpickler. Globals
    resolve only to what torch's weights-only loader allows and numpy's scalars, arrays and dtypes; any other name
    becomes the inert LeftOut (recorded in `left_out`), names of modules torch blocks are refused."""

    left_out: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle  # protocol 2 files name Python 3's builtins as Python 2's (__builtin__.set)

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        blocked = getattr(torch._weights_only_unpickler, "_blocklisted_modules", ["sys", "os", "posix", "nt"])
        if module.split(".")[0] in blocked:
            raise pickle.UnpicklingError(f"unsupported GLOBAL {full} whose module {module} is blocked")
        allowed = torch._weights_only_unpickler._get_allowed_globals()
        if full in allowed:
            return allowed[full]
        obj = _numpy_global(full)
        if obj is not None:
            return obj
        if full not in self.left_out:
            self.left_out.append(full)
        return LeftOut


def _load_restricted(path: Path, left_out: list[str]) -> Any:
    import types
    import warnings

    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"left_out": left_out})
    module = types.SimpleNamespace(__name__="trainer.importer.restricted", Unpickler=unpickler,
                                   load=lambda f, **kw: unpickler(f, **kw).load())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch compares a saved module class's source with LeftOut's
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", text)
    if blocked:
        return f"it refers to {blocked.group(1)}, which is never loaded"
    found = re.search(r"(invalid load key[^.]*|Invalid magic number|Unsupported global: GLOBAL \S+|"
                      r"Can only [^,]+, but got [^ ]+)", text)
    return f"{type(exc).__name__}: {found.group(1)}" if found else type(exc).__name__


def load_original(path: Path) -> tuple[Any, list[str]]:
    """Read a torch.save file without running code from it: its object and the globals replaced by stand-ins.

    torch's weights-only loader reads it, with numpy's scalars, arrays and dtypes allowed and the other globals it
    names bound to LeftOut; a file of torch's pre-1.6 format that it refuses (e.g. it holds the model class, which
    that format saved with its source) is read by the same rules with the restricted unpickler above."""
    left_out: list[str] = []
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is None:
            return torch.load(path, map_location="cpu", weights_only=True), left_out
        with safe(_allow(_unsafe_globals(path), left_out)):
            return torch.load(path, map_location="cpu", weights_only=True), left_out
    except Exception as exc:
        error: BaseException = exc
    if not zipfile.is_zipfile(path) and "is blocked" not in str(error):
        left_out = []
        try:
            return _load_restricted(path, left_out), left_out
        except Exception as exc:
            error = exc
    raise UserError(f"{path} is not a torch checkpoint that can be read safely ({_reason(error)}); give a "
                    "test_epoch_<N>.pt (or .pth) file of torchdeepretina or its run folder")


def _epoch_files(folder: Path) -> list[tuple[int, Path]]:
    """The `<exp>_epoch_<N>.pt` and `.pth` files of a run folder, newest (largest N) first; of one N, the .pt
    (the newer name) first."""
    found = []
    for p in folder.iterdir():
        m = EPOCH_FILE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda t: (-t[0], t[1].suffix != ".pt", t[1].name))


def find_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The original's checkpoint file to import, its contents and the stand-ins it needed: `path` itself, or the
    newest `*_epoch_<N>.pt` (or `.pth`) of the folder `path` that still has `model_state_dict`."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = _epoch_files(path)
        if not files:
            raise UserError(f"{path} holds no <exp>_epoch_<N>.pt (or .pth) checkpoint of torchdeepretina; give a "
                            "run folder of the original or one of its checkpoint files")
        for _, f in files:
            data, left_out = load_original(f)
            if isinstance(data, dict) and "model_state_dict" in data:
                return f, data, left_out
        raise UserError(f"none of the {len(files)} checkpoints in {path} holds model_state_dict (the original keeps "
                        "the weights only in the newest epoch's file); give the folder that has it")
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"{path} is not a file or a folder")
    data, left_out = load_original(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a torchdeepretina checkpoint: it holds a {type(data).__name__}, not the dict "
                        "the original's save_checkpoint writes")
    if "model_state_dict" not in data:
        if "model" in data and "config" in data:
            raise UserError(f"{path} is already a retina-trainer checkpoint: use it directly (evaluate, predict)")
        hint = (" (the original keeps the weights only in the newest epoch's file: import that one, or the run "
                "folder)" if "epoch" in data else "")
        raise UserError(f"{path} is not a torchdeepretina checkpoint with weights: it has no model_state_dict{hint}")
    return path, data, left_out


# ---- hyperparameters --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Tuples, numpy scalars and 0-d tensors as the JSON-like values our schema checks."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _number(value: Any) -> float | None:
    """A finite float from a scalar the original saved (float, numpy or tensor), else None."""
    try:
        arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.size != 1 or not math.isfinite(float(arr.reshape(-1)[0])):
        return None
    return float(arr.reshape(-1)[0])


def _read_folder_hyps(folder: Path) -> dict[str, Any] | None:
    f = folder / "hyperparams.json"
    if not f.is_file():
        return None
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def original_hyps(data: dict[str, Any], folder: Path) -> tuple[dict[str, Any], str]:
    """The original's hyperparameters as one dict, and where they came from: the checkpoint's `hyps` (older:
    `model_hyps`) over the copies of them at its top level, over the run folder's hyperparams.json (which the
    original wrote with the same hyps at the start of the run)."""
    raw: dict[str, Any] = {}
    sources = []
    folder_hyps = _read_folder_hyps(folder)
    if folder_hyps:
        raw.update(folder_hyps)
        sources.append(str(folder / "hyperparams.json"))
    top = {k: v for k, v in data.items() if k in config.BY_NAME or k in config.ALIASES or k in config.LEGACY_NOOP}
    if top:
        raw.update(top)
    for key in ("hyps", "model_hyps"):
        if isinstance(data.get(key), dict):
            raw.update(data[key])
            sources.insert(0, f"the checkpoint's {key}")
            break
    else:
        if top:
            sources.insert(0, "the checkpoint's top-level keys")
    if not sources:
        raise ConfigError("the checkpoint has no hyps (nor model_hyps) and its folder no hyperparams.json: the "
                          "architecture is unknown; put the run's hyperparams.json next to the checkpoint")
    return raw, " + ".join(sources)


def parse_original(raw: dict[str, Any], where: str, notes: list[str],
                   read_here: tuple[str, ...] = ()) -> dict[str, Any]:
    """Our hyperparameter values from the original's: keys we do not know are dropped (one note, which leaves out
    `read_here`, the keys the import itself reads, e.g. convgc's centers); a bad value of a training-only key is
    dropped too, of a key that shapes the model an error."""
    if raw.get("inference_exp"):
        raise ConfigError(f"{where}: inference_exp is true (exp of the output at evaluation, on top of the "
                          "softplus or Exponential layer): no retina-trainer model computes that")
    dropped = sorted(k for k in raw if k not in config.BY_NAME and k not in config.ALIASES)
    invalid = []
    values: dict[str, Any] = {}
    # aliases first, so that our own key wins where the original wrote both (e.g. gc_bias over linear_bias)
    keys = sorted((k for k in raw if k not in dropped), key=lambda k: k in config.BY_NAME)
    for key in keys:
        target = key if key in config.BY_NAME else config.ALIASES[key][0]
        value = _plain(raw[key])
        try:
            json.dumps(value)
        except (TypeError, ValueError):  # e.g. the torch.device it trained on
            if target in MODEL_KEYS:
                raise ConfigError(f"{where}: key '{key}' is a {type(value).__name__}, not a value retina-trainer "
                                  "reads") from None
            invalid.append(key)
            continue
        try:
            parsed = config.parse_hyperparams({key: value}, where)
        except ConfigError as exc:
            if target in MODEL_KEYS:
                raise ConfigError(f"{exc} (it shapes the model, so the import cannot go on)") from None
            invalid.append(key)
            continue
        values.update(parsed.values)
    noted = [k for k in dropped if k not in read_here]
    if noted:
        notes.append(f"{where}: ignoring keys of the original that set nothing here: {', '.join(noted)}")
    if invalid:
        notes.append(f"{where}: ignoring training settings whose values retina-trainer does not take: "
                     f"{', '.join(sorted(invalid))}")
    if raw.get("zscorey"):
        notes.append(f"{where}: trained with zscorey: the model's outputs are z-scored rates, not rates")
    return values


# ---- the state dict ---------------------------------------------------------------------------------------------


# GaussianNoise's std: `sigma`, or `cuda_param` in older versions (analysis.py: read_model @f67a275 renames it)
NOISE_TENSORS = {"sigma", "cuda_param"}
KNOWN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "scale", "shift",
                 "w"} | NOISE_TENSORS


@dataclass
class Group:
    """The tensors of one module of the original's nn.Sequential: `sequential.<index>.<name>`."""

    index: int
    tensors: dict[str, Any]

    def key(self, name: str) -> str:
        return f"sequential.{self.index}.{name}"

    @property
    def keys(self) -> list[str]:
        return [self.key(n) for n in self.tensors]

    @property
    def extras(self) -> list[str]:
        """Names no module of the original's model families has (a stack's names are judged conv by conv)."""
        if self.kind == "stack":
            return []
        return [n for n in self.tensors if n not in KNOWN_TENSORS]

    @property
    def kind(self) -> str | None:
        """What the module is, from the names and shapes of its tensors (names no such module has aside)."""
        everything = set(self.tensors)
        if everything and all(n.startswith("convs.") for n in everything):
            return "stack"
        names = everything & KNOWN_TENSORS
        weight = self.tensors.get("weight")
        if names and names <= NOISE_TENSORS:
            return "noise"
        if names == {"w"} and isinstance(self.tensors["w"], torch.Tensor) and self.tensors["w"].dim() == 2:
            return "onehot"  # RetinotopicModel's OneHot (custom_modules.py @fb78691)
        if {"scale", "shift", "running_mean", "running_var"} == names:
            return "absbn"
        if {"weight", "bias", "running_mean", "running_var"} <= names <= {"weight", "bias", "running_mean",
                                                                           "running_var", "num_batches_tracked"}:
            return "bn"
        if "weight" in names and names <= {"weight", "bias"} and isinstance(weight, torch.Tensor):
            return {4: "conv", 2: "linear"}.get(weight.dim())
        return None

    def features(self) -> int | None:
        """The number of features of a batch norm group (its running mean's length), else None."""
        mean = self.tensors.get("running_mean")
        return int(mean.numel()) if self.kind in ("bn", "absbn") and isinstance(mean, torch.Tensor) else None


def _groups(state_dict: dict[str, Any]) -> tuple[list[Group], list[str]]:
    """The original's modules in index order, and the keys that are not `sequential.<N>.<name>`."""
    by_index: dict[int, dict[str, Any]] = {}
    other = []
    for key, value in state_dict.items():
        m = re.match(r"^sequential\.(\d+)\.(.+)$", str(key))
        if m is None:
            other.append(str(key))
            continue
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return [Group(i, by_index[i]) for i in sorted(by_index)], other


@dataclass
class Slot:
    """A layer of our model that takes weights: its name in our state dict and the kind of original module."""

    prefix: str  # e.g. "conv1.", "bn1.bn.", "hidden.0.conv."
    kind: str
    module: nn.Module


def _slots(model: nn.Module) -> list[Slot]:
    """Our layers that take weights, in forward order (the order every model here registers its modules in), by the
    kind of the original's module whose tensors each takes."""
    slots: list[Slot] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, m in module.named_children():
            p = f"{prefix}{name}."
            if isinstance(m, LinearStackedConv2d):
                slots.append(Slot(p, "stack", m))
            elif isinstance(m, nn.Conv2d):
                slots.append(Slot(p, "conv", m))
            elif isinstance(m, nn.Linear):
                slots.append(Slot(p, "linear", m))
            elif isinstance(m, PositiveBatchNorm):
                slots.append(Slot(p, "absbn", m))
            elif isinstance(m, FlatBatchNorm):
                slots.append(Slot(f"{p}bn.", "bn", m.bn))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                slots.append(Slot(p, "bn", m))
            elif isinstance(m, OneHotReadout):
                slots.append(Slot(p, "onehot", m))
            else:
                walk(p, m)

    walk("", model)
    return slots


def _renames(group: Group, slot: Slot) -> Iterator[tuple[str, str]]:
    """(original name inside the group, our state-dict key) for the tensors of a group assigned to `slot`."""
    if slot.kind == "absbn":
        ours = {"scale": "weight", "shift": "bias"}
        for n in group.tensors:
            yield n, slot.prefix + ours.get(n, n)
    elif slot.kind == "onehot":
        for n in group.tensors:
            yield n, slot.prefix + ("weight" if n == "w" else n)
    elif slot.kind == "stack":
        convs: dict[int, list[str]] = {}
        for n in group.tensors:
            m = re.match(r"^convs\.(\d+)\.(weight|bias)$", n)
            if m is None:
                yield n, ""  # e.g. a batch norm between the stacked convs: nothing of ours takes it
                continue
            convs.setdefault(int(m.group(1)), []).append(n)
        for j, k in enumerate(sorted(convs)):  # with dropout between them the convs sit at 0, 2, 4, ...
            for n in convs[k]:
                yield n, f"{slot.prefix}convs.{j}.{n.rsplit('.', 1)[1]}"
    else:
        for n in group.tensors:
            yield n, slot.prefix + n


def _onehot_weights(w: torch.Tensor) -> torch.Tensor:
    """Our OneHotReadout weights that give the original's read-out: it used p = (w - min w) / sum(w - min w) per
    cell, ours p = |v| / sum |v|, so v = w - min w (>= 0), computed in the dtype the original computed it in."""
    return w - w.min(dim=1, keepdim=True).values


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED])
    return shown + (f" and {len(keys) - MAX_NAMED} more" if len(keys) > MAX_NAMED else "")


def _describe(cfg: dict[str, Any]) -> str:
    layers = f", n_layers {cfg['n_layers']}, stackconvs {str(cfg['stackconvs']).lower()}" \
        if cfg["model_type"] in ("VaryModel", "RetinotopicModel") else ""
    gc = f", convgc {str(cfg['convgc']).lower()}" if cfg["model_type"] in CONVGC_MODELS else ""
    return (f"a {cfg['model_type']} with img_shape {cfg['img_shape']}, chans {cfg['chans']}, ksizes "
            f"{cfg['ksizes']}{layers}, bnorm_d {cfg['bnorm_d']}, bias {str(cfg['bias']).lower()}, gc_bias "
            f"{str(cfg['gc_bias']).lower()}{gc}")


def map_state_dict(state_dict: dict[str, Any], model: nn.Module, cfg: dict[str, Any], where: str,
                   extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The original's tensors under our model's keys, every shape checked, with `extra` (our tensors the original
    kept no tensor for, e.g. the convgc read-out positions); ConfigError naming the keys that map nowhere, or the
    layers the checkpoint lacks."""
    groups, unmapped = _groups(state_dict)
    ours = model.state_dict()
    slots = _slots(model)
    mapped: dict[str, torch.Tensor] = {}
    i = 0
    for group in groups:
        kind = group.kind
        unmapped.extend(group.key(n) for n in group.extras)
        if kind == "noise":  # GaussianNoise's sigma: the noise is off at evaluation, ours keeps its own
            continue
        if kind is None or i >= len(slots) or slots[i].kind != kind:
            unmapped.extend(group.key(n) for n in group.tensors if n not in group.extras)
            continue
        slot = slots[i]
        i += 1
        for name, key in _renames(group, slot):
            if name in group.extras:
                continue
            value = group.tensors[name]
            if key not in ours:
                unmapped.append(group.key(name))
                continue
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"{where}: {group.key(name)} is not a tensor ({type(value).__name__})")
            if tuple(value.shape) != tuple(ours[key].shape):
                raise ConfigError(
                    f"{where}: {group.key(name)} has shape {list(value.shape)} but {key} of {_describe(cfg)} (from "
                    f"its hyperparameters) has shape {list(ours[key].shape)}: the hyperparameters do not describe "
                    "these weights")
            value = value.detach()
            if slot.kind == "onehot":
                value = _onehot_weights(value)
            mapped[key] = value.to(dtype=ours[key].dtype).clone()
    if unmapped:
        raise ConfigError(
            f"{where}: state_dict keys {_names(unmapped)} map onto no layer of {_describe(cfg)} built from the "
            f"checkpoint's hyperparameters (imports take {', '.join(SUPPORTED)} in the layouts of "
            "torchdeepretina's models.py)")
    for key, value in (extra or {}).items():
        mapped[key] = value.to(dtype=ours[key].dtype).clone()
    for key, value in ours.items():  # batch norms saved before torch counted batches: keep our count (0)
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = value.clone()
    missing = [k for k in ours if k not in mapped]
    if missing:
        raise ConfigError(f"{where}: the checkpoint has no weights for {_names(missing)} of {_describe(cfg)} built "
                          "from its hyperparameters")
    return mapped


def _n_units(state_dict: dict[str, Any], where: str) -> int:
    """The number of cells: the rows of the linear ganglion-cell layer's weight, else of OneHot's `w`, else the
    output channels of the last conv (convgc's ganglion-cell conv)."""
    groups, _ = _groups(state_dict)
    for kind, name in (("linear", "weight"), ("onehot", "w")):
        found = [g for g in groups if g.kind == kind]
        if found:
            return int(found[0].tensors[name].shape[0])
    convs = [g for g in groups if g.kind == "conv"]
    if not convs:
        raise ConfigError(f"{where}: no ganglion-cell layer (a 2-D sequential.N.weight, or a conv) in its "
                          f"state_dict; keys: {_names(list(map(str, state_dict)))}")
    return int(convs[-1].tensors["weight"].shape[0])


def _noise_follows_first_bn(state_dict: dict[str, Any]) -> bool:
    """Whether GaussianNoise comes right after the first batch norm (BN, noise, ReLU, Reshape: the order before
    fb78691, e.g. a0c756d) rather than after a Reshape (BN, Reshape, noise, ReLU) when that batch norm is flat."""
    groups, _ = _groups(state_dict)
    for n, g in enumerate(groups):
        if g.kind in ("bn", "absbn"):
            nxt = groups[n + 1] if n + 1 < len(groups) else None
            return nxt is not None and nxt.kind == "noise" and nxt.index == g.index + 1
    return False


# ---- what the state dict does not hold -----------------------------------------------------------------------------


def _as_list(value: Any) -> Any:
    """A list from a list, tuple, numpy array or tensor the original saved; other values as they are."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return _plain(value)


def _check_options(raw: dict[str, Any], values: dict[str, Any], model_type: str, where: str) -> None:
    """The original's layer options that no model here has (models.py @fb78691: paddings, stack_ksizes,
    stack_chans, one2one; RetinotopicModel's collapsed) must be at the values that build what ours build."""
    if model_type in ("BNCNN", "LN"):
        return
    if model_type == "LinearStackedBNCNN":
        n_hidden, stacked = 2, True
    else:
        n_hidden, stacked = int(values.get("n_layers", 3)) - 1, bool(values.get("stackconvs", True))
    chans = list(values.get("chans", [8, 8]))
    if model_type == "RetinotopicModel" and raw.get("collapsed"):
        raise ConfigError(f"{where}: collapsed is true (a RetinotopicModel whose per-cell conv was collapsed onto "
                          "cell types, ConsolidatedOneHot): retina-trainer imports RetinotopicModel with one map per "
                          "cell only")
    if stacked and model_type != "RetinotopicModel" and raw.get("one2one"):
        raise ConfigError(f"{where}: one2one is true (stacked convolutions without crosstalk between channels, "
                          "OneToOneLinearStackedConv2d): no retina-trainer model has them, so it cannot be imported")

    def used(key: str, default: Any) -> list[Any]:
        value = _as_list(raw.get(key, default))
        if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value] * n_hidden
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} {value!r} is neither a number nor a list (one entry per layer)")
        return value[:n_hidden]

    pads = used("paddings", 0)
    if any(p not in (None, 0) for p in pads):
        raise ConfigError(f"{where}: paddings {_as_list(raw['paddings'])} pad the hidden convolutions; "
                          "retina-trainer's are unpadded, so this model cannot be imported")
    if not stacked:
        return
    ksizes = used("stack_ksizes", 3)
    if any(k != 3 for k in ksizes):
        raise ConfigError(f"{where}: stack_ksizes {_as_list(raw['stack_ksizes'])}: retina-trainer stacks 3x3 "
                          "convolutions only, so this model cannot be imported")
    inner = used("stack_chans", None)
    if any(c is not None and c != chans[i] for i, c in enumerate(inner) if i < len(chans)):
        raise ConfigError(f"{where}: stack_chans {_as_list(raw['stack_chans'])}: retina-trainer's stacked "
                          "convolutions keep the layer's channels between them, so this model cannot be imported")


def grab_units_positions(raw: dict[str, Any], cfg: dict[str, Any], gc_size: tuple[int, int], n_units: int,
                         where: str) -> torch.Tensor:
    """Where the original's GrabUnits read each cell in the (gc_size) ganglion-cell map, as (n_units, 2) (row, col)
    indices in [0, size): custom_modules.py: GrabUnits.centers2coords @fb78691 (the same in the torch_utils.py of
    a0c756d's time) moved each of hyps['centers'] by half an effective kernel of ksizes[0..2] (whatever n_layers
    is) and clamped it between 0 and img_shape - 2 * (that - 1), a bound below 0 for the shipped configs, so every
    cell reads one position; a negative index read from the map's far edge, as here."""
    ksizes = [int(k) for k in cfg["ksizes"]]
    if len(ksizes) < 3:
        raise ConfigError(f"{where}: convgc with ksizes {ksizes}: the original's GrabUnits needs 3 ksizes (it "
                          "asserted more than 2), so these weights cannot come from it; check hyps 'ksizes'")
    centers = _as_list(raw.get("centers"))
    shape = "a list of one [row, col] per cell"
    if centers is None:
        raise ConfigError(f"{where}: convgc without hyps 'centers' (the cells' receptive-field centres the original's "
                          "training loop took from the recording): where the original read each cell is unknown; put "
                          "them in the run's hyperparams.json as 'centers'")
    if not isinstance(centers, list) or len(centers) != n_units:
        n = len(centers) if isinstance(centers, list) else type(centers).__name__
        raise ConfigError(f"{where}: hyps 'centers' must be {shape} ({n_units} cells), got {n} entries")
    half = (ksizes[0] - 1) + (ksizes[1] - 1) + (ksizes[2] // 2 - 1) + 1
    height, width = int(cfg["img_shape"][1]), int(cfg["img_shape"][2])
    gh, gw = gc_size
    out = []
    for i, center in enumerate(centers):
        if not (isinstance(center, list) and len(center) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in center)):
            raise ConfigError(f"{where}: hyps 'centers' must be {shape}; entry {i} is {center!r}")
        # torch.LongTensor of the clamped values: a fractional centre is cut towards 0
        row = int(min(max(0, center[0] - half), height - 2 * (half - 1)))
        col = int(min(max(0, center[1] - half), width - 2 * (half - 1)))
        if not (-gh <= row < gh and -gw <= col < gw):
            raise ConfigError(f"{where}: convgc: the original's GrabUnits reads cell {i} (centre {center}) at row "
                              f"{row}, column {col} of the {gh}x{gw} ganglion-cell map, outside it, so the original "
                              "could not have run these weights; check hyps 'centers', 'ksizes' and 'img_shape'")
        out.append((row % gh, col % gw))
    return torch.tensor(out, dtype=torch.long)


def _positions_note(positions: torch.Tensor, gc_size: tuple[int, int], where: str) -> str:
    pos = [tuple(int(v) for v in p) for p in positions.tolist()]
    at = (f"every one of the {len(pos)} cells at (row, col) {pos[0]}" if len(set(pos)) == 1 else
          "the cells at (row, col) " + ", ".join(map(str, pos)))
    return (f"{where}: convgc: as the original's GrabUnits, the imported model reads {at} of the {gc_size[0]}x"
            f"{gc_size[1]} ganglion-cell map (its clamped centres, custom_modules.py: centers2coords); a model "
            "trained here would read each cell at its own receptive-field peak (docs/differences.md)")


# ---- scoring on our validation split -----------------------------------------------------------------------------


def score_on_recording(model: nn.Module, cfg: dict[str, Any], norm: dict[str, float], cell_ids: list[int],
                       recording: Path) -> dict[str, Any]:
    """Mean Pearson r over cells of the model's evaluated rates on our validation and test splits of `recording`
    (trainer.data.recording.load_data with the config's val_frac and val_size, as a run of ours is scored each
    epoch), the windows normalised with the checkpoint's norm_stats (what the model was trained on)."""
    from trainer.data.recording import load_data
    from trainer.data.windows import WindowSet
    from trainer.training.metrics import pearson_per_cell
    from trainer.training.trainer import as_rates

    data = load_data(recording, cells=cell_ids, img_shape=cfg["img_shape"], val_frac=cfg["val_frac"],
                     val_size=cfg.get("val_size", 0))
    model.eval()
    out: dict[str, Any] = {"recording": str(Path(recording).resolve()), "val_samples": len(data.val)}
    for name, split in (("val", data.val), ("test", data.test)):
        windows = WindowSet(split.stimulus, split.rates, split.starts, split.history, norm["mean"], norm["std"])
        with torch.no_grad():
            pred = torch.cat([as_rates(cfg, model(x)) for x, _ in windows.batches(SCORE_BATCH)])
        out[f"{name}_pearson"] = pearson_per_cell(pred, windows.targets).mean().item()
    return out


def _recording(recording: str | Path | None, data_root: str | None, cfg: dict[str, Any], named: bool,
               where: str) -> Path | None:
    """The recording to score on: `recording`, else <data_root>/<dataset>/<stim_type>.h5, else none."""
    if recording is not None:
        return Path(recording).expanduser()
    if data_root is None:
        return None
    if not named:
        raise UserError(f"{where}: --data-root: the checkpoint's hyperparameters do not name its recording "
                        "(dataset); give the file with --recording")
    from trainer.data.recording import recording_path, resolve_data_root

    return recording_path(resolve_data_root(data_root), cfg["dataset"], cfg["stim_type"])


# ---- the import -------------------------------------------------------------------------------------------------


def default_out(source: Path, given: Path) -> Path:
    """imported/<name of the checkpoint's folder>."""
    folder = given if given.is_dir() else source.parent
    name = folder.resolve().name or source.stem
    return DEFAULT_ROOT / name


def _settle_gc_bias(raw: dict[str, Any], values: dict[str, Any], state_dict: dict[str, Any], where: str,
                    notes: list[str], convgc: bool) -> None:
    """Hyps that hold both gc_bias and its older name linear_bias: the original's models read one of them, which
    one depends on its version; take the one that agrees with whether the saved ganglion-cell layer (linear, or
    the convgc conv) has a bias."""
    if "gc_bias" not in raw or "linear_bias" not in raw:
        return
    old, new = bool(raw["linear_bias"]), bool(raw["gc_bias"])
    if old == new:
        return
    groups, _ = _groups(state_dict)
    layers = [g for g in groups if g.kind == ("conv" if convgc else "linear")]
    saved = bool(layers) and "bias" in layers[-1 if convgc else 0].tensors
    values["gc_bias"] = saved
    notes.append(f"{where}: gc_bias {str(new).lower()} and linear_bias {str(old).lower()} disagree; the saved "
                 f"ganglion-cell layer {'has' if saved else 'has no'} bias, as "
                 f"{'linear_bias' if saved == old else 'gc_bias'} says")


def _cells(values: dict[str, Any], n_units: int, where: str, notes: list[str]) -> list[int]:
    from trainer.data.cells import ORIGINAL_CELLS

    cells = values.get("cells", "all")
    if isinstance(cells, list):
        if len(cells) != n_units:
            raise ConfigError(f"{where}: cells lists {len(cells)} cells but the output layer has {n_units} units")
        return [int(c) for c in cells]
    dataset = values.get("dataset")
    if dataset in ORIGINAL_CELLS:
        if len(ORIGINAL_CELLS[dataset]) == n_units:
            return list(ORIGINAL_CELLS[dataset])
        notes.append(f"{where}: cells \"all\" of {dataset} is {len(ORIGINAL_CELLS[dataset])} cells in the "
                     f"original's list but the model has {n_units} outputs: taking rows 0..{n_units - 1}")
    return list(range(n_units))


def _norm(data: dict[str, Any], where: str) -> dict[str, float]:
    stats = data.get("norm_stats")
    if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
        raise ConfigError(f"{where}: no norm_stats {{'mean', 'std'}} (the training stimulus' normalisation), "
                          "without which the model cannot be fed")
    mean, std = _number(stats["mean"]), _number(stats["std"])
    if mean is None or std is None or std <= 0:
        raise ConfigError(f"{where}: norm_stats must hold one finite mean and one positive std (the original "
                          f"z-scored the whole stimulus with them), got {stats['mean']!r}, {stats['std']!r}")
    return {"mean": mean, "std": std}


def _original_epoch(data: dict[str, Any], source: Path) -> int | None:
    """The original's (0-based) epoch: the checkpoint's `epoch`, else the N of its file name, else None."""
    value = _number(data.get("epoch"))
    if value is not None and value >= 0 and value == int(value):
        return int(value)
    m = EPOCH_FILE.match(source.name)
    return int(m.group(1)) if m else None


def _retinotopic_values(values: dict[str, Any], where: str, notes: list[str]) -> None:
    """RetinotopicModel's per-cell conv took ksizes[-1] (models.py @fb78691), ours takes ksizes[n_layers - 1]:
    the same kernel when ksizes has n_layers entries; with more, ours is given the original's. It never read
    convgc (only its unused tiled_forward did)."""
    n_layers = int(values.get("n_layers", 3))
    ksizes = list(values.get("ksizes", config.BY_NAME["ksizes"].default))
    if len(ksizes) > n_layers >= 1:
        values["ksizes"] = ksizes[:n_layers - 1] + [ksizes[-1]]
        notes.append(f"{where}: RetinotopicModel with n_layers {n_layers} and ksizes {ksizes}: the original's "
                     f"per-cell conv used the last ksize ({ksizes[-1]}); imported with ksizes {values['ksizes']}")
    if values.get("convgc"):
        notes.append(f"{where}: convgc is ignored: the original's RetinotopicModel reads cells with its one-hot maps")
        values["convgc"] = False


def convert(data: dict[str, Any], source: Path, folder: Path, notes: list[str]) -> tuple[dict[str, Any], nn.Module]:
    """Our checkpoint (the dict best.pt holds) from the original's checkpoint dict, and the model it holds."""
    where = str(source)
    state_dict = data["model_state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConfigError(f"{where}: model_state_dict is empty or not a dict of tensors")
    raw, hyps_from = original_hyps(data, folder)
    model_type = data.get("model_type", raw.get("model_type"))
    if model_type not in SUPPORTED:
        keys = list(map(str, state_dict))
        raise ConfigError(f"{where}: model_type '{model_type}' cannot be imported: retina-trainer imports "
                          f"{', '.join(SUPPORTED)}; its state_dict keys {_names(keys)} map onto no model here")
    raw = {**raw, "model_type": model_type}
    read_here = ("centers",) if model_type in CONVGC_MODELS and raw.get("convgc") else ()
    values = parse_original(raw, f"{where} ({hyps_from})", notes, read_here)
    _check_options(raw, values, model_type, where)
    if values.get("bnorm") is False and model_type != "LN":
        notes.append(f"{where}: bnorm false is ignored: the original's {model_type} always has batch norms")
    values["bnorm"] = True  # LN has none and does not read it
    if model_type == "RetinotopicModel":
        _retinotopic_values(values, where, notes)
    convgc = bool(values.get("convgc")) and model_type in CONVGC_MODELS
    n_units = _n_units(state_dict, where)
    _settle_gc_bias(raw, values, state_dict, where, notes, convgc)
    cell_ids = _cells(values, n_units, where, notes)
    values["cells"] = cell_ids
    if "dataset" not in values:
        notes.append(f"{where}: the hyperparameters do not name the recording (dataset); give evaluate "
                     "--recording")
    cfg = config.resolve(values)
    model = build_model(cfg, n_units)
    extra: dict[str, torch.Tensor] = {}
    if convgc:
        gc_size = (int(model.gc_shape[1]), int(model.gc_shape[2]))
        extra["positions"] = grab_units_positions(raw, cfg, gc_size, n_units, where)
        notes.append(_positions_note(extra["positions"], gc_size, where))
    model.load_state_dict(map_state_dict(state_dict, model, cfg, where, extra))
    bn_eps: dict[str, float] = {}
    if convgc and model_type == "LinearStackedBNCNN" and cfg["bnorm_d"] == 1 and _noise_follows_first_bn(state_dict):
        bn_eps["bn_out"] = OLD_GC_BN_EPS
        model.bn_out.eps = OLD_GC_BN_EPS
        notes.append(f"{where}: the layout of models.py before fb78691 (a0c756d: noise right after each batch norm) "
                     f"built convgc's output batch norm with eps {OLD_GC_BN_EPS:g}, not 1e-3: kept")
    if model_type == "RetinotopicModel":
        flat = [cell_ids[i] for i, row in enumerate(model.onehot.weight.detach()) if not bool((row > 0).any())]
        if flat:
            notes.append(f"{where}: the one-hot weights of cells {flat} are all equal: the original read them as 0/0 "
                         "(NaN); here they read 0")
    norm = _norm(data, where)
    n = _original_epoch(data, source)
    epoch = n + 1 if n is not None else 0
    if n is None:
        notes.append(f"{where}: the checkpoint does not say its epoch; recorded as epoch 0")
    else:
        notes.append(f"{where}: the original counted epochs from 0: its epoch {n} is epoch {epoch} here (epochs "
                     "trained)")
    val_acc, test_r = _number(data.get("val_acc")), _number(data.get("test_pearson"))
    metrics = {k: v for k, v in (("original_val_acc", val_acc), ("original_test_pearson", test_r),
                                 ("original_val_loss", _number(data.get("val_loss")))) if v is not None}
    imported_from = {"source": str(source.resolve()), "epoch": n, "epoch_counted_from": 0, "model_type": model_type,
                     "val_acc": val_acc, "test_pearson": test_r, "hyperparams": hyps_from,
                     "dataset": values.get("dataset"), "trainer": "torchdeepretina"}
    state = {
        "format": checkpoint.FORMAT, "epoch": epoch, "metrics": metrics, "history": [], "best_epoch": epoch,
        "best_val_pearson": float("nan"), "best_test": float("nan"),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": cfg, "norm": norm, "cell_ids": cell_ids, "n_cells": n_units, "model_type": model_type,
        "imported_from": imported_from,
    }
    if bn_eps:
        state["bn_eps"] = bn_eps
    return state, model


def import_checkpoint(path: str | Path, out: str | Path | None = None, force: bool = False,
                      recording: str | Path | None = None, data_root: str | None = None) -> Imported:
    """Convert the original's checkpoint at `path` (a file, or a run folder: its newest checkpoint with weights)
    into `<out>/best.pt` (default out: imported/<the checkpoint's folder name>). With `recording` (or `data_root`,
    under which <dataset>/<stim_type>.h5 of its hyperparameters), score it on our validation and test splits of
    that recording: best_val_pearson and best_test."""
    given = Path(path).expanduser()
    if out is not None:
        _refuse_overwrite(Path(out).expanduser() / checkpoint.BEST, force)
    source, data, left_out = find_checkpoint(given)
    notes: list[str] = []
    if left_out:
        notes.append(f"{source}: left out what the original pickled by reference (not needed to import): "
                     f"{', '.join(left_out)}")
    target = (Path(out).expanduser() if out is not None else default_out(source, given)) / checkpoint.BEST
    _refuse_overwrite(target, force)
    state, model = convert(data, source, given if given.is_dir() else source.parent, notes)
    named = state["imported_from"]["dataset"] is not None
    rec = _recording(recording, data_root, state["config"], named, str(source))
    if rec is not None:
        scores = score_on_recording(model, state["config"], state["norm"], state["cell_ids"], rec)
        state["metrics"].update(val_pearson=scores["val_pearson"], test_pearson=scores["test_pearson"])
        state["best_val_pearson"], state["best_test"] = scores["val_pearson"], scores["test_pearson"]
        state["imported_from"]["scored_on"] = scores["recording"]
    checkpoint.save(state, target)
    return Imported(path=target, source=source, state=state, notes=notes)


def _refuse_overwrite(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to replace it, or --out another folder")


def run_metrics(state: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of an imported checkpoint: the original's scores under their own names (original_val_acc,
    original_test_pearson, original_val_loss: its validation split is not ours, so they rank nothing), and, when
    the import scored it on the recording, our validation and test r as best_val_pearson and test_pearson_at_best,
    which `register` and the champion alias compare; best_epoch is our (1-based) epoch."""
    out = {k: float(v) for k, v in state["metrics"].items() if _number(v) is not None}
    if "val_pearson" in out:
        out["best_val_pearson"] = out["val_pearson"]
    if "test_pearson" in out:
        out["test_pearson_at_best"] = out["test_pearson"]
    out["best_epoch"] = float(state["epoch"])
    return out
