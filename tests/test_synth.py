"""Synthetic recordings: the published layout, a sensible ground truth, determinism and atomic writes."""

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.data import synth
from trainer.data.commands import data
from trainer.data.recording import load_data
from trainer.data.synth import write_synthetic
from trainer.errors import DataError

SMALL = dict(n_cells=3, size=10, train_frames=900, test_frames=300, n_repeats=4, history=20)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def default_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file with the default sizes (20000 frames of 20x20, 5 cells), shared by the statistics tests."""
    return write_synthetic(tmp_path_factory.mktemp("synth"))


def test_published_layout_and_dtypes(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path, "exp1", "whitenoise", **SMALL)
    assert path == tmp_path / "exp1" / "whitenoise.h5"
    with h5py.File(path) as f:
        for split, n in (("train", 900), ("test", 300)):
            stim = f[f"{split}/stimulus"][()]
            assert stim.shape == (n, 10, 10) and stim.dtype == np.uint8
            assert set(np.unique(stim)) == {0, 255}
            assert (stim[0::3][: n // 3] == stim[1::3][: n // 3]).all()  # each frame held for 3 bins
            assert (stim[0::3][: n // 3] == stim[2::3][: n // 3]).all()
            assert not (stim[0] == stim[3]).all()
            np.testing.assert_allclose(f[f"{split}/time"][()], np.arange(n) * 0.01)
            for key in ("binned", "firing_rate_10ms"):
                ds = f[f"{split}/response/{key}"]
                assert ds.shape == (3, n) and ds.dtype == np.float64
        binned = f["train/response/binned"][()]
        assert (binned == np.round(binned)).all() and binned.min() >= 0  # spike counts
        rate = f["train/response/firing_rate_10ms"][()]
        assert rate.min() >= 0
        # smoothing keeps the spikes: the rate integrates to the count (up to the edges)
        np.testing.assert_allclose(rate.sum(1) * 0.01, binned.sum(1), rtol=0.02)
        repeats = np.stack([f[f"test/repeats/cell{i:02d}"][()] for i in (1, 2, 3)])
        assert repeats.shape == (3, 4, 300)
        assert sorted(f["test/repeats"]) == ["cell01", "cell02", "cell03"]  # 1-based names
        np.testing.assert_allclose(f["test/response/binned"][()], repeats.mean(1))
        assert not (repeats[:, 0] == repeats[:, 1]).all()  # separate trials
        gt = f["ground_truth"]
        assert gt["train/firing_rate"].shape == (3, 900) and gt["test/firing_rate"].shape == (3, 300)
        assert list(gt.attrs["cell_type"]) == ["LN", "subunit", "LN"]
        assert gt.attrs["position"].shape == (3, 2) and gt.attrs["cell_seed"].shape == (3,)
        assert f.attrs["generator"] == "trainer.data.synth"
        assert f.attrs["seed"] == 0 and f.attrs["bin_size"] == 0.01


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a", seed=3, **SMALL)
    b = write_synthetic(tmp_path / "b", seed=3, **SMALL)
    c = write_synthetic(tmp_path / "c", seed=4, **SMALL)
    assert sha(a) == sha(b)
    with h5py.File(a) as fa, h5py.File(c) as fc:
        assert not np.array_equal(fa["train/stimulus"][()], fc["train/stimulus"][()])
        key = "ground_truth/train/firing_rate"
        assert not np.array_equal(fa[key][()], fc[key][()])
        assert not np.array_equal(fa["train/stimulus"][:300], fa["test/stimulus"][()])  # drawn independently


def test_ground_truth_is_plausible_and_matches_recording(default_file: Path) -> None:
    with h5py.File(default_file) as f:
        truth, recorded = f["ground_truth/train/firing_rate"][()], f["train/response/firing_rate_10ms"][()]
        truth_test = f["ground_truth/test/firing_rate"][()]
        recorded_test = f["test/response/firing_rate_10ms"][()]
        cells = json.loads(f["ground_truth"].attrs["cells_json"])
        filters = f["ground_truth/temporal_filters"][()]
    assert truth.min() > 0 and truth_test.min() > 0
    assert ((truth.mean(1) > 2) & (truth.mean(1) < 20)).all()
    np.testing.assert_allclose(recorded.mean(1), truth.mean(1), rtol=0.1)  # Poisson spikes at the true rate
    r_train = [np.corrcoef(t, r)[0, 1] for t, r in zip(truth, recorded, strict=True)]
    r_test = [np.corrcoef(t, r)[0, 1] for t, r in zip(truth_test, recorded_test, strict=True)]
    assert min(r_train) > 0.35 and np.mean(r_train) > 0.5  # one noisy trial
    assert min(r_test) > 0.7  # mean of 5 trials
    # filters peak 60-120 ms after the frame and end before the 40-bin history
    assert filters.shape[1] < 40
    assert all(5 <= np.argmax(np.abs(k)) + 1 <= 13 for k in filters)
    assert all(6 <= c["peak_bins"] <= 12 for c in cells)
    assert all(5 <= c["center"][0] <= 14 and 5 <= c["center"][1] <= 14 for c in cells)  # away from the edges
    subunit = [c for c in cells if c["kind"] == "subunit"]
    assert subunit and all(len(set(c["subunit_signs"])) == 2 for c in subunit)  # ON and OFF subunits
    assert all(0.5 <= c["threshold"] <= 1.0 and min(c["subunit_weights"]) > 0 for c in subunit)


def test_loader_reads_synthetic_file(default_file: Path) -> None:
    d = load_data(default_file, img_shape=(40, 20, 20))
    assert d.n_cells == 5 and len(d.test) == 2000 - 40
    assert d.test_repeats.shape == (5, 1960, 5)
    assert d.stim_mean == pytest.approx(127.5, abs=2) and d.stim_std == pytest.approx(127.5, abs=1)
    x, _ = d.train.get(torch.arange(4))
    assert x.shape == (4, 40, 20, 20)
    expected = torch.tensor([(0 - d.stim_mean) / d.stim_std, (255 - d.stim_mean) / d.stim_std])
    torch.testing.assert_close(torch.unique(x), expected)  # binary frames z-score to two values


def test_atomic_write_and_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_synthetic(tmp_path, seed=1, **SMALL)
    assert sorted(p.name for p in path.parent.iterdir()) == ["whitenoise.h5"]  # no temporary left
    first = sha(path)
    with pytest.raises(DataError, match=r"already exists; pass --force to replace it"):
        write_synthetic(tmp_path, seed=2, **SMALL)
    assert sha(path) == first
    write_synthetic(tmp_path, seed=2, overwrite=True, **SMALL)
    assert sha(path) != first

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "asdict", interrupted)  # called while the file is being written
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path, "other", **SMALL)
    assert list((tmp_path / "other").iterdir()) == []  # nothing that looks like a recording


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_cells=0), "n_cells must be an integer >= 1"),
    (dict(size=4), "size must be an integer >= 8"),
    (dict(train_frames=40), r"train_frames must be an integer >= 41, got 40 \(frames must exceed the"),
    (dict(test_frames=10), "test_frames must be"),
    (dict(n_repeats=0), "n_repeats"),
    (dict(dataset="a/b"), "dataset must be a plain name"),
    (dict(history=2), "history must be an integer >= 4"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        write_synthetic(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_synth_then_check(tmp_path: Path) -> None:
    args = ["synth", str(tmp_path), "--dataset", "d1", "--cells", "2", "--size", "8", "--train-frames", "500",
            "--test-frames", "100", "--repeats", "2", "--history", "10", "--seed", "5"]
    result = CliRunner().invoke(data, args)
    assert result.exit_code == 0, result.output
    path = tmp_path / "d1" / "whitenoise.h5"
    assert result.output.splitlines()[0] == str(path)
    assert "2 cells (0: LN" in result.output and "1: subunit" in result.output
    assert "x 2 repeats" in result.output
    again = CliRunner().invoke(data, args)
    assert again.exit_code != 0 and isinstance(again.exception, DataError)
    assert CliRunner().invoke(data, [*args, "--force"]).exit_code == 0
    check = CliRunner().invoke(data, ["check", str(path), "--history", "10"])
    assert check.exit_code == 0 and "2 test repeats for 2 of 2 cells" in check.output
