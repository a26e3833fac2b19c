"""Read and validate a recording file in the published h5 layout: where it lives, its checks against a run's
settings (`preflight`), loading it as a DataBundle (`load_data`), and single groups for prediction and evaluation.

A recording is `<data root>/<dataset>/<stim_type>.h5` with groups `train` and `test`, each holding
`stimulus` (T, H, W), `time` (T,) and `response/firing_rate_10ms` (n_cells, T). Sample k of a split is the
window of frames s..s+h-1 (oldest first, frames as channels) and its target is the rate at frame s+h
(trainer/data/windows.py holds the samples).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from trainer.data.cells import FILE_ATTR, all_cells
from trainer.data.windows import DataBundle, WindowSet
from trainer.errors import ConfigError, DataError

DATA_ROOT_ENV = "RETINA_DATA_ROOT"
DEFAULT_DATA_ROOT = "~/experiments/data"
RATES = "response/firing_rate_10ms"
BIN_S = 0.01  # one time bin is 10 ms; used when `time` cannot tell
CHUNK_VALUES = 1 << 21  # stimulus values per chunk when scanning (2 M: ~16 MB as float64 or int64)

# torch cannot index these unsigned types, so they are widened (without loss) when loaded into memory
_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.float64,
          np.dtype(np.bool_): np.uint8}


def resolve_data_root(root: str | None) -> Path:
    """The data root: the explicit argument, else $RETINA_DATA_ROOT, else ~/experiments/data."""
    root = root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(root).expanduser()


def recording_path(data_root: str | Path, dataset: str, stim_type: str) -> Path:
    """Where a recording lives: <root>/<dataset>/<stim_type>.h5."""
    return Path(data_root).expanduser() / dataset / f"{stim_type}.h5"


# ------------------------------------------------------------------------------------------------------------
# reading and checking


@dataclass
class _Split:
    """One group (`train` or `test`) whose shapes were checked without reading the big arrays."""

    name: str
    stimulus: h5py.Dataset
    rates: h5py.Dataset
    time: h5py.Dataset
    n_frames: int
    frame_shape: tuple[int, int]
    n_cells: int


@contextmanager
def _open_h5(path: Path) -> Iterator[h5py.File]:
    """Open a recording read-only, turning a missing, unreadable or corrupt file into a DataError."""
    if not path.exists():
        raise DataError(f"{path}: recording not found; check the data root, dataset and stim_type "
                        f"(recordings live at <data root>/<dataset>/<stim_type>.h5)")
    if not path.is_file():
        raise DataError(f"{path}: is a folder, not an h5 file; point to a <stim_type>.h5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({_first_line(e)}); point to an .h5 recording "
                        f"in the published layout") from e
    try:
        with f:
            yield f
    except OSError as e:  # a damaged data block only shows up when it is read
        raise DataError(f"{path}: could not read the file ({_first_line(e)}); it may be truncated or "
                        f"corrupt, copy it again") from e


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _node(f: h5py.File, key: str, path: Path, kind: type) -> h5py.Dataset | h5py.Group:
    """The group or dataset at `key`, or a DataError naming the missing h5 path."""
    what = "group" if kind is h5py.Group else "dataset"
    try:
        node = f.get(key)
    except (KeyError, OSError, RuntimeError) as e:  # e.g. a dangling link
        raise DataError(f"{path}: h5 {what} '{key}' cannot be read ({_first_line(e)}); "
                        f"rewrite the file") from e
    if node is None:
        raise DataError(f"{path}: h5 {what} '{key}' is missing; the published layout needs train/ and test/ "
                        f"groups with stimulus, time and {RATES}")
    if not isinstance(node, kind):
        raise DataError(f"{path}: h5 path '{key}' is not a {what}; the published layout needs it to be one")
    return node


def _inspect_split(f: h5py.File, name: str, path: Path) -> _Split:
    """Check the shapes and dtypes of one group against the published layout."""
    _node(f, name, path, h5py.Group)
    stim = _node(f, f"{name}/stimulus", path, h5py.Dataset)
    rates = _node(f, f"{name}/{RATES}", path, h5py.Dataset)
    time = _node(f, f"{name}/time", path, h5py.Dataset)
    if stim.ndim != 3:
        raise DataError(f"{path}: h5 dataset '{name}/stimulus' has shape {stim.shape} but must be 3-D "
                        f"(frames, height, width)")
    if stim.dtype.kind not in "uifb":
        raise DataError(f"{path}: h5 dataset '{name}/stimulus' has dtype {stim.dtype}; store real numbers "
                        f"(uint8 in published files)")
    if stim.shape[1] < 1 or stim.shape[2] < 1:
        raise DataError(f"{path}: h5 dataset '{name}/stimulus' has empty frames (shape {stim.shape})")
    n_frames = stim.shape[0]
    if rates.ndim != 2 or rates.dtype.kind not in "uif":
        raise DataError(f"{path}: h5 dataset '{name}/{RATES}' has shape {rates.shape} and dtype "
                        f"{rates.dtype}; it must be real numbers of shape (n_cells, T)")
    if rates.shape[1] != n_frames:
        hint = "; it looks transposed, store it as (n_cells, T)" if rates.shape[0] == n_frames else ""
        raise DataError(f"{path}: '{name}/stimulus' has {n_frames} frames but '{name}/{RATES}' has "
                        f"{rates.shape[1]} time bins (shape {rates.shape}, expected (n_cells, {n_frames}))"
                        f"{hint or '; store one rate per frame'}")
    if time.ndim != 1 or time.shape[0] != n_frames or time.dtype.kind not in "uif":
        raise DataError(f"{path}: '{name}/stimulus' has {n_frames} frames but '{name}/time' has shape "
                        f"{time.shape} ({time.dtype}); it must be ({n_frames},) seconds")
    binned = f.get(f"{name}/response/binned")
    if isinstance(binned, h5py.Dataset) and binned.shape != rates.shape:
        raise DataError(f"{path}: '{name}/response/binned' has shape {binned.shape} but '{name}/{RATES}' has "
                        f"{rates.shape}; they must match")
    if rates.shape[0] < 1:
        raise DataError(f"{path}: '{name}/{RATES}' has no cells (shape {rates.shape})")
    return _Split(name, stim, rates, time, n_frames, (stim.shape[1], stim.shape[2]), rates.shape[0])


def _inspect(f: h5py.File, path: Path) -> tuple[_Split, _Split]:
    """Check both groups and that they describe the same cells and frame size."""
    train, test = _inspect_split(f, "train", path), _inspect_split(f, "test", path)
    if train.n_cells != test.n_cells:
        raise DataError(f"{path}: train has {train.n_cells} cells but test has {test.n_cells} "
                        f"(rows of {RATES}); both must record the same cells")
    if train.frame_shape != test.frame_shape:
        raise DataError(f"{path}: train frames are {_hw(train.frame_shape)} but test frames are "
                        f"{_hw(test.frame_shape)}; both must have the same size")
    return train, test


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def recording_digest(path: str | Path) -> str:
    """A digest of a recording file's bytes (sha256, its first 16 hex digits), to tell whether a file is the one a
    model was trained on; computed once per file version (path, size, modification time) in a process."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


