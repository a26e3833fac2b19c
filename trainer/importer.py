"""Import a model trained with the original torchdeepretina (github.com/baccuslab/torch-deep-retina).

The original's training loop saves `<folder>/test_epoch_<N>.pt` every epoch (torchdeepretina/io.py:
save_checkpoint): a dict with `model_type`, `model_state_dict` (its nn.Sequential's `sequential.N.*` tensors),
`hyps` (older versions: `model_hyps`), `norm_stats` ({'mean', 'std'} of the training stimulus), `epoch`,
`val_acc`, `test_pearson`, ... and every hyperparameter copied to the top level. Without save_every_epoch only the
newest file keeps the weights. `import_checkpoint` turns one such file (or the newest one of a run folder that has
weights) into our `best.pt`, so `evaluate`, `predict` and `trainer.inference.load_model` use it.

The weights are assigned by walking `sequential.N` in increasing N and matching each module by what its tensors
are (conv weight 4-D, linear weight 2-D, batch norm, the original's AbsBatchNorm with scale/shift, a stack of 3x3
convs, GaussianNoise's sigma, which is dropped) to the layers of our model built from the checkpoint's
hyperparameters, in order, every shape checked; nothing depends on module indices, so the layouts of every
version (Reshape after the second batch norm or not, bnorm_d 1 or 2, dropout inside the stacks) map. A key that
maps nowhere is an error that names it.

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
from trainer.models.stacked import LinearStackedConv2d, PositiveBatchNorm
from trainer.training import checkpoint

SUPPORTED = ("BNCNN", "LinearStackedBNCNN")
EPOCH_FILE = re.compile(r"^.+_epoch_(\d+)\.pt$")
DEFAULT_ROOT = Path("imported")
# Settings that shape the model: a bad value of one of these stops the import (others are dropped with a note).
MODEL_KEYS = ("model_type", "img_shape", "chans", "ksizes", "bnorm_d", "bias", "gc_bias", "softplus", "convgc",
              "drop_p", "activ_fxn", "noise", "bn_moment", "bnorm")
MAX_NAMED = 8  # keys named in one error line


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
                    "test_epoch_<N>.pt file of torchdeepretina or its run folder")


def _epoch_files(folder: Path) -> list[tuple[int, Path]]:
    """The `<exp>_epoch_<N>.pt` files of a run folder, newest (largest N) first."""
    found = []
    for p in folder.iterdir():
        m = EPOCH_FILE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda t: (-t[0], t[1].name))


def find_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The original's checkpoint file to import, its contents and the stand-ins it needed: `path` itself, or the
    newest `*_epoch_<N>.pt` of the folder `path` that still has `model_state_dict`."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = _epoch_files(path)
        if not files:
            raise UserError(f"{path} holds no <exp>_epoch_<N>.pt checkpoint of torchdeepretina; give a run folder "
                            "of the original or one of its checkpoint files")
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


def parse_original(raw: dict[str, Any], where: str, notes: list[str]) -> dict[str, Any]:
    """Our hyperparameter values from the original's: keys we do not know are dropped (one note); a bad value of
    a training-only key is dropped too, of a key that shapes the model an error."""
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
    if dropped:
        notes.append(f"{where}: ignoring keys of the original that set nothing here: {', '.join(dropped)}")
    if invalid:
        notes.append(f"{where}: ignoring training settings whose values retina-trainer does not take: "
                     f"{', '.join(sorted(invalid))}")
    if raw.get("zscorey"):
        notes.append(f"{where}: trained with zscorey: the model's outputs are z-scored rates, not rates")
    return values


# ---- the state dict ---------------------------------------------------------------------------------------------


KNOWN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "scale", "shift", "sigma"}


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
        """Names no module of the original's BNCNN family has (a stack's names are judged conv by conv)."""
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
        if names == {"sigma"}:
            return "noise"
        if {"scale", "shift", "running_mean", "running_var"} == names:
            return "absbn"
        if {"weight", "bias", "running_mean", "running_var"} <= names <= {"weight", "bias", "running_mean",
                                                                           "running_var", "num_batches_tracked"}:
            return "bn"
        if "weight" in names and names <= {"weight", "bias"} and isinstance(weight, torch.Tensor):
            return {4: "conv", 2: "linear"}.get(weight.dim())
        return None


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

    prefix: str  # e.g. "conv1.", "bn1.bn."
    kind: str
    module: nn.Module


def _slots(model: nn.Module) -> list[Slot]:
    """Our layers in forward order, by the kind of the original's module whose tensors each takes."""
    slots = []
    for name in ("conv1", "bn1", "conv2", "bn2", "readout", "bn_out"):
        m = getattr(model, name)
        if isinstance(m, LinearStackedConv2d):
            slots.append(Slot(f"{name}.", "stack", m))
        elif isinstance(m, nn.Conv2d):
            slots.append(Slot(f"{name}.", "conv", m))
        elif isinstance(m, nn.Linear):
            slots.append(Slot(f"{name}.", "linear", m))
        elif isinstance(m, PositiveBatchNorm):
            slots.append(Slot(f"{name}.", "absbn", m))
        elif isinstance(m, FlatBatchNorm):
            slots.append(Slot(f"{name}.bn.", "bn", m.bn))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            slots.append(Slot(f"{name}.", "bn", m))
    return slots


