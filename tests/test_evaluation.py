"""Tests for the evaluation scores (known answers on synthetic arrays) and the evaluation figures."""

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from trainer import config
from trainer.evaluation import (
    cc_max,
    cc_norm,
    counts_to_rates,
    evaluate,
    explainable_fraction,
    feve,
    pearson,
    per_cell_table,
    reliability_loo,
    reliability_split_half,
    scalars,
    signal_power,
)
from trainer.evaluation.plots import plot_curves, plot_filters, plot_predictions, plot_search
from trainer.models import build_model
from trainer.training.metrics import pearson_per_cell

T, N_CELLS = 2000, 4


def true_rates(t: int = T, n: int = N_CELLS, seed: int = 0) -> np.ndarray:
    """Smooth positive rates in Hz (mean about 20, SD about 10), (t, n): a different random signal per cell."""
    rng = np.random.default_rng(seed)
    drive = counts_to_rates(rng.normal(size=(t, n)), bin_s=1.0, sigma_bins=3.0)
    return 18 * np.exp(0.5 * drive / drive.std(axis=0))


def noisy_repeats(rate: np.ndarray, n_repeats: int, noise: float | np.ndarray, seed: int = 1) -> np.ndarray:
    """Single trials = the true rate plus independent Gaussian noise of SD `noise` (per cell when an array)."""
    rng = np.random.default_rng(seed)
    return rate[None] + rng.normal(size=(n_repeats, *rate.shape)) * noise


# ------------------------------------------------------------------------------------------------------------
# pearson


def test_pearson_agrees_with_the_torch_metric_and_gives_0_for_constant_columns():
    rng = np.random.default_rng(0)
    target = rng.random((300, 5))
    pred = 0.5 * target + rng.normal(size=(300, 5))
    pred[:, 0] = -target[:, 0]
    pred[:, 1] = 3.0  # constant prediction
    target[:, 2] = 7.0  # constant target
    r = pearson(pred, target)
    assert r.shape == (5,) and r.dtype == np.float64
    np.testing.assert_allclose(r, pearson_per_cell(torch.from_numpy(pred), torch.from_numpy(target)).numpy(),
                               atol=1e-12)
    assert r[0] == pytest.approx(-1.0) and r[1] == 0.0 and r[2] == 0.0


@pytest.mark.parametrize("pred, target", [(np.zeros((5, 2)), np.zeros((5, 3))), (np.zeros(5), np.zeros(5)),
                                          (np.zeros((0, 2)), np.zeros((0, 2))),
                                          (np.full((5, 2), np.nan), np.zeros((5, 2)))])
def test_pearson_rejects_bad_shapes_and_values(pred, target):
    with pytest.raises(ValueError):
        pearson(pred, target)


# ------------------------------------------------------------------------------------------------------------
# reliability


def test_identical_repeats_are_perfectly_reliable():
    reps = np.repeat(true_rates()[None], 4, axis=0)
    np.testing.assert_allclose(reliability_loo(reps), 1.0)
    np.testing.assert_allclose(reliability_split_half(reps), 1.0)
    np.testing.assert_allclose(cc_max(reps), 1.0)
    np.testing.assert_allclose(explainable_fraction(reps), 1.0)


def test_more_noise_lowers_both_reliability_estimators():
    rate = true_rates()
    loo, half = [], []
    for noise in (5.0, 10.0, 20.0, 40.0):
        reps = noisy_repeats(rate, 6, noise)
        loo.append(reliability_loo(reps))
        half.append(reliability_split_half(reps))
    loo, half = np.array(loo), np.array(half)
    assert (np.diff(loo, axis=0) < 0).all() and (np.diff(half, axis=0) < 0).all()
    assert (half > loo).all()  # N-trial averages agree better than one trial with the rest