MAX_RATE_HZ = 1e4  # 100 spikes per 10 ms bin: a firing rate above this is a unit error (or an overflow to come)


def _read_rates(split: _Split, path: Path, rows: list[int] | None = None) -> np.ndarray:
    """The (n_cells, T) float64 rates of the chosen rows, checked to be finite and non-negative."""
    rates = np.asarray(split.rates[()], dtype=np.float64)
    if rows is not None:
        rates = rates[rows]
    where = f"{path}: h5 dataset '{split.name}/{RATES}'"
    bad = ~np.isfinite(rates)
    if bad.any():
        i, t = np.argwhere(bad)[0]
        raise DataError(f"{where} has {int(bad.sum())} NaN/inf values (first at row "
                        f"{rows[i] if rows else i}, bin {t}); fix or drop those bins")
    if (rates < 0).any():
        i, t = np.argwhere(rates < 0)[0]
        raise DataError(f"{where} has negative firing rates (first {rates[i, t]:g} at row "
                        f"{rows[i] if rows else i}, bin {t}); rates must be >= 0 Hz")
    if (rates > MAX_RATE_HZ).any():
        i, t = np.unravel_index(int(np.argmax(rates)), rates.shape)
        raise DataError(f"{where} has rates up to {rates[i, t]:.3g} (row {rows[i] if rows else i}, bin {t}), "
                        f"above {MAX_RATE_HZ:g} Hz, which no neuron fires: it must be a rate in Hz (spikes per "
                        "second); check its units")
    return rates