def _renames(group: Group, slot: Slot) -> Iterator[tuple[str, str]]:
    """(original name inside the group, our state-dict key) for the tensors of a group assigned to `slot`."""
    if slot.kind == "absbn":
        ours = {"scale": "weight", "shift": "bias"}
        for n in group.tensors:
            yield n, slot.prefix + ours.get(n, n)
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


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED])
    return shown + (f" and {len(keys) - MAX_NAMED} more" if len(keys) > MAX_NAMED else "")


def _describe(cfg: dict[str, Any]) -> str:
    return (f"a {cfg['model_type']} with img_shape {cfg['img_shape']}, chans {cfg['chans']}, ksizes "
            f"{cfg['ksizes']}, bnorm_d {cfg['bnorm_d']}, bias {str(cfg['bias']).lower()}, gc_bias "
            f"{str(cfg['gc_bias']).lower()}")


def map_state_dict(state_dict: dict[str, Any], model: nn.Module, cfg: dict[str, Any],
                   where: str) -> dict[str, torch.Tensor]:
    """The original's tensors under our model's keys, every shape checked; ConfigError naming the keys that map
    nowhere, or the layers the checkpoint lacks."""
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
            mapped[key] = value.detach().to(dtype=ours[key].dtype).clone()
    if unmapped:
        raise ConfigError(
            f"{where}: state_dict keys {_names(unmapped)} map onto no layer of {_describe(cfg)} built from the "
            f"checkpoint's hyperparameters (imports take {' and '.join(SUPPORTED)} without convgc, in the layouts "
            "of torchdeepretina's models.py)")
    for key, value in ours.items():  # batch norms saved before torch counted batches: keep our count (0)
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = value.clone()
    missing = [k for k in ours if k not in mapped]
    if missing:
        raise ConfigError(f"{where}: the checkpoint has no weights for {_names(missing)} of {_describe(cfg)} built "
                          "from its hyperparameters")
    return mapped


def _n_units(state_dict: dict[str, Any], where: str) -> int:
    """Rows of the output layer's weight: the 2-D `weight` of the original's sequential (its models have one)."""
    groups, _ = _groups(state_dict)
    linear = [g for g in groups if g.kind == "linear"]
    if not linear:
        raise ConfigError(f"{where}: no linear ganglion-cell layer (a 2-D sequential.N.weight) in its state_dict; "
                          f"keys: {_names(list(map(str, state_dict)))}")
    return int(linear[0].tensors["weight"].shape[0])


# ---- the import -------------------------------------------------------------------------------------------------


def default_out(source: Path, given: Path) -> Path:
    """imported/<name of the checkpoint's folder>."""
    folder = given if given.is_dir() else source.parent
    name = folder.resolve().name or source.stem
    return DEFAULT_ROOT / name