def test_split_half_matches_theory_and_the_noise_corrected_ceiling():
    rate = true_rates()
    reps = noisy_repeats(rate, 8, 10.0)
    signal_var, noise_var = rate.var(axis=0), 10.0 ** 2
    expected = signal_var / (signal_var + noise_var / 8)  # correlation of two independent 8-trial averages
    np.testing.assert_allclose(reliability_split_half(reps), expected, atol=0.03)
    # sqrt(split-half) and CC_max both estimate the r of the true rate with the trial average
    ceiling = pearson(reps.mean(axis=0), rate)
    np.testing.assert_allclose(np.sqrt(reliability_split_half(reps)), ceiling, atol=0.03)
    np.testing.assert_allclose(cc_max(reps), ceiling, atol=0.03)


def test_split_half_uses_every_split_when_few_and_seeded_random_ones_when_many():
    reps = noisy_repeats(true_rates(), 5, 10.0)
    # 5 repeats: halves of 2, 5 * 3 = 15 distinct splits, so any max_splits >= 15 gives the same answer
    np.testing.assert_array_equal(reliability_split_half(reps, max_splits=15),
                                  reliability_split_half(reps, max_splits=1000, seed=7))
    many = noisy_repeats(true_rates(), 20, 10.0)
    a, b = reliability_split_half(many, max_splits=30, seed=3), reliability_split_half(many, max_splits=30, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, reliability_split_half(many, max_splits=300), atol=0.02)


def test_two_repeats_are_enough_and_one_is_refused():
    reps = noisy_repeats(true_rates(), 2, 10.0)
    loo, half = reliability_loo(reps), reliability_split_half(reps)
    r12 = pearson(reps[0], reps[1])
    np.testing.assert_allclose(loo, r12)  # each trial against the other one
    np.testing.assert_allclose(half, 2 * r12 / (1 + r12))
    one = reps[:1]
    for fn in (reliability_loo, reliability_split_half, signal_power, cc_max, explainable_fraction):
        with pytest.raises(ValueError, match="at least 2 repeats"):
            fn(one)
    for fn in (feve, cc_norm):
        with pytest.raises(ValueError, match="at least 2 repeats"):
            fn(true_rates(), one)


# ------------------------------------------------------------------------------------------------------------
# FEVE and CC_norm


def test_predicting_the_true_rate_explains_all_explainable_variance():
    rate = true_rates()
    reps = noisy_repeats(rate, 50, 15.0)
    np.testing.assert_allclose(feve(rate, reps), 1.0, atol=0.02)
    np.testing.assert_allclose(cc_norm(rate, reps), 1.0, atol=0.02)


def test_true_rate_with_poisson_spike_counts_smoothed_like_the_recordings():
    rng = np.random.default_rng(2)
    rate = true_rates()
    counts = rng.poisson(rate * 0.01, size=(200, *rate.shape))
    reps = counts_to_rates(counts, bin_s=0.01, sigma_bins=0)  # unsmoothed, so the true rate is the expectation
    np.testing.assert_allclose(feve(rate, reps), 1.0, atol=0.03)
    np.testing.assert_allclose(cc_norm(rate, reps), 1.0, atol=0.03)


def test_a_constant_prediction_scores_zero_or_worse():
    rate = true_rates()
    reps = noisy_repeats(rate, 10, 10.0)
    mean_level = np.broadcast_to(reps.mean(axis=(0, 1)), rate.shape)
    assert (pearson(mean_level, reps.mean(axis=0)) == 0).all()
    assert (cc_norm(mean_level, reps) == 0).all()
    assert (feve(mean_level, reps) < 0.01).all()  # predicting the mean explains nothing
    assert (feve(mean_level + 10, reps) < -0.2).all()  # the wrong level is worse than nothing


def test_noise_correction_raises_the_correlation_of_a_good_model():
    rate = true_rates()
    reps = noisy_repeats(rate, 5, np.array([5.0, 10.0, 20.0, 40.0]))
    pred = rate + np.random.default_rng(3).normal(size=rate.shape) * 3.0
    cc_abs = pearson(pred, reps.mean(axis=0))
    norm = cc_norm(pred, reps)
    assert (norm >= cc_abs).all()
    np.testing.assert_allclose(norm, cc_abs / cc_max(reps))  # CC_norm = CC_abs / CC_max exactly
    assert norm[-1] - cc_abs[-1] > norm[0] - cc_abs[0]  # the noisier the cell, the larger the correction


