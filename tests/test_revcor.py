"""RevCorLN, the published LN baseline: fitted as the original's train_ln fitted it, trained by the Trainer in one
epoch, tracked and reloaded like any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import config
from trainer.data.recording import load_data
from trainer.data.synth import write_synthetic
from trainer.errors import ConfigError
from trainer.models import build_model
from trainer.models.revcor import RevCorLN, fit_revcor
from trainer.training import checkpoint
from trainer.training.trainer import Trainer

SHAPE = [8, 10, 10]


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("revcor"), n_cells=4, size=10, train_frames=4000,
                           test_frames=600, n_repeats=3, history=8, seed=3)


def original_fit(x: np.ndarray, y: np.ndarray, seed: int, fit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A re-creation of the original's steps in float64 numpy, one cell at a time (utils.revcor, RevCorLN.normalize
    and convolve, fit_ln_nonlin @507decb): the linear outputs (N, cells) and the polynomials (cells, 6)."""
    rng = np.random.default_rng(seed)
    xm, xs = x.mean(), x.std()
    lins, polys = [], []
    for cell in range(y.shape[1]):
        t = y[:, cell]
        sta = ((x - xm) / (xs + 1e-5)).T @ ((t - t.mean()) / (t.std() + 1e-5)) / len(x)
        lin = ((x - xm) / (xs + 1e-7)) @ sta
        pick = rng.integers(0, len(x), fit_size) if fit_size < len(x) else np.arange(len(x))
        lins.append(lin)
        polys.append(np.polyfit(lin[pick], t[pick], 5))
    return np.stack(lins, 1), np.stack(polys)


@pytest.mark.parametrize("fit_size", [1500, 100_000])  # a random draw of samples, and all of them
def test_the_fit_is_the_originals_reverse_correlation_and_polynomial(recording, fit_size):
    data = load_data(recording, img_shape=SHAPE, dtype=torch.float64)
    model = RevCorLN(n_units=data.n_cells, img_shape=SHAPE).double()
    fit_revcor(model, data.train, seed=7, fit_size=fit_size)
    x = torch.cat([b for b, _ in data.train.batches(4096)]).flatten(1).numpy()
    lin, polys = original_fit(x, data.train.targets.numpy(), seed=7, fit_size=fit_size)
    with torch.no_grad():
        ours_lin = model.linear(torch.from_numpy(x)).numpy()
        ours = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours_lin, lin, rtol=1e-9, atol=1e-9 * np.abs(lin).max())
    np.testing.assert_allclose(model.coefs.numpy(), polys, rtol=1e-6, atol=1e-9)
    expected = np.stack([np.polyval(p, lin[:, c]) for c, p in enumerate(polys)], 1)
    np.testing.assert_allclose(ours, np.clip(expected, 0, None), rtol=1e-7, atol=1e-7 * expected.max())
    assert (ours >= 0).all()


def test_a_run_fits_it_in_one_epoch_and_its_checkpoint_reloads(recording, tmp_path):
    cfg = config.resolve({"model_type": "RevCorLN", "img_shape": SHAPE, "n_epochs": 5, "batch_size": 256})
    data = load_data(recording, img_shape=SHAPE)
    model = build_model(cfg, data.n_cells)
    trainer = Trainer(model, data, cfg, tmp_path / "run", torch.device("cpu"))
    result = trainer.fit()
    assert result.epochs_run == 1 and result.best_epoch == 1 and not result.stopped_early
    row = result.history[0]
    assert row["val_pearson"] > 0.2  # measured 0.297 (noisy rates of 4,000 frames); unfitted it is constant
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    state = checkpoint.load(tmp_path / "run" / checkpoint.BEST)
    again = build_model(state["config"], data.n_cells)
    again.load_state_dict(state["model"])
    x = next(data.test.batches(64))[0]
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    assert trainer.optimizer.state_dict()["state"] == {}  # fitted, never stepped by the optimiser


def test_revcor_ln_is_never_pruned_or_packed():
    from trainer.pack_rule import pack_key

    with pytest.raises(ConfigError, match="RevCorLN has no channels to prune"):
        config.check_run(config.resolve({"model_type": "RevCorLN", "prune": True}), "run 0")
    assert pack_key(config.resolve({"model_type": "RevCorLN"})) is None
    assert pack_key(config.resolve({"model_type": "LN"})) is not None
