"""Tests for the per-cell Pearson correlation metrics."""

import numpy as np
import pytest
import torch

from trainer.training.metrics import mean_pearson, pearson_per_cell


def numpy_pearson(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(pred[:, i], target[:, i])[0, 1] for i in range(pred.shape[1])])


def test_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    target = rng.random((200, 6)).astype(np.float32)
    pred = (0.5 * target + rng.normal(size=(200, 6))).astype(np.float32)
    pred[:, 0] = -target[:, 0]  # a perfectly anti-correlated cell
    r = pearson_per_cell(torch.from_numpy(pred), torch.from_numpy(target))
    assert r.shape == (6,) and r.dtype == torch.float64
    np.testing.assert_allclose(r.numpy(), numpy_pearson(pred.astype(np.float64), target.astype(np.float64)),
                               atol=1e-12)
    assert r[0].item() == pytest.approx(-1.0)


def test_large_offset_float32_is_accurate():
    rng = np.random.default_rng(1)
    target = (1000.0 + rng.random((500, 3))).astype(np.float32)
    pred = (1000.0 + rng.random((500, 3))).astype(np.float32)
    r = pearson_per_cell(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_allclose(r.numpy(), numpy_pearson(pred.astype(np.float64), target.astype(np.float64)),
                               atol=1e-10)


def test_constant_column_gives_zero():
    torch.manual_seed(0)
    pred, target = torch.randn(50, 3), torch.randn(50, 3)
    pred[:, 1] = 0.1  # constant prediction (0.1 is not exactly representable: the mean rounds)
    target[:, 2] = 3.0  # silent cell
    r = pearson_per_cell(pred, target)
    assert not torch.isnan(r).any()
    assert r[1].item() == 0.0 and r[2].item() == 0.0
    assert r[0].item() != 0.0


def test_mean_pearson():
    torch.manual_seed(0)
    pred, target = torch.randn(40, 4), torch.randn(40, 4)
    expected = pearson_per_cell(pred, target).mean().item()
    assert isinstance(mean_pearson(pred, target), float)
    assert mean_pearson(pred, target) == pytest.approx(expected)
    assert mean_pearson(target, target) == pytest.approx(1.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        pearson_per_cell(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError):
        pearson_per_cell(torch.zeros(10), torch.zeros(10))
    with pytest.raises(ValueError):
        pearson_per_cell(torch.zeros(0, 3), torch.zeros(0, 3))


def test_does_not_track_gradients():
    pred = torch.randn(20, 2, requires_grad=True)
    assert not pearson_per_cell(pred, torch.randn(20, 2)).requires_grad
