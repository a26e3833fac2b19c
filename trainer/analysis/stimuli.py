"""The stimuli of the original's analyses, at any model input size: numpy arrays of frames (T, H, W).

Each generator follows the original torchdeepretina's definition (`stimuli.py`, `retinal_phenomena.py`; the
function named in each docstring), with the same parameters, so that at the original's 50x50 input with 40 frames
of history it makes the same array (tests/test_analysis_stimuli.py re-creates the original's functions and
compares). What the original fixed at 50x50 (`nx=50`, `concat(..., nh=40)`) is the model's own size here.

Frames are in the model's input units (the z-scored stimulus of training: 0 is the mean luminance, 1 one standard
deviation). `windows(frames, history)` makes the model's inputs: window i is frames i..i+history-1 and the model's
response to it is the rate at frame i + history, as in training. Pure numpy; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number

import numpy as np

Size = tuple[int, int]  # (height, width) of a frame


def windows(frames: np.ndarray, history: int) -> np.ndarray:
    """The model's inputs (T - history, history, H, W) float32: window i is frames i..i+history-1 (the original's
    rolling_window, which also stops one window short of the end: the last frame is only ever a target)."""
    n = frames.shape[0] - history
    if n < 1:
        raise ValueError(f"{frames.shape[0]} frames make no window of {history}")
    view = np.lib.stride_tricks.sliding_window_view(frames, history, axis=0)[:n]  # (n, H, W, history)
    return np.ascontiguousarray(np.moveaxis(view, -1, 1), dtype=np.float32)


def full_field(sequence: np.ndarray, size: Size) -> np.ndarray:
    """A (T, 1, 1) or (T, H, W) sequence as frames (T, H, W) (the original's spatialize)."""
    return np.broadcast_to(sequence, (sequence.shape[0], *size)).astype(np.float32)


def concat(parts: Sequence[np.ndarray], size: Size) -> np.ndarray:
    """Frames of several sequences one after the other (the original's concat, before its rolling window)."""
    return np.concatenate([full_field(p, size) for p in parts]).astype(np.float32)


def flash(duration: int, delay: int, n_frames: int, intensity: float | np.ndarray = -1.0) -> np.ndarray:
    """`n_frames` frames of 0 with a flash of `intensity` from frame `delay` for `duration` frames (stimuli.flash):
    (T, 1, 1) for a number, (T, H, W) for an image."""
    if n_frames < delay + duration:
        raise ValueError("the flash must end within the frames")
    img = intensity * np.ones((1, 1, 1)) if isinstance(intensity, Number) else np.asarray(intensity)[None]
    sequence = np.zeros(n_frames)
    sequence[delay:delay + duration] = 1.0
    return sequence.reshape(-1, 1, 1) * img


def paired_flashes(ifi: int, duration: int, intensities: tuple[float, float], total: int, delay: int) -> np.ndarray:
    """Two flashes `ifi` frames apart (stimuli.paired_flashes): (total, 1, 1)."""
    first = flash(duration, delay, total, intensities[0])
    return first + flash(duration, delay + duration + ifi, total, intensities[1])


def square(halfperiod: int, n: int, phase: float = 0.0, intensity: float = 1.0) -> np.ndarray:
    """A square wave of +-intensity, `halfperiod` samples per half, starting `phase` (0..1) into a period
    (stimuli.square); all ones for halfperiod 0."""
    if not 0 <= phase <= 1:
        raise ValueError("phase must be a fraction between 0 and 1")
    if halfperiod == 0:
        return np.ones(n)
    period = np.repeat([intensity, -intensity], halfperiod)
    offset = int(2 * phase * halfperiod)
    return np.tile(period, n // (2 * halfperiod) + 2)[offset:offset + n]


def grating(barsize: tuple[int, int] = (5, 0), phase: tuple[float, float] = (0.0, 0.0), size: Size = (50, 50),
            intensity: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """A square-wave grating frame (H, W): bars `barsize[0]` columns wide varying along x, times a square wave of
    `barsize[1]` rows along y (0: none) (stimuli.grating with us_factor 1 and no blur)."""
    x = square(barsize[0], size[1], phase[0], intensity[0])
    y = square(barsize[1], size[0], phase[1], intensity[1])
    return np.outer(y, x)


def reverse(img: np.ndarray, halfperiod: int, n: int) -> np.ndarray:
    """`img` and its negative alternating every `halfperiod` frames, n frames (stimuli.reverse)."""
    return square(halfperiod, n)[:, None, None] * img[None]


def repeat_white(n: int, size: Size, contrast: float, n_repeats: int, rng: np.random.Generator) -> np.ndarray:
    """Full-field Gaussian flicker of standard deviation `contrast`, each value held `n_repeats` frames
    (stimuli.repeat_white with rand_spat false): (n, H, W)."""
    values = contrast * rng.standard_normal(-(-n // n_repeats))
    return full_field(np.repeat(values, n_repeats)[:n].reshape(-1, 1, 1), size)


def stripes(size: Size, bar: int, horizontal: bool) -> np.ndarray:
    """Stripes of 1 and 0, `bar` pixels each, starting with 1, horizontal (varying down the rows) or vertical;
    rows (columns) left over after the last full pair are 1 (stimuli.stripes at angle 0 or 90)."""
    length, across = (size[0], size[1]) if horizontal else (size[1], size[0])
    if length < 2 * bar:
        raise ValueError(f"stripes of {bar} pixels need at least {2 * bar} pixels")
    profile = np.ones(length)
    n_full = length // (2 * bar) * 2 * bar
    profile[:n_full] = np.tile(np.repeat([1.0, 0.0], bar), length // (2 * bar))
    img = np.repeat(profile[:, None], across, axis=1)
    return img if horizontal else img.T


def disk(center: tuple[int, int], radius: float, size: Size) -> np.ndarray:
    """Pixels whose centres lie strictly within `radius` of `center` (row, col) (skimage.draw.circle, which the
    original's circle masks use)."""
    rows, cols = np.ogrid[:size[0], :size[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 < radius ** 2


def random_differential_circle(n_frames: int, bar: int, foreground_velocity: float, background_velocity: float,
                               size: Size, center: tuple[int, int], radius: float, horizontal: bool, sync: bool,
                               rng: np.random.RandomState) -> np.ndarray:
    """A circular window of grating in front of a grating background, each jittering one pixel at a time in a random
    direction, a step on a frame with probability `*_velocity` (stimuli.random_differential_circle; its random
    draws in its order, so a RandomState seeded as the original's np.random gives its movie).

    `sync` (the global-motion control) moves window and background together: one step draw per frame moves both,
    in the same direction. The original drew the two steps independently even then, so its "global" movie had the
    window and the background out of step about half the time (docs/differences.md)."""
    background = stripes(size, bar, horizontal)
    window = stripes(size, bar, horizontal)
    axis = 0 if horizontal else 1
    bg_steps = np.round(rng.random_sample(n_frames)).astype(int)
    bg_steps[bg_steps == 0] = -1
    if sync:
        fg_steps, foreground_velocity = bg_steps, background_velocity
    else:
        fg_steps = np.round(rng.random_sample(n_frames)).astype(int)
        fg_steps[fg_steps == 0] = -1
    inside = disk(center, radius, size)
    frames = np.empty((n_frames, *size))
    for i in range(n_frames):
        moved = rng.random_sample(1)[0] < background_velocity
        if moved:
            background = np.roll(background, bg_steps[i], axis=axis)
        if sync:
            fg_moved = moved
        else:
            fg_moved = rng.random_sample(1)[0] < foreground_velocity
        if fg_moved:
            window = np.roll(window, fg_steps[i], axis=axis)
        frames[i] = np.where(inside, window, background)
    return frames


def bar_profile(x_center: float, width: int, width_px: int, intensity: float = -1.0, us_factor: int = 1) -> np.ndarray:
    """One row (W,) of a full-height bar `width` pixels wide centred `x_center` pixels right of the frame's centre,
    drawn on a grid `us_factor` times finer and averaged back (stimuli.bar, whose bars here always span the frame's
    height: the original's height np.inf or 50 on a 50-pixel frame)."""
    nx = width_px * us_factor
    cx = int(x_center * us_factor + nx // 2)  # int(): truncation toward zero, as the original
    w = width * us_factor
    row = np.zeros(nx)
    row[max(0, cx - w // 2):max(0, min(nx, cx + w // 2))] = intensity
    return row.reshape(width_px, us_factor).mean(axis=1)


def bar(x_center: float, width: int, size: Size, intensity: float = -1.0, us_factor: int = 1) -> np.ndarray:
    """A full-height bar frame (H, W) (see bar_profile)."""
    return np.repeat(bar_profile(x_center, width, size[1], intensity, us_factor)[None], size[0], axis=0)


def drifting_bar(velocity: float, width: int, size: Size, x: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A dark bar drifting from x[0] to x[1] (pixels from the centre) at `velocity` pixels per frame: bar centres
    (n,) and frames (n, H, W), drawn at 5x and averaged back (stimuli.driftingbar of the newest retinal_phenomena:
    1 + int((x1 - x0) / velocity) positions)."""
    n = 1 + int((x[1] - x[0]) / velocity)
    centers = np.linspace(x[0], x[1], n)
    frames = np.stack([bar(c, width, size, us_factor=5) for c in centers])
    return centers, frames


def sweep(speed: float, width: int, size: Size, x: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A dark bar from x[0] to x[1] at `speed` pixels per frame in either direction (the driftingbar of the
    motion-reversal figure: 1 + floor(|x1 - x0| / speed) positions)."""
    n = int(1 + np.floor(abs(x[1] - x[0]) / speed))
    centers = np.linspace(x[0], x[1], n)
    return centers, np.stack([bar(c, width, size, us_factor=5) for c in centers])


def reversing_bar(xflip: float, speed: float, width: int, size: Size, start: float) -> tuple[np.ndarray, int]:
    """A bar sweeping from `start` to `xflip` and back (stimuli.motion_reversal): frames (n, H, W) and the frame at
    which it reverses (the last of the forward sweep)."""
    _, forward = sweep(speed, width, size, (start, xflip))
    _, back = sweep(speed, width, size, (xflip, start))
    return np.concatenate([forward, back]), len(forward) - 1


def osr_frames(duration: int, interval: int, n_flashes: int, intensity: float, history: int) -> tuple[np.ndarray, int]:
    """The omitted-stimulus sequence (retinal_phenomena.osr_stim with noise_std 0): blank, `n_flashes` flashes of
    `duration` frames every `duration + interval` frames, one omitted, blank. (T, 1, 1) and the frame at which
    the omitted flash would have started."""
    period = duration + interval
    one = flash(duration, interval, period, intensity)
    start = np.zeros((interval * (n_flashes - 1), 1, 1))
    pad = np.zeros((max(history - interval, 0), 1, 1))
    seq = np.concatenate([start, pad, *([one] * n_flashes), np.zeros((period, 1, 1)), pad])
    return seq, len(start) + len(pad) + n_flashes * period + interval