def _settle_gc_bias(raw: dict[str, Any], values: dict[str, Any], state_dict: dict[str, Any], where: str,
                    notes: list[str]) -> None:
    """Hyps that hold both gc_bias and its older name linear_bias: the original's models read one of them, which
    one depends on its version; take the one that agrees with whether the saved linear layer has a bias."""
    if "gc_bias" not in raw or "linear_bias" not in raw:
        return
    old, new = bool(raw["linear_bias"]), bool(raw["gc_bias"])
    if old == new:
        return
    groups, _ = _groups(state_dict)
    saved = any("bias" in g.tensors for g in groups if g.kind == "linear")
    values["gc_bias"] = saved
    notes.append(f"{where}: gc_bias {str(new).lower()} and linear_bias {str(old).lower()} disagree; the saved "
                 f"linear layer {'has' if saved else 'has no'} bias, as {'linear_bias' if saved == old else 'gc_bias'} "
                 "says")


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


def convert(data: dict[str, Any], source: Path, folder: Path, notes: list[str]) -> dict[str, Any]:
    """Our checkpoint (the dict best.pt holds) from the original's checkpoint dict."""
    where = str(source)
    state_dict = data["model_state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConfigError(f"{where}: model_state_dict is empty or not a dict of tensors")
    raw, hyps_from = original_hyps(data, folder)
    model_type = data.get("model_type", raw.get("model_type"))
    if model_type not in SUPPORTED:
        keys = list(map(str, state_dict))
        raise ConfigError(f"{where}: model_type '{model_type}' cannot be imported: retina-trainer imports "
                          f"{' and '.join(SUPPORTED)} (without convgc); its state_dict keys {_names(keys)} map "
                          "onto no model here")
    raw = {**raw, "model_type": model_type}
    values = parse_original(raw, f"{where} ({hyps_from})", notes)
    if values.get("convgc"):
        raise ConfigError(f"{where}: convgc is true (a convolutional ganglion-cell layer read at clamped "
                          "positions, GrabUnits): retina-trainer imports BNCNN and LinearStackedBNCNN without convgc")
    if values.get("bnorm") is False:
        notes.append(f"{where}: bnorm false is ignored: the original's {model_type} always has batch norms")
    values["bnorm"] = True
    n_units = _n_units(state_dict, where)
    _settle_gc_bias(raw, values, state_dict, where, notes)
    cell_ids = _cells(values, n_units, where, notes)
    values["cells"] = cell_ids
    if "dataset" not in values:
        notes.append(f"{where}: the hyperparameters do not name the recording (dataset); give evaluate "
                     "--recording")
    cfg = config.resolve(values)
    model = build_model(cfg, n_units)
    model.load_state_dict(map_state_dict(state_dict, model, cfg, where))
    norm = _norm(data, where)
    epoch = int(_number(data.get("epoch")) or 0)
    val_acc, test_r = _number(data.get("val_acc")), _number(data.get("test_pearson"))
    metrics = {k: v for k, v in (("val_pearson", val_acc), ("test_pearson", test_r),
                                 ("val_loss", _number(data.get("val_loss")))) if v is not None}
    imported_from = {"source": str(source.resolve()), "epoch": epoch, "model_type": model_type, "val_acc": val_acc,
                     "test_pearson": test_r, "hyperparams": hyps_from, "trainer": "torchdeepretina"}
    return {
        "format": checkpoint.FORMAT, "epoch": epoch, "metrics": metrics, "history": [], "best_epoch": epoch,
        "best_val_pearson": val_acc if val_acc is not None else float("nan"),
        "best_test": test_r if test_r is not None else float("nan"),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": cfg, "norm": norm, "cell_ids": cell_ids, "n_cells": n_units, "model_type": model_type,
        "imported_from": imported_from,
    }


def import_checkpoint(path: str | Path, out: str | Path | None = None, force: bool = False) -> Imported:
    """Convert the original's checkpoint at `path` (a file, or a run folder: its newest checkpoint with weights)
    into `<out>/best.pt` (default out: imported/<the checkpoint's folder name>)."""
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
    state = convert(data, source, given if given.is_dir() else source.parent, notes)
    checkpoint.save(state, target)
    return Imported(path=target, source=source, state=state, notes=notes)


def _refuse_overwrite(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to replace it, or --out another folder")


def run_metrics(state: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of an imported checkpoint: the original's scores at its epoch, under our names (its
    val_acc as best_val_pearson, which `register` and the champion alias compare)."""
    out = dict(state["metrics"])
    if "val_pearson" in out:
        out["best_val_pearson"] = out["val_pearson"]
    if "test_pearson" in out:
        out["test_pearson_at_best"] = out["test_pearson"]
    out["best_epoch"] = float(state["epoch"])
    return out
