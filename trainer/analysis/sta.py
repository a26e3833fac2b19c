"""Splitting a spike-triggered average into space and time, numpy only (the analyses and the synthetic
recordings' ground truth use the same conventions).

An STA is (history, H, W), index 0 the oldest frame of the window, history-1 the frame just before the response.
Its rank-1 part (SVD) is a spatial map times a temporal profile; the temporal profile's largest lobe is made
positive, so the map carries the sign. The polarity is the sign of the map's net weight (the drive of a full-field
step, how ON and OFF cells are told apart with flashes): a cell whose ON and OFF lobes are about equally strong is
labelled by their sum, not by which single pixel happens to be the largest. The centre is the peak of the map's
part of that sign: an ON cell's centre is positive, an OFF cell's negative.
"""

from __future__ import annotations

import math

import numpy as np


def decompose(sta: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, float]:
    """Rank-1 split of an STA (history, H, W): spatial map (H, W, unit norm), temporal profile (history), polarity,
    centre (row, col) and the rank-1 share of the energy."""
    h, height, width = sta.shape
    u, s, vt = np.linalg.svd(sta.reshape(h, -1).astype(np.float64), full_matrices=False)
    temporal, spatial = u[:, 0] * s[0], vt[0].reshape(height, width)
    if temporal[np.argmax(np.abs(temporal))] < 0:
        temporal, spatial = -temporal, -spatial
    polarity = 1 if spatial.sum() >= 0 else -1
    peak = np.unravel_index(int(np.argmax(polarity * spatial)), spatial.shape)
    energy = float((s ** 2).sum())
    return spatial, temporal, polarity, centroid(polarity * spatial, peak), (float(s[0] ** 2) / energy
                                                                              if energy > 0 else 0.0)


def centroid(positive: np.ndarray, peak: tuple[int, int], radius: int = 2) -> np.ndarray:
    """Centre of mass of the map's positive part within `radius` pixels of its peak."""
    r0, r1 = max(peak[0] - radius, 0), peak[0] + radius + 1
    c0, c1 = max(peak[1] - radius, 0), peak[1] + radius + 1
    w = np.clip(positive[r0:r1, c0:c1], 0, None)
    if w.sum() <= 0:
        return np.array(peak, dtype=np.float64)
    rows, cols = np.mgrid[r0:r0 + w.shape[0], c0:c0 + w.shape[1]]
    return np.array([(w * rows).sum() / w.sum(), (w * cols).sum() / w.sum()])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two arrays of any shape (0 when either is constant)."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0
