"""Test-set scores of a model against recorded (and, for synthetic data, true) firing rates; pure numpy.

Shapes: predictions, targets and true rates are (T, n_cells); single-trial repeats are (n_repeats, T, n_cells),
aligned to the same samples and in the same units as the predictions (see `counts_to_rates`). Every score is per
cell. Definitions, formulas and how to read them: docs/metrics.md.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np

# Per-cell keys of `evaluate`, in the order the per-cell table lists them.
PER_CELL_KEYS = ("test_pearson", "truth_pearson", "truth_ceiling_pearson", "reliability_loo",
                 "reliability_split_half", "cc_max", "cc_norm", "feve", "explainable_fraction")
UNIT_RATIO_LIMIT = 2.0  # repeats whose mean differs from the target's by more than this factor are refused


# ------------------------------------------------------------------------------------------------------------
# input checks


def _matrix(name: str, a: np.ndarray) -> np.ndarray:
    """`a` as a finite float64 (T, n_cells) array with at least one sample, else a ValueError naming it."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (T, n_cells), got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} has no samples (shape {a.shape})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} NaN/inf values; scores need finite rates")
    return a


def _repeats(a: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
    """`a` as finite float64 (n_repeats >= 2, T, n_cells) repeats, matching `like` (T, n_cells) when given."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"repeats must be 3-D (n_repeats, T, n_cells), got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 repeats to separate signal from trial-to-trial noise, got {a.shape[0]}")
    if a.shape[1] == 0:
        raise ValueError(f"repeats have no samples (shape {a.shape})")
    if like is not None and a.shape[1:] != like.shape:
        raise ValueError(f"repeats have shape {a.shape} but predictions have {like.shape}; "
                         f"expected (n_repeats, {like.shape[0]}, {like.shape[1]})")
    if not np.isfinite(a).all():
        raise ValueError(f"repeats hold {int((~np.isfinite(a)).sum())} NaN/inf values")
    return a


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


# ------------------------------------------------------------------------------------------------------------
# correlation and reliability


def pearson(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column of pred vs target, (T, n) -> (n,), float64; a constant column gives 0."""
    x, y = _matrix("pred", pred), _matrix("target", target)
    _same_shape(x, y, "pred and target")
    # Constancy is tested exactly: subtracting a rounded mean can leave tiny residues that look like signal.
    constant = (x.max(axis=0) == x.min(axis=0)) | (y.max(axis=0) == y.min(axis=0))
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cov = (x * y).sum(axis=0)
    norm = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
    defined = ~constant & (norm > 0)
    r = np.zeros(x.shape[1])
    r[defined] = cov[defined] / norm[defined]
    return np.clip(r, -1.0, 1.0)


def reliability_loo(repeats: np.ndarray) -> np.ndarray:
    """Leave-one-repeat-out reliability per cell: r(trial k, mean of the other N-1 trials), averaged over k.

    The estimator of the lab's Benchmarks notebook. It says how well the data predict a held-out single trial, so
    it is lower than the split-half value and grows with the number of repeats N; report N with it.
    """
    reps = _repeats(repeats)
    n = reps.shape[0]
    total = reps.sum(axis=0)
    return np.mean([pearson(reps[k], (total - reps[k]) / (n - 1)) for k in range(n)], axis=0)


def _half_splits(n: int, half: int, max_splits: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Pairs of disjoint `half`-sized sets of repeat indices: all of them when they are few, else random ones."""
    n_all = math.comb(n, half) * math.comb(n - half, half) // 2  # unordered pairs of disjoint halves
    if n_all <= max_splits:
        splits = []
        for a in combinations(range(n), half):
            rest = [i for i in range(n) if i not in a]
            splits += [(list(a), list(b)) for b in combinations(rest, half) if a < b]
        return splits
    rng = np.random.default_rng(seed)
    perms = (rng.permutation(n) for _ in range(max_splits))
    return [(sorted(p[:half]), sorted(p[half:2 * half])) for p in perms]


def reliability_split_half(repeats: np.ndarray, max_splits: int = 200, seed: int = 0) -> np.ndarray:
    """Split-half reliability per cell, Spearman-Brown corrected to all N repeats.

    For each split of the repeats into two disjoint halves of floor(N/2) trials (every split when there are at most
    `max_splits`, else `max_splits` random ones drawn with `seed`), take r between the two half averages; average r
    over splits and correct it to N trials: rho = k r / (1 + (k - 1) r) with k = N / floor(N/2) (2r / (1 + r) for
    even N). rho estimates the correlation between two independent N-trial averages; sqrt(rho) is the r a perfect
    model could reach against the N-trial average (what CC_max estimates). NaN where 1 + (k - 1) r <= 0.
    """
    reps = _repeats(repeats)
    n = reps.shape[0]
    half = n // 2
    if max_splits < 1:
        raise ValueError(f"max_splits must be at least 1, got {max_splits}")
    splits = _half_splits(n, half, max_splits, seed)
    r = np.mean([pearson(reps[a].mean(axis=0), reps[b].mean(axis=0)) for a, b in splits], axis=0)
    k = n / half
    denom = 1 + (k - 1) * r
    rho = np.full_like(r, np.nan)
    ok = denom > 0
    rho[ok] = k * r[ok] / denom[ok]
    return rho


# ------------------------------------------------------------------------------------------------------------
# noise-corrected scores


def signal_power(repeats: np.ndarray) -> np.ndarray:
    """Sahani-Linden signal power per cell: (Var(sum_n r_n) - sum_n Var(r_n)) / (N (N - 1)), variances over time."""
    reps = _repeats(repeats)
    n = reps.shape[0]
    return (reps.sum(axis=0).var(axis=0) - reps.var(axis=1).sum(axis=0)) / (n * (n - 1))


def cc_max(repeats: np.ndarray) -> np.ndarray:
    """Schoppe et al. 2016 ceiling per cell, sqrt(SP / Var(trial average)): r of the true rate vs the trial average.

    NaN where the signal power SP <= 0 (no detectable stimulus-driven signal).
    """
    reps = _repeats(repeats)
    sp = signal_power(reps)
    var_mean = reps.mean(axis=0).var(axis=0)
    out = np.full(sp.shape, np.nan)
    ok = (sp > 0) & (var_mean > 0)
    out[ok] = np.sqrt(sp[ok] / var_mean[ok])
    return out


def cc_norm(pred: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    """Schoppe et al. 2016 noise-corrected correlation per cell, Cov(trial average, pred) / sqrt(SP Var(pred)).

    Equals CC_abs / CC_max (CC_abs = r vs the trial average), so about 1 for a model that predicts the true rate.
    Not clipped: noise in the SP estimate can push it a little above 1. NaN where SP <= 0; 0 for a constant pred.
    """
    p = _matrix("pred", pred)
    reps = _repeats(repeats, like=p)
    sp = signal_power(reps)
    mean = reps.mean(axis=0)
    cov = ((p - p.mean(axis=0)) * (mean - mean.mean(axis=0))).mean(axis=0)
    var_pred = p.var(axis=0)
    constant = p.max(axis=0) == p.min(axis=0)
    out = np.full(sp.shape, np.nan)
    out[(sp > 0) & constant] = 0.0
    ok = (sp > 0) & ~constant & (var_pred > 0)
    out[ok] = cov[ok] / np.sqrt(sp[ok] * var_pred[ok])
    return out


def _variances(reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(noise variance, total variance) per cell, as Cadena et al. 2019 define them (ddof 1 for both)."""
    noise = reps.var(axis=0, ddof=1).mean(axis=0)  # across repeats, then mean over time
    total = reps.reshape(-1, reps.shape[2]).var(axis=0, ddof=1)  # over all (repeat, time) values
    return noise, total


def explainable_fraction(repeats: np.ndarray) -> np.ndarray:
    """Fraction of a cell's single-trial variance that is stimulus-driven, (total - noise) / total; NaN if total 0."""
    noise, total = _variances(_repeats(repeats))
    out = np.full(total.shape, np.nan)
    ok = total > 0
    out[ok] = (total[ok] - noise[ok]) / total[ok]
    return out


def feve(pred: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    """Fraction of explainable variance explained per cell (Cadena et al. 2019), 1 for the true rate.

    noise = mean over time of the across-repeat variance (ddof 1); explainable = variance over all (time, repeat)
    values (ddof 1) - noise; FEVE = 1 - (MSE of pred vs single trials - noise) / explainable. Not clipped at 0:
    0 is as good as predicting the mean, below 0 is worse. NaN where explainable <= 0 (nothing to explain).
    """
    p = _matrix("pred", pred)
    reps = _repeats(repeats, like=p)
    noise, total = _variances(reps)
    explainable = total - noise
    mse = ((reps - p[None]) ** 2).mean(axis=(0, 1))
    out = np.full(explainable.shape, np.nan)
    ok = explainable > 0
    out[ok] = 1 - (mse[ok] - noise[ok]) / explainable[ok]
    return out


def counts_to_rates(counts: np.ndarray, bin_s: float = 0.01, sigma_bins: float = 1.0) -> np.ndarray:
    """Spike counts per bin -> rates in Hz, smoothed over time (axis -2) like the recordings' firing_rate_10ms.

    A normalised Gaussian of `sigma_bins` bins, cut at 4 sigma, zero beyond the ends (as pyret's estfr and the
    synthetic writer); `sigma_bins` 0 only divides by `bin_s`. Use it so single trials match the predicted rates.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim < 2:
        raise ValueError(f"counts must be (..., T, n_cells), got shape {c.shape}")
    if bin_s <= 0 or sigma_bins < 0:
        raise ValueError(f"need bin_s > 0 and sigma_bins >= 0, got {bin_s} and {sigma_bins}")
    if sigma_bins == 0:
        return c / bin_s
    half = int(4 * sigma_bins)
    taps = np.exp(-np.arange(-half, half + 1) ** 2 / (2 * sigma_bins ** 2))
    taps /= taps.sum()
    t = c.shape[-2]
    padded = np.pad(c, [(0, 0)] * (c.ndim - 2) + [(half, half), (0, 0)])
    return sum(w * padded[..., j:j + t, :] for j, w in enumerate(taps)) / bin_s


# ------------------------------------------------------------------------------------------------------------
# everything at once


def _check_units(target: np.ndarray, reps: np.ndarray) -> None:
    """Refuse repeats whose mean is far from the trial-averaged target's: they are in other units (counts vs Hz)."""
    m_target, m_reps = float(target.mean()), float(reps.mean())
    if m_target <= 0 or m_reps <= 0:
        return
    ratio = m_reps / m_target
    if not 1 / UNIT_RATIO_LIMIT <= ratio <= UNIT_RATIO_LIMIT:
        raise ValueError(f"the repeats average {m_reps:.4g} but the trial-averaged target averages {m_target:.4g}; "
                         f"they must be in the same units (Hz): convert spike counts with counts_to_rates first")


def _mean_sem(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over the cells where the score is defined (NaN cells left out)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), sem


def evaluate(pred: np.ndarray, target: np.ndarray, repeats: np.ndarray | None = None,
             truth: np.ndarray | None = None) -> dict:
    """Every test score per cell (arrays) with its mean and SEM over cells (`<key>_mean`, `<key>_sem`).

    Always `test_pearson` (r vs the trial-averaged target, the published convention). With repeats (n_repeats >= 2,
    same units as pred): `reliability_loo`, `reliability_split_half`, `cc_max`, `cc_norm`, `feve`,
    `explainable_fraction` and `n_repeats`. With truth (true rates aligned to the samples): `truth_pearson` (pred vs
    truth) and `truth_ceiling_pearson` (target vs truth, what a perfect model scores on test_pearson). Means and
    SEMs leave out cells where a score is NaN. Also `n_cells` and `n_samples`.
    """
    p, y = _matrix("pred", pred), _matrix("target", target)
    _same_shape(p, y, "pred and target")
    per_cell = {"test_pearson": pearson(p, y)}
    result: dict = {"n_cells": p.shape[1], "n_samples": p.shape[0]}
    if truth is not None:
        t = _matrix("truth", truth)
        _same_shape(p, t, "pred and truth")
        per_cell["truth_pearson"] = pearson(p, t)
        per_cell["truth_ceiling_pearson"] = pearson(y, t)
    if repeats is not None:
        reps = _repeats(repeats, like=p)
        _check_units(y, reps)
        result["n_repeats"] = reps.shape[0]
        per_cell.update(reliability_loo=reliability_loo(reps), reliability_split_half=reliability_split_half(reps),
                        cc_max=cc_max(reps), cc_norm=cc_norm(p, reps), feve=feve(p, reps),
                        explainable_fraction=explainable_fraction(reps))
    for key in PER_CELL_KEYS:
        if key in per_cell:
            result[key] = per_cell[key]
            result[f"{key}_mean"], result[f"{key}_sem"] = _mean_sem(per_cell[key])
    return result


def scalars(result: dict) -> dict[str, float]:
    """The scalar entries of an `evaluate` result (means, SEMs, counts), e.g. for mlflow.log_metrics."""
    return {k: float(v) for k, v in result.items() if not isinstance(v, np.ndarray)}


def per_cell_columns(result: dict, cell_ids: Sequence[int]) -> dict[str, list]:
    """The per-cell scores of an `evaluate` result as columns (cell id, then each score), e.g. for an MLflow table."""
    keys = [k for k in PER_CELL_KEYS if k in result]
    return {"cell": [int(c) for c in cell_ids], **{k: [float(v) for v in result[k]] for k in keys}}


def per_cell_table(result: dict, cell_ids: Sequence[int]) -> str:
    """CSV text of an `evaluate` result: one row per cell (by id) and a final `mean` row, NaN written as nan."""
    keys = [k for k in PER_CELL_KEYS if k in result]
    n = len(result["test_pearson"])
    if len(cell_ids) != n:
        raise ValueError(f"got {len(cell_ids)} cell ids for {n} cells")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["cell", *keys])
    for i, cid in enumerate(cell_ids):
        writer.writerow([cid, *(f"{result[k][i]:.6g}" for k in keys)])
    writer.writerow(["mean", *(f"{result[f'{k}_mean']:.6g}" for k in keys)])
    return out.getvalue()
