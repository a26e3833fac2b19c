"""The analysis stimuli make the original's arrays.

`Original` below re-creates, loop by loop, the functions of the original torchdeepretina that the analyses use
(baccuslab/torch-deep-retina, torchdeepretina/stimuli.py at 0009645 and 542f371, retinal_phenomena.py newest
read; the function named in each method), with numpy only: np.random as the original's global generator, plain
loops where it used cv2/skimage (skimage.draw.circle: pixels strictly inside; downscale_local_mean: block means;
gaussian with blur 0: the identity). trainer/analysis/stimuli.py is written independently, vectorised and sized to
any model; at the original's 50x50 input and 40-frame history it must give the same arrays.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
import pytest

from trainer.analysis import stimuli


class Original:
    """The original's stimulus functions, as it wrote them (50x50 frames, history 40 unless given)."""

    @staticmethod
    def rolling_window(array, window):  # stimuli.rolling_window, time axis 0
        a = array.T
        shape = a.shape[:-1] + (a.shape[-1] - window, window)
        strides = a.strides + (a.strides[-1],)
        return np.rollaxis(np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides).T, 1, 0)

    @staticmethod
    def concat(*args, nx=50, nh=40):  # stimuli.concat
        return Original.rolling_window(np.vstack([np.broadcast_to(s, (s.shape[0], nx, nx)) for s in args])
                                       .astype("float32"), nh)

    @staticmethod
    def flash(flash_dur, delay, nsamples, intensity=-1.0):  # stimuli.flash (0009645)
        img = intensity * np.ones((1, 1, 1)) if np.isscalar(intensity) else intensity.reshape(1, *intensity.shape)
        sequence = np.zeros((nsamples,))
        sequence[delay:(delay + flash_dur)] = 1.0
        return sequence.reshape(-1, 1, 1) * img

    @staticmethod
    def paired_flashes(ifi, flash_dur, intensity, total_length, delay):  # stimuli.paired_flashes, before concat
        f0 = Original.flash(flash_dur, delay, total_length, intensity[0])
        f1 = Original.flash(flash_dur, delay + flash_dur + ifi, total_length, intensity[1])
        return f0 + f1

    @staticmethod
    def square(halfperiod, nsamples, phase=0.0, intensity=1.0):  # stimuli.square
        if halfperiod == 0:
            return np.ones(nsamples)
        offset = int(2 * phase * halfperiod)
        waveform = np.stack(list(repeat(np.array([intensity, -intensity]), halfperiod))).T.ravel()
        reps = int(np.ceil(nsamples / (2 * halfperiod)) + 1)
        return np.hstack(list(repeat(waveform, reps)))[offset:(nsamples + offset)]

    @staticmethod
    def grating(barsize=(5, 0), phase=(0.0, 0.0), nx=50, intensity=(1.0, 1.0)):  # stimuli.grating, no blur
        x = Original.square(barsize[0], nx, phase[0], intensity[0])
        y = Original.square(barsize[1], nx, phase[1], intensity[1])
        return np.outer(y, x)

    @staticmethod
    def reverse(img, halfperiod, nsamples):  # stimuli.reverse
        return np.stack([t * img for t in Original.square(halfperiod, nsamples)])

    @staticmethod
    def white(nt, nx=1, contrast=1.0):  # stimuli.white (0009645): full-field
        return np.broadcast_to(contrast * np.random.randn(nt, 1, 1), (nt, nx, nx))

    @staticmethod
    def repeat_white(n_samples, nx=50, contrast=1.0, n_repeats=3):  # stimuli.repeat_white, rand_spat false
        compressed = Original.white(int(np.ceil(n_samples / n_repeats)), nx=nx, contrast=contrast)
        return np.repeat(compressed, n_repeats, axis=0)[:n_samples]

    @staticmethod
    def stripes(img_shape, bar_size, angle=0):  # stimuli.stripes at 0 and 90 degrees
        if angle % 180 == 0:
            img = np.zeros((bar_size * 2, img_shape[1]))
            img[:bar_size] = 1
            img = np.tile(img, (img_shape[0] // (bar_size * 2), 1))
            if img.shape[0] < img_shape[0]:
                img = np.concatenate([img, np.ones((img_shape[0] - img.shape[0], img_shape[1]))])
            return img
        img = np.zeros((bar_size * 2, img_shape[0]))
        img[:bar_size] = 1
        img = np.tile(img, (img_shape[1] // (bar_size * 2), 1))
        if img.shape[0] < img_shape[1]:
            img = np.concatenate([img, np.ones((img_shape[1] - img.shape[0], img_shape[0]))])
        return img.T

    @staticmethod
    def circle(r0, c0, radius, shape):  # skimage.draw.circle: pixel centres strictly inside
        rows, cols = [], []
        for r in range(shape[0]):
            for c in range(shape[1]):
                if ((r - r0) / radius) ** 2 + ((c - c0) / radius) ** 2 < 1:
                    rows.append(r)
                    cols.append(c)
        return np.array(rows), np.array(cols)

    @staticmethod
    def random_differential_circle(n_frames=100, bar_size=4, foreground_velocity=1, sync_jitters=False,
                                   background_velocity=1, image_shape=(50, 50), center=(25, 25), radius=5,
                                   horizontal_foreground=True, horizontal_background=True):
        angle = 0 if horizontal_foreground else 90
        circle_grating = Original.stripes(image_shape, bar_size, angle=angle)
        angle = 0 if horizontal_background else 90
        background_grating = Original.stripes(image_shape, bar_size, angle=angle)
        background_axis = 0 if horizontal_background else 1
        foreground_axis = 0 if horizontal_foreground else 1
        background_steps = np.round(np.random.random(n_frames)).astype(int)
        background_steps[background_steps == 0] = -1
        if sync_jitters:
            foreground_steps = background_steps
            foreground_velocity = background_velocity
        else:
            foreground_steps = np.round(np.random.random(n_frames)).astype(int)
            foreground_steps[foreground_steps == 0] = -1
        row_coords, col_coords = Original.circle(*center, radius, image_shape)
        frames = []
        for i in range(n_frames):
            if np.random.random(1) < background_velocity:
                background_grating = np.roll(background_grating, background_steps[i], axis=background_axis)
            new_frame = background_grating.copy()
            if np.random.random(1) < foreground_velocity:
                circle_grating = np.roll(circle_grating, foreground_steps[i], axis=foreground_axis)
            new_frame[row_coords, col_coords] = circle_grating[row_coords, col_coords]
            frames.append(new_frame)
        return np.asarray(frames)

    @staticmethod
    def bar(center, width, height, nx=50, intensity=-1.0, us_factor=1):  # stimuli.bar, blur 0
        c0, c1 = center[0] * us_factor, center[1] * us_factor
        width *= us_factor
        height *= us_factor
        nx *= us_factor
        cx, cy = int(c0 + nx // 2), int(c1 + nx // 2)
        bx = slice(max(0, cx - width // 2), max(0, min(nx, cx + width // 2)))
        by = slice(max(0, cy - height // 2), max(0, min(nx, cy + height // 2)))
        frame = np.zeros((nx, nx))
        frame[by, bx] = intensity
        n = nx // us_factor  # skimage's downscale_local_mean: the mean of each us_factor x us_factor block
        return frame.reshape(n, us_factor, n, us_factor).mean(axis=(1, 3))

    @staticmethod
    def driftingbar(velocity, width, x=(-30, 30)):  # stimuli.driftingbar (0009645), before its concat
        npts = 1 + int((x[1] - x[0]) / velocity)
        centers = np.linspace(x[0], x[1], npts)
        return centers, np.stack([Original.bar((c, 0), width, np.inf, us_factor=5) for c in centers])

    @staticmethod
    def sweep(speed=0.08, width=2, x=(-30, 30)):  # the driftingbar that stimuli.motion_reversal(xflip) calls
        npts = int(1 + np.floor(np.abs(x[1] - x[0]) / speed))
        centers = np.linspace(x[0], x[1], npts)
        return centers, np.stack([Original.bar((c, 0), width, np.inf, us_factor=5) for c in centers])

    @staticmethod
    def motion_reversal(xflip, speed=0.24):  # stimuli.motion_reversal(xflip, speed), before its concat
        c1, x1 = Original.sweep(speed=speed, x=(-40, xflip))
        c2, x2 = Original.sweep(speed=speed, x=(xflip, -40))
        centers = np.concatenate((c1, c2))[40:]
        tflip = np.where(np.diff(centers) == 0)[0][0]
        return centers, tflip, np.concatenate([x1, x2])

    @staticmethod
    def osr_stim(duration=2, interval=8, nflashes=3, intensity=-1.0, filt_depth=40):  # retinal_phenomena.osr_stim
        single_flash = Original.flash(duration, interval, duration + interval, intensity=intensity)
        omitted_flash = Original.flash(duration, interval, duration + interval, intensity=0.0)
        zero_pad = np.zeros((filt_depth - interval, 1, 1))
        start_pad = np.zeros((interval * (nflashes - 1), 1, 1))
        seq = np.concatenate([start_pad, zero_pad, *repeat(single_flash, nflashes), omitted_flash, zero_pad])
        omitted_idx = len(start_pad) + len(zero_pad) + nflashes * len(single_flash) + interval - filt_depth
        return seq, omitted_idx


SIZE, H = (50, 50), 40


def test_windows_are_the_originals_rolling_window():
    frames = np.random.default_rng(0).standard_normal((57, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(stimuli.windows(frames, 9), Original.rolling_window(frames, 9))
    assert stimuli.windows(frames, 9).shape == (48, 9, 5, 7)  # one window short of the end, as the original


def test_step_and_paired_flashes_and_osr():
    ours = stimuli.windows(stimuli.full_field(stimuli.flash(100, 50, 200, -1.0), SIZE), H)
    np.testing.assert_array_equal(ours, Original.concat(Original.flash(100, 50, 200, -1.0)))
    for ifi in (2, 11, 19):
        for pair in ((-2.0, 0.0), (0.0, -2.0), (-2.0, -2.0)):
            np.testing.assert_array_equal(stimuli.paired_flashes(ifi, 1, pair, 100, 40),
                                          Original.paired_flashes(ifi, 1, pair, 100, 40))
    for kwargs in ({"duration": 2, "interval": 6, "nflashes": 8, "intensity": -2.0}, {}):
        seq, idx = Original.osr_stim(**kwargs)
        mine, onset = stimuli.osr_frames(kwargs.get("duration", 2), kwargs.get("interval", 8),
                                         kwargs.get("nflashes", 3), kwargs.get("intensity", -1.0), H)
        np.testing.assert_array_equal(mine, seq)
        assert onset - H == idx  # the original's omitted_idx is a response index: frame - history


@pytest.mark.parametrize("barsize,phase", [(5, 0.0), (3, 0.5), (7, 0.3)])
def test_reversing_grating(barsize, phase):
    ours = stimuli.reverse(stimuli.grating((barsize, 0), (phase, 0.0), SIZE), 50, 300)
    np.testing.assert_array_equal(ours, Original.reverse(Original.grating((barsize, 0), (phase, 0.0)), 50, 300))
    # at another size: the same profile along x, cut to the model's width and height
    small = stimuli.grating((barsize, 0), (phase, 0.0), (12, 20))
    np.testing.assert_array_equal(small, Original.grating((barsize, 0), (phase, 0.0), nx=50)[:12, :20])


def test_contrast_flicker_is_the_originals_repeat_white():
    for n, contrast in ((105, 0.7), (130, 0.1), (64, 1.0)):
        np.random.seed(3)
        expected = Original.repeat_white(n, contrast=contrast)
        ours = stimuli.repeat_white(n, SIZE, contrast, 3, np.random.RandomState(3))
        np.testing.assert_allclose(ours, expected, rtol=1e-6)  # ours float32
        assert (ours[0::3] == ours[1::3]).all() if n % 3 == 0 else True  # each value held 3 frames


@pytest.mark.parametrize("horizontal,bar", [(True, 4), (False, 4), (True, 3), (False, 7)])
def test_stripes_and_disk(horizontal, bar):
    np.testing.assert_array_equal(stimuli.stripes(SIZE, bar, horizontal),
                                  Original.stripes(SIZE, bar, 0 if horizontal else 90))
    np.testing.assert_array_equal(stimuli.stripes((20, 30), bar, horizontal),
                                  Original.stripes((20, 30), bar, 0 if horizontal else 90))
    rows, cols = Original.circle(25, 25, 8, SIZE)
    mask = np.zeros(SIZE, dtype=bool)
    mask[rows, cols] = True
    np.testing.assert_array_equal(stimuli.disk((25, 25), 8, SIZE), mask)


@pytest.mark.parametrize("seed", [0, 7])
def test_oms_differential_movie_is_the_originals(seed):
    np.random.seed(seed)
    expected = Original.random_differential_circle(70, bar_size=4, foreground_velocity=0.5, background_velocity=0.3,
                                                   center=(25, 25), radius=8)
    ours = stimuli.random_differential_circle(70, 4, 0.5, 0.3, SIZE, (25, 25), 8, True, False,
                                              np.random.RandomState(seed))
    np.testing.assert_array_equal(ours, expected)


def _one_grating(frame, horizontal):
    """Whether a frame is the plain grating shifted (the window continues the background)."""
    plain = stimuli.stripes(frame.shape, 4, horizontal)
    axis = 0 if horizontal else 1
    return any(np.array_equal(np.roll(plain, k, axis=axis), frame) for k in range(frame.shape[axis]))


def test_oms_global_movie_moves_window_and_background_together():
    """The original's "global" control drew the window's and the background's steps independently (two draws a
    frame even with sync_jitters), so they were out of step about half the time; ours moves them as one."""
    ours = stimuli.random_differential_circle(70, 4, 0.5, 0.5, SIZE, (25, 25), 8, True, True,
                                              np.random.RandomState(1))
    assert all(_one_grating(f, True) for f in ours)
    assert sum(not np.array_equal(a, b) for a, b in zip(ours[:-1], ours[1:], strict=True)) > 10  # and it moves
    np.random.seed(1)
    theirs = Original.random_differential_circle(70, bar_size=4, foreground_velocity=0.5, sync_jitters=True,
                                                 background_velocity=0.5, center=(25, 25), radius=8,
                                                 horizontal_foreground=False, horizontal_background=False)
    assert sum(not _one_grating(f, False) for f in theirs) > 10


@pytest.mark.parametrize("x", [-30.0, -27.3, -0.4, 0.0, 3.7, 24.9, 30.0])
def test_bar(x):
    np.testing.assert_array_equal(stimuli.bar(x, 2, SIZE, us_factor=5), Original.bar((x, 0), 2, np.inf, us_factor=5))
    np.testing.assert_array_equal(stimuli.bar(round(x), 2, SIZE), Original.bar((round(x), 0), 2, 50))


def test_drifting_bars_of_motion_anticipation_and_reversal():
    for velocity, x in ((0.176, (-30, 30)), (-0.176, (30, -30)), (0.08, (-30, 30))):
        centers, frames = stimuli.drifting_bar(velocity, 2, SIZE, x)
        c0, f0 = Original.driftingbar(velocity, 2, x)
        np.testing.assert_array_equal(centers, c0)
        np.testing.assert_array_equal(frames, f0)
    for xflip in (-9, 0, 2):
        frames, flip = stimuli.reversing_bar(xflip, 0.19, 2, SIZE, -40)
        _, tflip, expected = Original.motion_reversal(xflip, speed=0.19)
        np.testing.assert_array_equal(frames, expected)
        assert flip - H == tflip  # the original's tflip indexes responses: frame - history