def _chunks(stim: np.ndarray | h5py.Dataset, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, frames) chunks of about CHUNK_VALUES values, so long files are never read at once."""
    step = max(1, CHUNK_VALUES // max(1, stim.shape[1] * stim.shape[2]))
    for i in range(start, stop, step):
        yield i, np.asarray(stim[i:min(i + step, stop)])


def _check_finite(stim: np.ndarray | h5py.Dataset, path: Path, where: str, start: int = 0) -> None:
    """Raise a DataError if any frame from `start` on holds NaN or inf (integer frames cannot)."""
    if stim.dtype.kind != "f":
        return
    for i, frames in _chunks(stim, start, stim.shape[0]):
        _finite_or_raise(frames, i, path, where)


def _finite_or_raise(frames: np.ndarray, first: int, path: Path, where: str) -> None:
    if frames.dtype.kind == "f" and not np.isfinite(frames).all():
        t = first + int(np.argwhere(~np.isfinite(frames))[0][0])
        raise DataError(f"{path}: h5 dataset '{where}' has NaN/inf values (first in frame {t}); "
                        f"fix the stimulus")


def _stimulus_stats(stim: np.ndarray | h5py.Dataset, path: Path, where: str, stop: int | None = None) -> dict:
    """Mean, std (population), min and max of frames [0, stop), read in chunks, in float64."""
    stop = stim.shape[0] if stop is None else stop
    if stim.dtype == np.uint8:  # exact and fast: a 256-bin histogram
        counts = np.zeros(256, dtype=np.int64)
        for _, frames in _chunks(stim, 0, stop):
            counts += np.bincount(frames.ravel(), minlength=256)
        values = np.arange(256, dtype=np.float64)
        n = counts.sum()
        mean = float((counts * values).sum() / n)
        var = float((counts * (values - mean) ** 2).sum() / n)
        present = np.flatnonzero(counts)
        return {"mean": mean, "std": math.sqrt(var), "min": float(present[0]), "max": float(present[-1])}
    n, mean, m2, lo, hi = 0, 0.0, 0.0, math.inf, -math.inf
    for i, frames in _chunks(stim, 0, stop):  # merge per-chunk moments (Chan et al.) to stay accurate
        _finite_or_raise(frames, i, path, where)
        x = frames.astype(np.float64).ravel()
        nb, mb = x.size, float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        delta, total = mb - mean, n + nb
        mean += delta * nb / total
        m2 += m2b + delta * delta * n * nb / total
        n = total
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return {"mean": mean, "std": math.sqrt(m2 / n), "min": lo, "max": hi}


def _repeat_datasets(f: h5py.File, path: Path, n_frames: int) -> dict[int, h5py.Dataset]:
    """The test/repeats/cellNN datasets by row index (cell01 is row 0), checked to be (n_repeats, T_test)."""
    group = f.get("test/repeats")
    if not isinstance(group, h5py.Group):
        return {}
    found = {}
    for name, ds in group.items():
        if not (name.startswith("cell") and name[4:].isdigit() and isinstance(ds, h5py.Dataset)):
            continue
        if ds.ndim != 2 or ds.shape[1] != n_frames:
            raise DataError(f"{path}: h5 dataset 'test/repeats/{name}' has shape {ds.shape} but must be "
                            f"(n_repeats, {n_frames}) to match test/stimulus")
        found[int(name[4:]) - 1] = ds
    n_repeats = {ds.shape[0] for ds in found.values()}
    if len(n_repeats) > 1:
        raise DataError(f"{path}: the datasets under 'test/repeats' have different numbers of repeats "
                        f"{sorted(n_repeats)}; store the same repeats for every cell")
    return found


def _read_repeats(f: h5py.File, path: Path, n_frames: int, cell_ids: list[int],
                  history: int) -> np.ndarray | None:
    """Repeats of the chosen cells, (n_repeats, n_test_samples, n_cells) aligned with the targets, or None."""
    found = _repeat_datasets(f, path, n_frames)
    if not all(c in found for c in cell_ids):
        return None
    cols = []
    for c in cell_ids:
        rep = np.asarray(found[c][()], dtype=np.float64)
        if not np.isfinite(rep).all():
            raise DataError(f"{path}: h5 dataset 'test/repeats/cell{c + 1:02d}' has NaN/inf values; fix it "
                            f"or remove the repeats group")
        cols.append(rep[:, history:])  # target of test sample k is bin k + history
    return np.stack(cols, axis=-1)


def _split_sizes(n_frames: int, history: int, val_frac: float, val_size: int = 0) -> tuple[int, int, int]:
    """(n_train, gap, n_val) samples for a train group of n_frames (n_val = val_size when > 0, else the val_frac
    share); n_train < 1 when it is too short."""
    n = n_frames - history
    n_val = val_size if val_size > 0 else max(1, int(val_frac * n + 0.5))
    gap = history  # train sample s uses frames s..s+h; the first val sample must start after n_train - 1 + h
    return n - gap - n_val, gap, n_val


def _frames_needed(history: int, val_frac: float, val_size: int = 0) -> int:
    """The fewest train frames that give at least one train sample, the gap and the validation samples."""
    if val_size > 0:
        return 2 * history + 1 + val_size
    n_frames = 2 * history + 2  # the split grows by at most one train sample per extra frame, so walk up
    while _split_sizes(n_frames, history, val_frac)[0] < 1:
        n_frames += 1
    return n_frames


def _plan(train: _Split, test: _Split, history: int, val_frac: float,
          path: Path, val_size: int = 0) -> tuple[int, int, int, int]:
    """(n_train, gap, n_val, n_test) samples, or a DataError when a split is too short for the history."""
    n_train, gap, n_val = _split_sizes(train.n_frames, history, val_frac, val_size)
    if n_train < 1:
        held = f"val_size {val_size}" if val_size > 0 else f"val_frac {val_frac}"
        raise DataError(f"{path}: train has {train.n_frames} frames but history {history} with {held} needs at "
                        f"least {_frames_needed(history, val_frac, val_size)} frames (one train sample, a gap of "
                        f"{history} and validation); use a longer recording or lower history/"
                        f"{held.split()[0]}")
    n_test = test.n_frames - history
    if n_test < 1:
        raise DataError(f"{path}: test has {test.n_frames} frames, shorter than one window (history "
                        f"{history} + 1 target = {history + 1} frames); use a longer test recording or lower "
                        f"history")
    return n_train, gap, n_val, n_test


def _check_params(history: int, val_frac: float, val_size: int = 0) -> None:
    if not (isinstance(val_size, (int, np.integer)) and not isinstance(val_size, bool) and val_size >= 0):
        raise ConfigError(f"val_size must be a whole number of samples >= 0 (0: val_frac decides), got {val_size!r}")
    if not (isinstance(history, (int, np.integer)) and not isinstance(history, bool) and history >= 1):
        raise ConfigError(f"history (img_shape[0]) must be a positive integer, got {history!r}")
    if not (isinstance(val_frac, (int, float)) and 0 < val_frac < 1):
        raise ConfigError(f"val_frac must be between 0 and 1 (exclusive), got {val_frac!r}")


def _img_shape(img_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(img_shape) if isinstance(img_shape, (list, tuple, np.ndarray)) else ()
    if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                  for v in shape):
        raise ConfigError(f"img_shape must be three positive integers [history, height, width], "
                          f"got {img_shape!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _cell_ids(cells: str | list[int], n_cells: int, path: Path, f: h5py.File) -> tuple[list[int], str]:
    """Row indices for `cells` ("all" or a list of indices), checked against the file's cells, and where the list
    came from ("all": see trainer/data/cells.py)."""
    source = "the config"
    if isinstance(cells, str) and cells == "all":
        try:
            listed = f.attrs.get(FILE_ATTR)
        except (OSError, RuntimeError, TypeError) as e:
            raise DataError(f"{path}: the root attribute '{FILE_ATTR}' cannot be read ({_first_line(e)}); "
                            "rewrite it as a list of row indices") from e
        cells, source = all_cells(path.parent.name, n_cells, listed)
        if not cells:
            raise DataError(f"{path}: the root attribute '{FILE_ATTR}' lists no cells; list row indices or "
                            "delete it")
    if isinstance(cells, np.ndarray):
        cells = cells.tolist()
    if isinstance(cells, str) or not isinstance(cells, Sequence) or not cells or \
            not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in cells):
        raise ConfigError(f"cells must be \"all\" or a non-empty list of row indices, got {cells!r}")
    ids = [int(c) for c in cells]
    bad = [c for c in ids if not 0 <= c < n_cells]
    if bad:
        raise DataError(f"{path}: cells {bad} (from {source}) out of range; this recording has {n_cells} cells, "
                        f"valid indices are 0..{n_cells - 1}")
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise DataError(f"{path}: cells {dup} (from {source}) listed more than once; list each row index "
                        f"(0..{n_cells - 1}) once")
    return ids, source


def _to_memory(stim: h5py.Dataset) -> np.ndarray:
    """All frames in the stored dtype (widened only where torch cannot index the type)."""
    frames = stim[()]
    if not frames.dtype.isnative:  # torch reads native byte order only
        frames = frames.astype(frames.dtype.newbyteorder("="))
    return frames.astype(_WIDEN[frames.dtype]) if frames.dtype in _WIDEN else frames


def _check_fit(f: h5py.File, path: Path, cells: str | list[int], img_shape: Sequence[int],
               val_frac: float, val_size: int = 0
               ) -> tuple[_Split, _Split, tuple[int, int, int, int], tuple[list[int], str]]:
    """Every check of a recording against run settings that needs only shapes: splits, sizes, cells (the rows
    and where their list came from)."""
    history, height, width = _img_shape(img_shape)
    _check_params(history, val_frac, val_size)
    train, test = _inspect(f, path)
    if train.frame_shape != (height, width):
        raise DataError(f"{path}: frames are {_hw(train.frame_shape)} but img_shape is "
                        f"{[history, height, width]}; set img_shape to {[history, *train.frame_shape]}")
    plan = _plan(train, test, history, val_frac, path, val_size)
    return train, test, plan, _cell_ids(cells, train.n_cells, path, f)


def recording_key(path: str | Path, cfg: Mapping[str, Any]) -> tuple:
    """What identifies a recording as loaded for a run config: (path, cells (a tuple, or "all"), img_shape, val_frac,
    val_size), the arguments that change what preflight and load_data give (a cache key; not the device)."""
    cells = cfg["cells"]
    cells = "all" if isinstance(cells, str) and cells == "all" else tuple(cells)
    return str(path), cells, tuple(cfg["img_shape"]), cfg["val_frac"], cfg["val_size"]


def preflight(path: str | Path, *, cells: str | list[int] = "all", img_shape: Sequence[int] = (40, 50, 50),
              val_frac: float = 0.1, val_size: int = 0) -> int:
    """Check a recording fits a run's settings without reading its arrays; returns the number of cells used."""
    path = Path(path).expanduser()
    with _open_h5(path) as f:
        return len(_check_fit(f, path, cells, img_shape, val_frac, val_size)[3][0])