def test_cells_without_explainable_signal_give_nan():
    rate = true_rates()
    reps = noisy_repeats(rate, 6, 10.0)
    reps[:, :, 1] = 0.0  # a silent cell
    pure_noise = np.random.default_rng(4).normal(size=(6, T))
    reps[:, :, 2] = pure_noise - pure_noise.mean(axis=0)  # trials whose average is exactly 0: no signal at all
    f, c, m = feve(rate, reps), cc_norm(rate, reps), cc_max(reps)
    assert np.isnan(f[1]) and np.isnan(c[1]) and np.isnan(m[1])
    assert np.isnan(f[2]) and np.isnan(c[2]) and np.isnan(m[2])
    assert np.isfinite(f[[0, 3]]).all() and np.isfinite(c[[0, 3]]).all()
    assert reliability_loo(reps)[1] == 0.0  # constant trials correlate as 0


def test_repeats_must_match_the_prediction():
    rate = true_rates()
    with pytest.raises(ValueError, match="n_repeats"):
        feve(rate, noisy_repeats(rate, 4, 1.0)[:, :-1])
    with pytest.raises(ValueError, match="3-D"):
        cc_norm(rate, rate)


# ------------------------------------------------------------------------------------------------------------
# counts, evaluate, table


def test_counts_to_rates_keeps_the_spike_count_and_converts_to_hz():
    counts = np.zeros((3, 100, 2))
    counts[:, 50, 0] = 1
    rates = counts_to_rates(counts, bin_s=0.01, sigma_bins=1.0)
    assert rates.shape == counts.shape
    np.testing.assert_allclose(rates.sum(axis=1) * 0.01, counts.sum(axis=1))
    assert rates[0, 50, 0] == rates[0, :, 0].max() and rates[0, 49, 0] == pytest.approx(rates[0, 51, 0])
    np.testing.assert_allclose(counts_to_rates(counts, 0.01, 0), counts / 0.01)


def test_evaluate_reports_every_score_with_means():
    rate = true_rates()
    reps = noisy_repeats(rate, 6, 10.0)
    target = reps.mean(axis=0)
    pred = rate + 2.0
    only = evaluate(pred, target)
    assert set(only) == {"n_cells", "n_samples", "test_pearson", "test_pearson_mean", "test_pearson_sem"}
    full = evaluate(pred, target, repeats=reps, truth=rate)
    for key in ("test_pearson", "truth_pearson", "truth_ceiling_pearson", "reliability_loo",
                "reliability_split_half", "cc_max", "cc_norm", "feve", "explainable_fraction"):
        assert full[key].shape == (N_CELLS,)
        assert full[f"{key}_mean"] == pytest.approx(full[key].mean())
    assert full["n_repeats"] == 6 and full["n_cells"] == N_CELLS and full["n_samples"] == T
    np.testing.assert_allclose(full["truth_pearson"], 1.0)  # an offset does not change r
    np.testing.assert_allclose(full["truth_ceiling_pearson"], full["test_pearson"])  # pred is the truth + 2
    assert all(isinstance(v, float) for v in scalars(full).values())
    assert "feve" not in scalars(full) and scalars(full)["n_repeats"] == 6.0


def test_evaluate_means_leave_out_nan_cells():
    rate = true_rates()
    reps = noisy_repeats(rate, 6, 10.0)
    reps[:, :, 0] = 0.0
    result = evaluate(rate, reps.mean(axis=0), repeats=reps)
    assert np.isnan(result["feve"][0])
    assert result["feve_mean"] == pytest.approx(result["feve"][1:].mean())


def test_evaluate_refuses_repeats_in_other_units_than_the_rates():
    rng = np.random.default_rng(5)
    rate = true_rates()
    counts = rng.poisson(rate * 0.01, size=(5, *rate.shape)).astype(float)
    target = counts_to_rates(counts).mean(axis=0)
    with pytest.raises(ValueError, match="counts_to_rates"):
        evaluate(rate, target, repeats=counts)
    assert evaluate(rate, target, repeats=counts_to_rates(counts))["n_repeats"] == 5


