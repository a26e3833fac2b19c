"""The original's battery of retinal phenomena, at the model's input size, each with a summary statistic.

Each phenomenon shows the model the original's stimulus (retinal_phenomena.py, newest commit read; the function
in each docstring) with the original's parameters. Lengths that the original tied to its 40-frame history (a
blank lead-in so that the first window sees no stimulus, the number of responses) follow the model's history, and
what it drew at 50x50 is drawn at the model's height and width; at 40x50x50 the arrays are the original's.

The original recorded a number for one of them (the OMS ratio); for the others it only drew figures. Their
statistics here are ours, defined in each docstring and in docs/analysis.md. Responses are predicted rates in Hz;
`baseline` is the response to windows that end before the stimulus starts. A statistic that is undefined for a
cell (a silent cell: a ratio of zeros) is null for that cell and left out of the mean, never NaN.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trainer.analysis import PHENOMENA as NAMES
from trainer.analysis import stimuli
from trainer.evaluation.plots import _figure, _save

BIN_MS = 10.0  # one frame is one 10 ms bin
EPS_HZ = 1e-6  # responses below this are silence: a ratio of them is undefined
UM_PER_PIXEL = 55.0  # the original's scale_factor (microns per checker)

Predict = Callable[[np.ndarray], np.ndarray]  # frames (T, H, W) -> rates (T - history, n_cells)


class Skip(Exception):
    """A phenomenon that cannot run at this input size; the message says why."""


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(n / d) if abs(d) > EPS_HZ else None for n, d in zip(num, den, strict=True)]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def _baseline(resp: np.ndarray, onset: int, history: int) -> np.ndarray:
    """Mean response (per cell) to the windows that end before frame `onset`: responses 0..onset-history."""
    return resp[:max(onset - history, 0) + 1].mean(axis=0)


# --------------------------------------------------------------------------------------------------------------
# each phenomenon: (predict, size, history, seed) -> result dict (parameters, statistics, per_cell, traces)


def step_response(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """A full-field dark step (retinal_phenomena.step_response: intensity -1 for 100 frames after a delay of 50,
    200 frames; the delay grows with a history beyond 40). Statistics: `on_off_index` = (I - D) / (I + D), D the
    peak rise of the rate above baseline in the 30 frames after the step's onset (a decrement), I in the 30 frames
    after its end (an increment): +1 a pure ON cell, -1 a pure OFF cell; `transience` = 1 - (mean deviation from
    baseline over the step's last 20 frames) / (peak deviation during the step)."""
    delay, duration = max(50, history + 10), 100
    seq = stimuli.flash(duration, delay, delay + duration + 50, intensity=-1.0)
    resp = predict(stimuli.full_field(seq, size))
    base = _baseline(resp, delay, history)
    dev = resp - base
    at = lambda f: f - history  # noqa: E731  (response index of frame f)
    dec = np.clip(dev[at(delay):at(delay + 30)], 0, None).max(axis=0)
    inc = np.clip(dev[at(delay + duration):at(delay + duration + 30)], 0, None).max(axis=0)
    peak = np.abs(dev[at(delay):at(delay + duration)]).max(axis=0)
    late = np.abs(dev[at(delay + duration - 20):at(delay + duration)]).mean(axis=0)
    on_off = _ratio(inc - dec, inc + dec)
    transience = [None if r is None else 1 - r for r in _ratio(late, peak)]
    return {"parameters": {"intensity": -1.0, "duration": duration, "delay": delay},
            "statistics": {"on_off_index": _mean(on_off), "transience": _mean(transience)},
            "per_cell": {"on_off_index": on_off, "transience": transience},
            "trace": {"stimulus": seq[history:, 0, 0], "response": resp}}


def paired_flash(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """Two 1-frame full-field flashes of -2, `ifi` frames apart for ifi 2..19, each alone and as a pair
    (retinal_phenomena.paired_flash: total 100 frames, first flash at 40 = the history). Statistic per ifi:
    `ratio` = peak of (pair - first alone) after the second flash / peak of (second alone - baseline): below 1
    the first flash suppresses the response to the second, above 1 facilitates it; of the mean response over
    cells (a cell that ignores dark flashes adds nothing), per cell too. `ratio_shortest_ifi`, `ratio_longest_ifi`:
    ifi 2 and 19 (at a history of 40 both flashes of every pair fit in one window)."""
    delay, total, duration, intensity = max(40, history), max(40, history) + 60, 1, -2.0
    ifis = list(range(2, 20))
    ratios, by_ifi, pairs = [], [], []
    for ifi in ifis:
        parts = [stimuli.paired_flashes(ifi, duration, pair, total, delay)
                 for pair in ((intensity, 0.0), (0.0, intensity), (intensity, intensity))]
        r1, r2, r12 = (predict(stimuli.full_field(p, size)) for p in parts)
        second = delay + duration + ifi - history
        gain = r12 - r1
        alone = r2 - _baseline(r2, delay + duration + ifi, history)
        ratios.append(_ratio(gain[second:].max(axis=0), alone[second:].max(axis=0)))
        by_ifi.append(_ratio(gain[second:].mean(axis=1, keepdims=True).max(axis=0),
                             alone[second:].mean(axis=1, keepdims=True).max(axis=0))[0])
        pairs.append(r12.mean(axis=1))
    return {"parameters": {"ifis": ifis, "duration": duration, "intensity": intensity, "delay": delay,
                           "total": total},
            "statistics": {"ratio_shortest_ifi": by_ifi[0], "ratio_longest_ifi": by_ifi[-1]},
            "per_cell": {"ratio_shortest_ifi": ratios[0], "ratio_longest_ifi": ratios[-1]},
            "per_ifi": {"ifi": ifis, "ratio": by_ifi},
            "trace": {"pair_response_by_ifi": np.stack(pairs)}}


def reversing_grating(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """A square-wave grating of 5-pixel bars reversing contrast every 50 frames (retinal_phenomena.reversing_grating:
    300 frames at history 40; 260 responses at any history). Statistic: `f2_f1` = amplitude of the response at twice
    the reversal frequency over the amplitude at the reversal frequency (the original's freq_doubling F2/F1),
    from the last two full periods: above 1, frequency doubling (nonlinear spatial summation)."""
    if size[1] < 10:
        raise Skip(f"a grating of 5-pixel bars needs at least 10 columns; the model's frames are {size[0]}x{size[1]}")
    halfperiod, bar = 50, 5
    frames = stimuli.reverse(stimuli.grating((bar, 0), (0.0, 0.0), size), halfperiod, history + 260)
    resp = predict(frames)
    tail = resp[-4 * halfperiod:]  # two periods of 100 frames
    amp = np.abs(np.fft.rfft(tail - tail.mean(axis=0), axis=0))
    f1, f2 = amp[2], amp[4]
    ratio = _ratio(f2, f1)
    return {"parameters": {"bar": bar, "halfperiod": halfperiod, "frames": history + 260},
            "statistics": {"f2_f1": _mean(ratio)}, "per_cell": {"f2_f1": ratio},
            "trace": {"stimulus": frames[history:, 0, 0], "response": resp}}


def contrast_adaptation(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """Full-field Gaussian flicker (values held 3 frames) at contrast 0.7, then 0.1, then 0.7
    (retinal_phenomena.contrast_adaptation: 300 frames at history 40, the low epoch the middle half of the responses),
    10 repeats of new flicker, averaged (the original's earlier version; its newest multiplied the flicker by a
    second noise, docs/differences.md). Statistics: `index` = (late - early) / (late + early), the mean rate over the
    last and first third of the low-contrast epoch: > 0 the rate recovers after the drop (adaptation);
    `rate_ratio` = mean rate at low over the first high epoch."""
    c0, c1, repeats = 0.7, 0.1, 10
    q = 260 // 4
    rng = np.random.default_rng(seed)
    resps = []
    for _ in range(repeats):
        frames = np.concatenate([stimuli.repeat_white(history + q, size, c0, 3, rng),
                                 stimuli.repeat_white(2 * q, size, c1, 3, rng),
                                 stimuli.repeat_white(q, size, c0, 3, rng)])
        resps.append(predict(frames))
    resp = np.mean(resps, axis=0)
    third = (2 * q) // 3
    early, late = resp[q:q + third].mean(axis=0), resp[3 * q - third:3 * q].mean(axis=0)
    index = _ratio(late - early, late + early)
    rate = _ratio(resp[q:3 * q].mean(axis=0), resp[:q].mean(axis=0))
    envelope = np.concatenate([np.full(history + q, c0), np.full(2 * q, c1), np.full(q, c0)])
    return {"parameters": {"contrasts": [c0, c1, c0], "frames": [history + q, 2 * q, q], "repeats": repeats},
            "statistics": {"index": _mean(index), "rate_ratio": _mean(rate)},
            "per_cell": {"index": index, "rate_ratio": rate},
            "trace": {"stimulus": envelope[history:], "response": resp}}


def oms(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """Object motion sensitivity (retinal_phenomena.oms_random_differential): a disk of radius 8 at the centre onto
    a grating of 4-pixel stripes in front of the same grating, jittering (a step with probability 0.5 a frame in
    the disk, 0.3 in the background) for 70 frames between 40 still frames; the global control moves both together
    (probability 0.5). Statistic: the original's `ratio` = mean response to global over differential motion (its
    metrics['oms']): below 1 a cell prefers differential (object) motion."""
    radius, bar = 8, 4
    if min(size) <= 2 * radius + 1:
        raise Skip(f"needs frames wider than {2 * radius + 1} pixels for its disk of radius {radius} and a "
                   f"background around it; the model's frames are {size[0]}x{size[1]}")
    pre, post, moving = max(40, history), 40, 70
    center = (size[0] // 2, size[1] // 2)
    rng = np.random.RandomState(seed)

    def movie(fg: float, bg: float, sync: bool) -> np.ndarray:
        m = stimuli.random_differential_circle(moving, bar, fg, bg, size, center, radius, True, sync, rng)
        return np.concatenate([np.repeat(m[:1], pre, axis=0), m, np.repeat(m[-1:], post, axis=0)])

    diff, glob = movie(0.5, 0.3, False), movie(0.5, 0.5, True)
    rd, rg = predict(diff), predict(glob)
    s = slice(pre - history, pre + moving)  # the original's [pre-40 : total-post]
    ratio = _ratio(rg[s].mean(axis=0), rd[s].mean(axis=0))
    return {"parameters": {"radius": radius, "bar": bar, "foreground_velocity": 0.5, "background_velocity": 0.3,
                           "global_velocity": 0.5, "frames": [pre, moving, post]},
            "statistics": {"ratio": _mean(ratio)}, "per_cell": {"ratio": ratio},
            "trace": {"differential": rd, "global": rg}}


def osr(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """Omitted stimulus response (retinal_phenomena.osr: 8 full-field flashes of -2 lasting 2 frames every 8
    frames, then one omitted). Statistics, of the mean response over cells (per cell too): `ratio` = peak rise
    above baseline in the 16 frames from where the omitted flash would have started, over the mean peak rise after
    the last three flashes; `latency_ms` of that peak after the omitted flash's time."""
    duration, interval, n_flashes, intensity = 2, 6, 8, -2.0
    seq, omitted = stimuli.osr_frames(duration, interval, n_flashes, intensity, history)
    resp = predict(stimuli.full_field(seq, size))
    period = duration + interval
    first = omitted - n_flashes * period

    def measure(r: np.ndarray) -> tuple[list[float | None], list[float]]:
        dev = r - np.median(r[:max(first - history, 0) + 1], axis=0)
        peaks = [dev[first + k * period - history:first + (k + 1) * period - history].max(axis=0)
                 for k in range(n_flashes - 3, n_flashes)]
        after = dev[omitted - history:omitted - history + 2 * period]
        return _ratio(after.max(axis=0), np.mean(peaks, axis=0)), (after.argmax(axis=0) * BIN_MS).tolist()

    ratio, latency = measure(resp)
    pop_ratio, pop_latency = measure(resp.mean(axis=1, keepdims=True))
    return {"parameters": {"duration": duration, "interval": interval, "flashes": n_flashes,
                           "intensity": intensity},
            "statistics": {"ratio": pop_ratio[0], "latency_ms": pop_latency[0]},
            "per_cell": {"ratio": ratio, "latency_ms": latency},
            "trace": {"stimulus": seq[history:, 0, 0], "response": resp, "omitted": omitted - history}}


def motion_reversal(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """A dark bar 2 pixels wide sweeping at 0.19 pixels per frame from 15 pixels outside the left edge to a point x,
    then back, for x = -9..2 pixels from the centre (those inside the frame), aligned at the reversal and averaged
    over positions and cells (retinal_phenomena.dr_motion_reversal, the published figure). Statistic: `ratio` = the
    peak response in the 300 ms after the reversal over the peak in the 300 ms before."""
    speed, width = 0.19, 2
    start = -(size[1] // 2 + 15)
    xs = [x for x in range(-9, 3) if abs(x) < size[1] // 2]
    traces, flips = [], []
    for x in xs:
        frames, flip = stimuli.reversing_bar(x, speed, width, size, start)
        if flip - history < 0:
            raise Skip(f"the bar's sweep to the reversal ({flip} frames) is shorter than the history ({history})")
        traces.append(predict(frames))
        flips.append(flip - history)
    deltas = [f - flips[0] for f in flips]
    cut = [traces[0]] + [t[d:len(t) - d] for t, d in zip(traces[1:], deltas[1:], strict=True)]
    mean = np.concatenate(cut, axis=1).mean(axis=1)  # over positions and cells
    t_ms = (np.arange(len(mean)) - flips[0]) * BIN_MS
    before = mean[(t_ms >= -300) & (t_ms < 0)]
    after = mean[(t_ms > 0) & (t_ms <= 300)]
    ratio = _ratio(np.array([after.max()]), np.array([before.max()]))[0] if len(before) and len(after) else None
    return {"parameters": {"speed": speed, "width": width, "start": start, "reversal_x": xs},
            "statistics": {"ratio": ratio},
            "trace": {"time_ms": t_ms, "response": mean}}


def motion_anticipation(predict: Predict, size: stimuli.Size, history: int, seed: int) -> dict[str, Any]:
    """Berry et al. 1999 (retinal_phenomena.motion_anticipation at the battery's velocity 0.176): a dark bar 2 pixels
    wide drifting right and left across the frame (from 5 pixels outside it), and flashed for 2 frames at each
    position; responses averaged over cells and scaled to their maximum. Statistic: `lead_um` = how far ahead of
    the flashed bar's peak position the moving bar's response peaks, in the direction of motion, mean of both
    directions, at 55 um per pixel: > 0 the response anticipates the bar."""
    velocity, width, flash_frames = 0.176, 2, 2
    reach = size[1] // 2 + 5
    c_right, right = stimuli.drifting_bar(velocity, width, size, (-reach, reach))
    c_left, left = stimuli.drifting_bar(-velocity, width, size, (reach, -reach))
    r_right, r_left = predict(right).mean(axis=1), predict(left).mean(axis=1)
    centers = np.arange(-(size[1] // 2), size[1] // 2 + 1)
    flashes = np.stack([predict(stimuli.flash(flash_frames, history + 3, history + 30,
                                              intensity=stimuli.bar(x, width, size))) for x in centers])
    at = int(flashes.mean(axis=(0, 2)).argmax())
    r_flash = flashes[:, at, :].mean(axis=1)
    pos_right, pos_left = c_right[history:], c_left[history:]
    peak_flash = float(centers[int(np.argmax(r_flash))])
    lead_right = float(pos_right[int(np.argmax(r_right))]) - peak_flash
    lead_left = peak_flash - float(pos_left[int(np.argmax(r_left))])
    scale = lambda r: r / r.max() if r.max() > EPS_HZ else r  # noqa: E731
    return {"parameters": {"velocity": velocity, "width": width, "flash_frames": flash_frames, "reach": reach},
            "statistics": {"lead_um": UM_PER_PIXEL * (lead_right + lead_left) / 2},
            "lead_px": {"right": lead_right, "left": lead_left},
            "trace": {"right": (pos_right, scale(r_right)), "left": (pos_left, scale(r_left)),
                      "flash": (centers.astype(float), scale(r_flash))}}


BATTERY = {"step_response": step_response, "paired_flash": paired_flash, "reversing_grating": reversing_grating,
           "contrast_adaptation": contrast_adaptation, "oms": oms, "osr": osr, "motion_reversal": motion_reversal,
           "motion_anticipation": motion_anticipation}
assert tuple(BATTERY) == NAMES


def run(predict: Predict, size: stimuli.Size, history: int, seed: int, names: tuple[str, ...] = NAMES
        ) -> dict[str, dict[str, Any]]:
    """Each named phenomenon's result, or {"skipped": reason} for one that cannot run at this size."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            out[name] = BATTERY[name](predict, size, history, seed)
        except Skip as why:
            out[name] = {"skipped": str(why)}
    return out


def metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """analysis_<phenomenon>_<statistic> for every defined statistic."""
    return {f"analysis_{name}_{stat}": float(v) for name, r in results.items()
            for stat, v in r.get("statistics", {}).items() if v is not None}


def as_json(results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """phenomena.json: per phenomenon its parameters, statistics and per-cell values (traces left out)."""
    return {"settings": settings,
            "phenomena": {n: {k: v for k, v in r.items() if k != "trace"} for n, r in results.items()}}


# --------------------------------------------------------------------------------------------------------------
# plots: one per phenomenon


def plot(name: str, result: dict[str, Any], path: Path) -> Path:
    """The phenomenon's figure: the stimulus over time above the response (mean over cells, cells thin)."""
    fig = _figure(8, 5)
    tr = result["trace"]
    title = {"step_response": "Step response", "paired_flash": "Paired flashes",
             "reversing_grating": "Reversing grating", "contrast_adaptation": "Contrast adaptation",
             "oms": "Object motion sensitivity", "osr": "Omitted stimulus response",
             "motion_reversal": "Motion reversal", "motion_anticipation": "Motion anticipation"}[name]
    stats = ", ".join(f"{k} {v:.3g}" for k, v in result["statistics"].items() if v is not None) or "undefined"
    if name == "paired_flash":
        ax = fig.subplots(1, 1)
        r = tr["pair_response_by_ifi"]
        for i, ifi in enumerate(result["parameters"]["ifis"]):
            ax.plot(np.arange(r.shape[1]) * BIN_MS, r[i], color=(i / len(r), 0.2, 1 - i / len(r)), linewidth=0.8,
                    label=f"ifi {ifi}" if i in (0, len(r) - 1) else None)
        ax.set_xlabel("time (ms)")
        ax.set_ylabel("mean rate (Hz)")
        ax.legend(fontsize="small")
    elif name in ("oms",):
        ax = fig.subplots(1, 1)
        t = np.arange(len(tr["differential"])) * BIN_MS
        ax.plot(t, tr["differential"].mean(axis=1), color="g", label="differential")
        ax.plot(t, tr["global"].mean(axis=1), color="b", label="global")
        ax.set_xlabel("time (ms)")
        ax.set_ylabel("mean rate (Hz)")
        ax.legend(fontsize="small")
    elif name == "motion_reversal":
        ax = fig.subplots(1, 1)
        ax.plot(tr["time_ms"], tr["response"], color="lightcoral", linewidth=2)
        ax.axvline(0, color="0.6", linestyle="--", linewidth=0.8)
        ax.set_xlabel("time from reversal (ms)")
        ax.set_ylabel("mean rate (Hz)")
    elif name == "motion_anticipation":
        ax = fig.subplots(1, 1)
        for key, style, label in (("left", "g-", "left motion"), ("right", "b-", "right motion"),
                                  ("flash", "r-", "flash")):
            x, y = tr[key]
            ax.plot(UM_PER_PIXEL * np.asarray(x), y, style, label=label)
        ax.set_xlabel("bar position (um)")
        ax.set_ylabel("scaled rate")
        ax.legend(fontsize="small")
    else:
        ax_s, ax_r = fig.subplots(2, 1, sharex=True, height_ratios=[1, 2])
        t = np.arange(len(tr["response"])) * BIN_MS
        ax_s.plot(t, tr["stimulus"], color="k", linewidth=1)
        ax_s.set_ylabel("contrast" if name == "contrast_adaptation" else "stimulus")
        resp = tr["response"]
        for k in range(resp.shape[1]):
            ax_r.plot(t, resp[:, k], color="0.75", linewidth=0.6)
        ax_r.plot(t, resp.mean(axis=1), color="k", linewidth=1.5, label="mean over cells")
        if name == "osr":
            ax_r.axvline(tr["omitted"] * BIN_MS, color="tab:red", linestyle="--", linewidth=0.8,
                         label="omitted flash")
        ax_r.set_xlabel("time (ms)")
        ax_r.set_ylabel("rate (Hz)")
        ax_r.legend(fontsize="small")
    fig.suptitle(textwrap.fill(f"{title}: {stats}", 90), fontsize="medium")
    return _save(fig, path)