def load_data(path: str | Path, *, cells: str | list[int] = "all", img_shape: Sequence[int] = (40, 50, 50),
              val_frac: float = 0.1, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, val_size: int = 0) -> DataBundle:
    """Load a recording as train/val/test WindowSets; validation is the last stretch of train (val_size samples
    when > 0, else the val_frac share), after a gap.

    Samples come in `dtype`: float32 for training; float64 for the tests that compare two code paths with a
    tolerance derived from float64 rounding."""
    path = Path(path).expanduser()
    history, height, width = _img_shape(img_shape)
    with _open_h5(path) as f:
        train, test, (n_train, gap, n_val, n_test), (cell_ids, cells_source) = _check_fit(
            f, path, cells, img_shape, val_frac, val_size)
        train_rates = _read_rates(train, path, cell_ids)
        test_rates = _read_rates(test, path, cell_ids)
        train_stim, test_stim = _to_memory(train.stimulus), _to_memory(test.stimulus)
        repeats = _read_repeats(f, path, test.n_frames, cell_ids, history)

    # normalise with the frames the training samples see: inputs of samples 0..n_train-1
    stats = _stimulus_stats(train_stim, path, "train/stimulus", stop=n_train + history - 1)
    _check_finite(train_stim, path, "train/stimulus", start=n_train + history - 1)
    _check_finite(test_stim, path, "test/stimulus")
    if stats["std"] == 0 or not math.isfinite(stats["std"]):
        raise DataError(f"{path}: the training frames of 'train/stimulus' are constant (value "
                        f"{stats['mean']:g}); a constant stimulus cannot drive a model, check the file")
    mean, std = stats["mean"], stats["std"]

    def tensors(stim: np.ndarray, rates: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rates_t = torch.from_numpy(np.ascontiguousarray(rates.T)).to(dtype)
        return torch.from_numpy(stim).to(device), rates_t.to(device)

    stim_t, rates_t = tensors(train_stim, train_rates)
    test_stim_t, test_rates_t = tensors(test_stim, test_rates)
    val_start = n_train + gap
    return DataBundle(
        train=WindowSet(stim_t, rates_t, torch.arange(n_train), history, mean, std),
        val=WindowSet(stim_t, rates_t, torch.arange(val_start, val_start + n_val), history, mean, std),
        test=WindowSet(test_stim_t, test_rates_t, torch.arange(n_test), history, mean, std),
        n_cells=len(cell_ids), cell_ids=cell_ids, img_shape=(history, height, width),
        stim_mean=mean, stim_std=std, path=path, test_repeats=repeats, cells_source=cells_source,
    )


# ---------------------------------------------------------------------------------------------------------------------
# reading single groups, for prediction and evaluation

TRUTH = "ground_truth/{group}/firing_rate"  # where synthetic recordings keep the true rates


def stimulus_groups(path: str | Path) -> list[str]:
    """Which of the groups `train` and `test` of a recording have a stimulus dataset."""
    path = Path(path).expanduser()
    with _open_h5(path) as f:
        return [g for g in ("train", "test") if isinstance(f.get(f"{g}/stimulus"), h5py.Dataset)]


def read_stimulus(path: str | Path, group: str) -> tuple[np.ndarray, np.ndarray]:
    """The frames (T, H, W, stored dtype) and times (T,) of one group of a recording, checked like training data."""
    path = Path(path).expanduser()
    with _open_h5(path) as f:
        split = _inspect_split(f, group, path)
        frames = _to_memory(split.stimulus)
        _check_finite(frames, path, f"{group}/stimulus")
        return frames, np.asarray(split.time[()], dtype=np.float64)


def read_truth(path: str | Path, group: str, cell_ids: Sequence[int]) -> np.ndarray | None:
    """True rates (T, n_cells) of a synthetic recording's group for the given cells, or None for real data."""
    path = Path(path).expanduser()
    with _open_h5(path) as f:
        node = f.get(TRUTH.format(group=group))
        if not isinstance(node, h5py.Dataset):
            return None
        rates = np.asarray(node[()], dtype=np.float64)
    return rates[list(cell_ids)].T
