"""The summary `retina-trainer data check` prints: a recording validated the way load_data would (all cells) and
described (cells, frames, durations, stimulus statistics, rates, repeats, sample counts) as aligned lines."""

from __future__ import annotations

import math
from pathlib import Path

import h5py

from trainer.data.recording import (
    BIN_S,
    _check_finite,
    _check_params,
    _hw,
    _inspect,
    _open_h5,
    _plan,
    _read_rates,
    _repeat_datasets,
    _stimulus_stats,
)
from trainer.errors import DataError


def _duration(time: h5py.Dataset, n_frames: int) -> tuple[float, float]:
    """(duration in s, bin in s) from the first and last time stamps, or 10 ms bins if they are unusable."""
    dt = BIN_S
    if n_frames >= 2:
        t0, t1 = float(time[0]), float(time[n_frames - 1])
        if math.isfinite(t1 - t0) and t1 > t0:
            dt = (t1 - t0) / (n_frames - 1)
    return n_frames * dt, dt


def check_recording(path: str | Path, *, history: int = 40, val_frac: float = 0.1) -> dict:
    """Validate a recording the way load_data would (all cells) and summarise it; DataError on any problem."""
    path = Path(path).expanduser()
    _check_params(history, val_frac)
    with _open_h5(path) as f:
        train, test = _inspect(f, path)
        n_train, gap, n_val, n_test = _plan(train, test, history, val_frac, path)
        train_rates = _read_rates(train, path)
        _read_rates(test, path)
        repeats = _repeat_datasets(f, path, test.n_frames)
        stats = _stimulus_stats(train.stimulus, path, "train/stimulus")
        _check_finite(test.stimulus, path, "test/stimulus")
        train_s, bin_s = _duration(train.time, train.n_frames)
        test_s, _ = _duration(test.time, test.n_frames)
        dtype = str(train.stimulus.dtype)
    if stats["std"] == 0:
        raise DataError(f"{path}: 'train/stimulus' is constant (value {stats['mean']:g}); a constant "
                        f"stimulus cannot drive a model, check the file")
    return {
        "path": str(path),
        "n_cells": train.n_cells,
        "frame_size": train.frame_shape,
        "stimulus_dtype": dtype,
        "train_frames": train.n_frames,
        "test_frames": test.n_frames,
        "train_duration_s": train_s,
        "test_duration_s": test_s,
        "bin_s": bin_s,
        "stimulus_mean": stats["mean"],
        "stimulus_std": stats["std"],
        "stimulus_min": stats["min"],
        "stimulus_max": stats["max"],
        "mean_rate_hz": train_rates.mean(axis=1).tolist(),
        "n_test_repeats": next(iter(repeats.values())).shape[0] if repeats else 0,
        "n_cells_with_repeats": len(repeats),
        "history": history,
        "val_frac": val_frac,
        "train_samples": n_train,
        "gap_samples": gap,
        "val_samples": n_val,
        "test_samples": n_test,
    }


def format_summary(summary: dict) -> str:
    """A check_recording summary as aligned lines for `retina-trainer data check`."""
    rates = ", ".join(f"{i}: {r:.2f}" for i, r in enumerate(summary["mean_rate_hz"]))
    repeats = (f"{summary['n_test_repeats']} test repeats for {summary['n_cells_with_repeats']} of "
               f"{summary['n_cells']} cells" if summary["n_test_repeats"] else "none")
    lines = [
        ("recording", summary["path"]),
        ("cells", str(summary["n_cells"])),
        ("frames", f"{_hw(summary['frame_size'])} {summary['stimulus_dtype']}, "
                   f"bin {summary['bin_s'] * 1000:g} ms"),
        ("train", f"{summary['train_frames']} frames ({summary['train_duration_s']:.1f} s)"),
        ("test", f"{summary['test_frames']} frames ({summary['test_duration_s']:.1f} s)"),
        ("stimulus", f"train mean {summary['stimulus_mean']:.4g}, std {summary['stimulus_std']:.4g}, "
                     f"min {summary['stimulus_min']:g}, max {summary['stimulus_max']:g}"),
        ("mean rate", f"train, Hz per cell: {rates}"),
        ("repeats", repeats),
        ("samples", f"history {summary['history']}, val_frac {summary['val_frac']:g}: "
                    f"train {summary['train_samples']}, gap {summary['gap_samples']}, "
                    f"val {summary['val_samples']}, test {summary['test_samples']}"),
    ]
    return "\n".join(f"{key:<10} {value}" for key, value in lines)