def test_evaluate_checks_shapes():
    rate = true_rates()
    with pytest.raises(ValueError, match="pred and target"):
        evaluate(rate, rate[:-1])
    with pytest.raises(ValueError, match="pred and truth"):
        evaluate(rate, rate, truth=rate[:, :2])


def test_per_cell_table_is_csv_with_a_row_per_cell_and_a_mean_row():
    rate = true_rates()
    reps = noisy_repeats(rate, 4, 10.0)
    reps[:, :, 3] = 0.0
    result = evaluate(rate, reps.mean(axis=0), repeats=reps)
    lines = per_cell_table(result, [2, 5, 7, 11]).splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["cell", "test_pearson"] and "feve" in header and "truth_pearson" not in header
    assert [row.split(",")[0] for row in lines[1:]] == ["2", "5", "7", "11", "mean"]
    feve_col = header.index("feve")
    assert lines[4].split(",")[feve_col] == "nan"
    assert float(lines[5].split(",")[feve_col]) == pytest.approx(result["feve_mean"], rel=1e-5)
    with pytest.raises(ValueError, match="cell ids"):
        per_cell_table(result, [1, 2])


# ------------------------------------------------------------------------------------------------------------
# plots


def assert_png_with_content(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image[..., :3].var() > 0


def test_plot_curves(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e + 0.01 * e, "val_pearson": 0.1 * e,
                "test_pearson": 0.09 * e, "lr": 1e-3} for e in range(1, 6)]
    history[2]["val_loss"] = math.nan  # a missing value is skipped, not drawn
    path = plot_curves(history, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    assert_png_with_content(path)
    with pytest.raises(ValueError, match="empty"):
        plot_curves([], tmp_path / "empty.png")


def test_plot_predictions(tmp_path):
    rate = true_rates()
    pred = rate + np.random.default_rng(6).normal(size=rate.shape) * np.array([1, 5, 10, 20])
    scores = pearson(pred, rate)
    assert_png_with_content(plot_predictions(pred, rate, [3, 4, 8, 9], scores, tmp_path / "sub" / "pred.png"))
    # one cell, and scores that are all NaN, still give a figure
    assert_png_with_content(plot_predictions(pred[:, :1], rate[:, :1], [3], np.array([np.nan]),
                                             tmp_path / "one.png", window_s=None))
    with pytest.raises(ValueError, match="one cell id"):
        plot_predictions(pred, rate, [1], scores, tmp_path / "bad.png")


@pytest.mark.parametrize("values", [
    {"img_shape": [10, 12, 12], "chans": [4, 4], "ksizes": [5, 3, 3]},
    {"model_type": "LN", "img_shape": [10, 12, 12]},
    {"model_type": "LinearStackedBNCNN", "img_shape": [10, 12, 12], "chans": [4, 4], "ksizes": [5, 3, 3]},
])
def test_plot_filters(tmp_path, values):
    torch.manual_seed(0)
    model = build_model(config.resolve(values), 3)
    assert_png_with_content(plot_filters(model, tmp_path / "filters.png"))


def test_plot_filters_needs_a_conv_or_a_full_linear_layer(tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_filters(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "none.png")


def test_plot_search(tmp_path):
    rng = np.random.default_rng(7)
    rows = [{"lr": lr, "chans": [c, c], "model_type": mt, "val_pearson": float(rng.uniform(0.2, 0.7))}
            for lr in (1e-4, 1e-3, 1e-2) for c in (4, 8) for mt in ("BNCNN", "LN")]
    rows.append({"lr": 1e-3, "chans": [4, 4], "model_type": "LN", "val_pearson": None})  # a failed run
    path = plot_search(rows, ["lr", "chans", "model_type"], "val_pearson", tmp_path / "search.png")
    assert_png_with_content(path)
    with pytest.raises(ValueError, match="finite value"):
        plot_search(rows, ["lr"], "test_pearson", tmp_path / "none.png")
    with pytest.raises(ValueError, match="keys"):
        plot_search(rows, [], "val_pearson", tmp_path / "none.png")
