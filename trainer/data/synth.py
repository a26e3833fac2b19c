"""Synthetic recordings from a known ground-truth retina, written in the published h5 layout.

The stimulus is a binary white-noise checkerboard, each frame held for 3 bins of 10 ms. Each cell is
either linear-nonlinear (difference-of-Gaussians field, biphasic temporal filter, softplus) or a subunit cell
(small ON and OFF subunits with the cell's temporal filter, rectified above a threshold, summed with positive
weights, then a softplus). Spikes are Poisson per bin. The true rates are stored under `ground_truth`, which
the loader ignores, so tests and benchmarks can compare a fitted model with the truth and with the recording; so
are each cell's receptive field (`sta`: the spike-triggered average of its noise-free rate to Gaussian white
noise, the analyses' noise, lags history..1 on the analyses' time axis), the signed sum of its fields
(`spatial_filters`), its temporal filter and its polarity (for a subunit cell, that of most subunits).

With `interneurons`, a second file in the original's interneuron layout (<root>/<dataset>/interneurons/
bipolars.h5: group boxes with stimuli (T, H, W) 0/1 and detrended_membrane_potential (n, T)) holds the membrane
potentials of the generator's own hidden subunits, the "bipolar cells" its subunit cells pool: each subunit's
drive (its field and its cell's temporal filter applied to a separate binary checkerboard, the same statistics
as the recording's), with its sign, z-scored, plus Gaussian noise of SD INTERNEURON_NOISE.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from trainer.data.h5write import atomic_h5
from trainer.data.recording import BIN_S, RATES, recording_path
from trainer.errors import DataError

GENERATOR = "trainer.data.synth"
HOLD_BINS = 3  # each stimulus frame is shown for 3 bins (~33 Hz), as in the published recordings
MAX_FILTER_BINS = 30  # temporal filters span at most 300 ms (and always less than the history)
SMOOTH_SIGMA_BINS = 1.0  # firing_rate_10ms: counts smoothed with a Gaussian of sigma 10 ms
INTERNEURON_NOISE = 0.2  # SD of the recording noise added to the z-scored subunit potentials
INTERNEURON_FILE = "interneurons/bipolars.h5"  # under <root>/<dataset>/
TRUTH_SAMPLES = 400_000  # drive samples behind each cell's true STA (ground_truth/sta)
TRUTH_HOLD = 3  # its noise holds each frame this many bins (analysis_sta_hold's default)


@dataclass
class Cell:
    """One ground-truth cell: where it looks, how it filters and how it turns drive into a rate."""

    kind: str  # "LN" or "subunit"
    seed: int  # the cell's parameters are drawn from np.random.default_rng(seed)
    polarity: int  # +1 ON, -1 OFF (for a subunit cell: the polarity of most subunits)
    center: tuple[float, float]  # (row, col) in checkers
    peak_bins: float  # time to peak of the temporal filter
    subunit_centers: list[tuple[float, float]]  # one entry for an LN cell (its centre)
    subunit_signs: list[int]  # +1 ON, -1 OFF
    subunit_weights: list[float]  # positive
    threshold: float  # subunit rectification threshold in SDs of the subunit drive (0 for LN)
    gain: float  # output nonlinearity: rate = scale * softplus(gain * (drive - offset))
    offset: float
    target_rate_hz: float  # mean training rate the scale is chosen to give
    scale: float = 0.0  # set by calibration on the training stimulus


def _temporal_filter(peak_bins: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """Biphasic filter over lags 1..length: a fast positive gamma lobe minus a slower, weaker one; norm 1."""
    lags = np.arange(1, length + 1, dtype=np.float64)
    tau1 = peak_bins / 3.0
    tau2 = tau1 * rng.uniform(1.5, 2.0)
    fast = (lags / tau1) ** 3 * np.exp(-lags / tau1)
    slow = (lags / tau2) ** 3 * np.exp(-lags / tau2)
    kernel = fast / fast.sum() - rng.uniform(0.5, 0.8) * slow / slow.sum()
    taper = np.ones(length)  # fade out the last quarter so the filter does not stop abruptly
    n_taper = max(1, length // 4)
    taper[-n_taper:] = 0.5 * (1 + np.cos(np.linspace(0, np.pi, n_taper + 2)[1:-1]))
    kernel *= taper
    return kernel / np.linalg.norm(kernel)


def _gaussian(center: tuple[float, float], sigma: float, size: int) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size]
    g = np.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _make_cell(index: int, seed: int, size: int, history: int) -> tuple[Cell, np.ndarray, np.ndarray]:
    """Draw one cell; returns it with its spatial fields (n_fields, size*size) and temporal filter."""
    rng = np.random.default_rng(seed)
    kind = "LN" if index % 2 == 0 else "subunit"  # alternate, so any two cells cover both kinds
    margin = max(2.0, size / 4)
    center = (float(rng.uniform(margin, size - 1 - margin)), float(rng.uniform(margin, size - 1 - margin)))
    polarity = int(rng.choice([-1, 1]))
    length = min(MAX_FILTER_BINS, history - 1)
    peak = float(min(rng.uniform(6, 12), length / 3))
    temporal = _temporal_filter(peak, length, rng)
    if kind == "LN":
        sigma_c = rng.uniform(1.0, 1.6)
        dog = _gaussian(center, sigma_c, size) - rng.uniform(0.3, 0.6) * _gaussian(center, sigma_c * 3, size)
        fields = (dog / np.linalg.norm(dog)).reshape(1, -1)
        cell = Cell(kind, seed, polarity, center, peak, [center], [polarity], [1.0], 0.0,
                    gain=float(rng.uniform(1.5, 2.5)), offset=float(rng.uniform(0.0, 1.0)),
                    target_rate_hz=float(rng.uniform(4, 15)))
        return cell, fields, temporal
    # subunit cell: 4-8 small subunits on a jittered grid around the centre, about a third of opposite sign
    grid = [(dr, dc) for dr in (-1.5, 0.0, 1.5) for dc in (-1.5, 0.0, 1.5)]
    n_sub = int(rng.integers(4, 9))
    picked = rng.choice(len(grid), size=n_sub, replace=False)
    jitter = rng.uniform(-0.3, 0.3, size=(n_sub, 2))
    centers = [(float(center[0] + grid[i][0] + dr), float(center[1] + grid[i][1] + dc))
               for i, (dr, dc) in zip(picked, jitter, strict=True)]
    n_opposite = max(1, int(round(n_sub / 3)))
    signs = [polarity] * (n_sub - n_opposite) + [-polarity] * n_opposite
    signs = [int(s) for s in rng.permutation(signs)]
    dist2 = np.array([(r - center[0]) ** 2 + (c - center[1]) ** 2 for r, c in centers])
    weights = (np.exp(-dist2 / (2 * 2.0 ** 2)) * rng.uniform(0.7, 1.3, n_sub)).tolist()
    sigma_s = rng.uniform(0.6, 0.9)
    fields = np.stack([_gaussian(c, sigma_s, size).ravel() for c in centers])
    fields /= np.linalg.norm(fields, axis=1, keepdims=True)
    cell = Cell(kind, seed, polarity, center, peak, centers, signs, weights, float(rng.uniform(0.5, 1.0)),
                gain=float(rng.uniform(1.5, 2.5)), offset=float(rng.uniform(0.0, 1.0)),
                target_rate_hz=float(rng.uniform(4, 15)))
    return cell, fields, temporal


def _checkerboard(rng: np.random.Generator, n_frames: int, size: int) -> np.ndarray:
    """Binary white noise stored as uint8 0/255, each frame held for HOLD_BINS bins."""
    n_unique = -(-n_frames // HOLD_BINS)
    frames = rng.integers(0, 2, size=(n_unique, size, size), dtype=np.uint8) * np.uint8(255)
    return np.repeat(frames, HOLD_BINS, axis=0)[:n_frames]


def _drives(stimulus: np.ndarray, fields: np.ndarray, temporal: list[np.ndarray]) -> np.ndarray:
    """Spatiotemporally filtered contrast, one row per field: (n_fields, T); bin t sees frames t-1, t-2..."""
    n_frames = stimulus.shape[0]
    flat = stimulus.reshape(n_frames, -1)
    step = max(1, (1 << 22) // flat.shape[1])
    spatial = np.empty((n_frames, fields.shape[0]))
    for i in range(0, n_frames, step):  # contrast -1/+1, projected chunk by chunk to bound memory
        spatial[i:i + step] = (flat[i:i + step].astype(np.float64) / 127.5 - 1.0) @ fields.T
    out = np.empty((fields.shape[0], n_frames))
    for k, kernel in enumerate(temporal):
        causal = np.concatenate([[0.0], kernel])  # lag 0 has no weight: the current frame is not seen
        out[k] = np.convolve(spatial[:, k], causal)[:n_frames]
    return out


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _rates(cells: list[Cell], fields: list[np.ndarray], temporal: list[np.ndarray], stimulus: np.ndarray,
           norm: dict | None = None) -> tuple[np.ndarray, dict]:
    """True rates in Hz (n_cells, T) for a stimulus (uint8 0/255 frames) and the training statistics that fix each
    drive's scale: computed from this stimulus (and each cell's output scale calibrated to its target rate) when
    `norm` is None, as for the training stimulus, else those given (the test stimulus)."""
    all_fields = np.concatenate(fields)
    kernels = [temporal[i] for i, f in enumerate(fields) for _ in range(f.shape[0])]
    d = _drives(stimulus, all_fields, kernels)
    fit = norm is None
    if norm is None:
        norm = {"mu": d.mean(axis=1, keepdims=True), "sd": d.std(axis=1, keepdims=True), "g": []}
    d = (d - norm["mu"]) / norm["sd"]
    rates = []
    first = 0
    for i, (cell, f) in enumerate(zip(cells, fields, strict=True)):
        rows = slice(first, first + f.shape[0])
        first += f.shape[0]
        signs, weights = np.array(cell.subunit_signs)[:, None], np.array(cell.subunit_weights)[:, None]
        if cell.kind == "LN":
            g = signs[0] * d[rows][0]
            if fit:
                norm["g"].append(None)
        else:
            g = (weights * np.maximum(signs * d[rows] - cell.threshold, 0)).sum(axis=0)
            if fit:
                norm["g"].append((g.mean(), g.std()))
            m, sd = norm["g"][i]
            g = (g - m) / sd
        out = _softplus(cell.gain * (g - cell.offset))
        if fit:
            cell.scale = float(cell.target_rate_hz / out.mean())
        rates.append(cell.scale * out)
    return np.stack(rates), norm


def _gradient_sta(cells: list[Cell], fields: list[np.ndarray], temporal: list[np.ndarray], norm: dict,
                  size: int, history: int, rng: np.random.Generator, hold: int, n: int = TRUTH_SAMPLES) -> np.ndarray:
    """Each true cell's STA to Gaussian white noise of contrast 1, each frame held `hold` bins: the noise of the
    analyses' receptive fields, as they compute it, the mean gradient of the rate with respect to each frame.
    (n_cells, history, size, size), index history-1 lag 1.

    Exact up to a Monte Carlo mean of a few numbers: a cell's rate at a bin depends on its fields' drives only, and
    its gradient with respect to the frame `lag` bins back is sum_k c_k(drives) * temporal[lag] * field_k; so the
    STA is the temporal filter times sum_k E[c_k] field_k. Under this noise the drives are Gaussian with covariance
    fields @ fields.T times the variance of the held noise through the temporal filter, which depends on where the
    bin falls in a hold (each of the `hold` phases equally often): E[c_k] is averaged over `n` samples of them."""
    out = np.zeros((len(cells), history, size * size))
    first = 0
    for i, (cell, f) in enumerate(zip(cells, fields, strict=True)):
        rows = slice(first, first + f.shape[0])
        first += f.shape[0]
        kernel = np.concatenate([[0.0], temporal[i]])  # index = lag: the current frame is not seen
        scales = []
        for phase in range(hold):  # bin t's lags grouped by the hold they fall in: one frame value per group
            groups = (np.arange(len(kernel)) + phase) // hold
            scales.append(np.sqrt((np.bincount(groups, weights=kernel) ** 2).sum()))
        w, v = np.linalg.eigh(f @ f.T)
        drives = rng.standard_normal((n, f.shape[0])) @ (v * np.sqrt(np.clip(w, 0, None))).T
        drives *= np.asarray(scales)[np.arange(n) % hold][:, None]
        z = (drives - norm["mu"][rows, 0]) / norm["sd"][rows, 0]
        signs, weights = np.array(cell.subunit_signs, dtype=np.float64), np.array(cell.subunit_weights)
        if cell.kind == "LN":
            g, slope, per_field = signs[0] * z[:, 0], 1.0, np.ones((n, 1))
        else:
            m, s_g = norm["g"][i]
            g = ((weights * np.maximum(signs * z - cell.threshold, 0)).sum(axis=1) - m) / s_g
            slope, per_field = 1.0 / s_g, weights * (signs * z - cell.threshold > 0)
        gain_out = cell.scale * cell.gain / (1 + np.exp(-cell.gain * (g - cell.offset)))  # softplus' = sigmoid
        c = (gain_out[:, None] * slope * per_field).mean(axis=0) * signs / norm["sd"][rows, 0]
        lags = min(len(temporal[i]), history)
        out[i, history - lags:] = np.outer(temporal[i][:lags][::-1], c @ f)
    return out.reshape(len(cells), history, size, size)


def _smooth(counts: np.ndarray) -> np.ndarray:
    """Counts per bin -> rate in Hz, smoothed along the last axis with a normalised Gaussian (sigma 10 ms)."""
    half = int(4 * SMOOTH_SIGMA_BINS)
    taps = np.exp(-np.arange(-half, half + 1) ** 2 / (2 * SMOOTH_SIGMA_BINS ** 2))
    taps /= taps.sum()
    padded = np.pad(counts.astype(np.float64), [(0, 0)] * (counts.ndim - 1) + [(half, half)])
    n = counts.shape[-1]
    out = sum(w * padded[..., j:j + n] for j, w in enumerate(taps))
    return out / BIN_S


def _check_args(dataset: str, stim_type: str, n_cells: int, size: int, train_frames: int, test_frames: int,
                n_repeats: int, history: int, seed: int) -> None:
    for name, value in (("dataset", dataset), ("stim_type", stim_type)):
        if not isinstance(value, str) or not value or "/" in value or "\\" in value or value in (".", ".."):
            raise DataError(f"synthetic recording: {name} must be a plain name (no slashes), got {value!r}")
    minimum = {"history": 4, "n_cells": 1, "size": 8, "n_repeats": 1, "seed": 0}
    values = {"history": history, "n_cells": n_cells, "size": size, "n_repeats": n_repeats, "seed": seed,
              "train_frames": train_frames, "test_frames": test_frames}
    for name, value in values.items():
        low = minimum.get(name, history + 1)  # history is checked first, frames must exceed it
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise DataError(f"synthetic recording: {name} must be an integer >= {low}, got {value!r}"
                            + (" (frames must exceed the history)" if name.endswith("frames") else ""))


def write_synthetic(root: str | Path, dataset: str = "synth01", stim_type: str = "whitenoise", *,
                    n_cells: int = 5, size: int = 20, train_frames: int = 20000, test_frames: int = 2000,
                    n_repeats: int = 5, history: int = 40, seed: int = 0, overwrite: bool = False,
                    interneurons: int = 0, sta_hold: int = TRUTH_HOLD) -> Path:
    """Simulate a ground-truth retina, write <root>/<dataset>/<stim_type>.h5 atomically, return its path. With
    `interneurons` > 0, also <root>/<dataset>/interneurons/bipolars.h5 with that many frames of boxes stimulus
    (see the module docstring). `sta_hold`: the hold of the noise behind ground_truth/sta (its attribute `hold`).
    """
    _check_args(dataset, stim_type, n_cells, size, train_frames, test_frames, n_repeats, history, seed)
    path = recording_path(root, dataset, stim_type)
    intr_path = path.parent / INTERNEURON_FILE
    for target in (path, intr_path) if interneurons else (path,):
        if target.exists() and not overwrite:
            raise DataError(f"{target} already exists; pass --force to replace it (overwrite=True from Python)")
    if interneurons and (n_cells < 2 or interneurons <= history):
        raise DataError(f"synthetic interneurons: need --cells 2 or more (the odd-numbered cells have subunits) and "
                        f"more --interneurons frames than the history {history}, got {n_cells} cells and "
                        f"{interneurons} frames")

    # independent streams, so e.g. changing the test length leaves the cells and the train data unchanged
    cell_ss, train_ss, test_ss, spike_ss, boxes_ss, noise_ss, sta_ss = np.random.SeedSequence(seed).spawn(7)
    cell_seeds = np.random.default_rng(cell_ss).integers(0, 2 ** 31, size=n_cells)
    made = [_make_cell(i, int(s), size, history) for i, s in enumerate(cell_seeds)]
    cells, fields, temporal = [m[0] for m in made], [m[1] for m in made], [m[2] for m in made]
    train_stim = _checkerboard(np.random.default_rng(train_ss), train_frames, size)
    test_stim = _checkerboard(np.random.default_rng(test_ss), test_frames, size)
    train_rate, norm = _rates(cells, fields, temporal, train_stim)
    test_rate, _ = _rates(cells, fields, temporal, test_stim, norm)
    true_sta = _gradient_sta(cells, fields, temporal, norm, size, history, np.random.default_rng(sta_ss),
                             sta_hold)

    spikes = np.random.default_rng(spike_ss)
    train_counts = spikes.poisson(train_rate * BIN_S).astype(np.float64)  # (n_cells, T)
    test_counts = spikes.poisson(test_rate * BIN_S, size=(n_repeats, *test_rate.shape)).astype(np.float64)

    spatial = np.stack([(np.array(c.subunit_signs)[:, None] * np.array(c.subunit_weights)[:, None] * f).sum(0)
                        for c, f in zip(cells, fields, strict=True)]).reshape(n_cells, size, size)
    filters = np.zeros((n_cells, max(len(t) for t in temporal)))
    for i, t in enumerate(temporal):
        filters[i, :len(t)] = t

    def write(f: h5py.File) -> None:
        def put(name: str, data: np.ndarray) -> None:
            f.create_dataset(name, data=data, track_times=False)  # no time stamps: same seed, same bytes

        splits = (("train", train_stim, train_counts, _smooth(train_counts)),
                  ("test", test_stim, test_counts.mean(0), _smooth(test_counts).mean(0)))  # mean of repeats
        for split, stim, counts, rates in splits:
            put(f"{split}/stimulus", stim)
            put(f"{split}/time", np.arange(stim.shape[0]) * BIN_S)
            put(f"{split}/response/binned", counts)
            put(f"{split}/{RATES}", rates)
        for i in range(n_cells):
            put(f"test/repeats/cell{i + 1:02d}", test_counts[:, i, :])
        put("ground_truth/train/firing_rate", train_rate)
        put("ground_truth/test/firing_rate", test_rate)
        put("ground_truth/spatial_filters", spatial)  # signed, weighted sum of each cell's fields
        put("ground_truth/sta", true_sta.astype(np.float32))  # to Gaussian white noise (_gradient_sta)
        f["ground_truth/sta"].attrs.update(noise="gaussian", contrast=1.0, hold=sta_hold)
        put("ground_truth/temporal_filters", filters)  # index j is lag j+1 bins
        gt = f["ground_truth"]
        gt.attrs["cell_type"] = np.array([c.kind for c in cells], dtype=h5py.string_dtype())
        gt.attrs["position"] = np.array([c.center for c in cells])
        gt.attrs["cell_seed"] = np.array([c.seed for c in cells], dtype=np.int64)
        gt.attrs["polarity"] = np.array([c.polarity for c in cells], dtype=np.int64)
        gt.attrs["mean_rate_hz"] = train_rate.mean(axis=1)
        gt.attrs["cells_json"] = json.dumps([asdict(c) for c in cells])
        f.attrs["generator"] = GENERATOR
        f.attrs["seed"] = seed
        f.attrs["bin_size"] = BIN_S
        f.attrs["frame_hold_bins"] = HOLD_BINS

    with atomic_h5(path, DataError) as f:  # only a complete file ever carries the final name
        write(f)
    if interneurons:
        boxes = _checkerboard(np.random.default_rng(boxes_ss), interneurons, size)
        _write_interneurons(intr_path, cells, fields, temporal, boxes, np.random.default_rng(noise_ss), seed)
    return path


def _write_interneurons(path: Path, cells: list[Cell], fields: list[np.ndarray], temporal: list[np.ndarray],
                        boxes: np.ndarray, rng: np.random.Generator, seed: int) -> None:
    """The subunits' membrane potentials on `boxes` (uint8 0/255), in the original's interneuron layout."""
    units = [(i, k) for i, c in enumerate(cells) if c.kind == "subunit" for k in range(len(c.subunit_centers))]
    drive = _drives(boxes, np.stack([fields[i][k] for i, k in units]), [temporal[i] for i, _ in units])
    signs = np.array([cells[i].subunit_signs[k] for i, k in units], dtype=np.float64)[:, None]
    z = (drive - drive.mean(axis=1, keepdims=True)) / drive.std(axis=1, keepdims=True)
    potentials = signs * z + INTERNEURON_NOISE * rng.standard_normal(z.shape)
    with atomic_h5(path, DataError) as f:
        f.create_dataset("boxes/stimuli", data=(boxes / 255).astype(np.float32), track_times=False)
        f.create_dataset("boxes/detrended_membrane_potential", data=potentials, track_times=False)
        f.attrs["generator"] = GENERATOR
        f.attrs["seed"] = seed
        f.attrs["ganglion_cell"] = np.array([i for i, _ in units], dtype=np.int64)
        f.attrs["subunit_center"] = np.array([cells[i].subunit_centers[k] for i, k in units])
        f.attrs["sign"] = signs[:, 0].astype(np.int64)
        f.attrs["noise_sd"] = INTERNEURON_NOISE


def describe_synthetic(path: str | Path) -> str:
    """A few lines about a synthetic recording's ground truth, for `retina-trainer data synth`."""
    with h5py.File(path, "r") as f:
        if "ground_truth" not in f:
            raise DataError(f"{path}: has no ground_truth group; it was not written by write_synthetic")
        gt = f["ground_truth"]
        kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in gt.attrs["cell_type"]]
        rates = gt.attrs["mean_rate_hz"]
        train, test = f["train/stimulus"].shape, f["test/stimulus"].shape
        n_repeats = f["test/repeats/cell01"].shape[0]
    cells = ", ".join(f"{i}: {k} {r:.1f} Hz" for i, (k, r) in enumerate(zip(kinds, rates, strict=True)))
    return (f"{len(kinds)} cells ({cells})\n"
            f"{train[1]}x{train[2]} checkers; train {train[0]} frames ({train[0] * BIN_S:.0f} s), "
            f"test {test[0]} frames ({test[0] * BIN_S:.0f} s) x {n_repeats} repeats")
