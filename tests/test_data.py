"""Reading, checking and windowing recordings in the published h5 layout."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.data import recording
from trainer.data.commands import data
from trainer.data.recording import DATA_ROOT_ENV, load_data, recording_key, recording_path, resolve_data_root
from trainer.data.summary import check_recording, format_summary
from trainer.errors import ConfigError, DataError

H, W = 6, 5


def rates_for(n_cells: int, n_frames: int) -> np.ndarray:
    """Rates that encode (cell, bin): rate[c, t] = 1000 c + t, so a target tells where it came from."""
    return 1000.0 * np.arange(n_cells)[:, None] + np.arange(n_frames)[None, :]


def write_recording(path: Path, *, train_frames: int = 200, test_frames: int = 60, n_cells: int = 3,
                    size: tuple[int, int] = (H, W), n_repeats: int = 4, dtype=np.uint8,
                    seed: int = 0) -> Path:
    """A small recording in the published layout with random frames and position-encoding rates."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for split, n in (("train", train_frames), ("test", test_frames)):
            f[f"{split}/stimulus"] = rng.integers(0, 256, size=(n, *size)).astype(dtype)
            f[f"{split}/time"] = np.arange(n) * 0.01
            f[f"{split}/response/firing_rate_10ms"] = rates_for(n_cells, n)
            f[f"{split}/response/binned"] = rng.poisson(0.2, size=(n_cells, n)).astype(np.float64)
            f[f"{split}/response/firing_rate_5ms"] = rates_for(n_cells, n)  # an extra the loader ignores
        for c in range(n_cells):
            counts = rng.poisson(1.0, size=(n_repeats, test_frames))
            f[f"test/repeats/cell{c + 1:02d}"] = counts.astype(np.float64)
        f["spikes/cell01"] = np.array([0.1, 0.5])
    return path


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    return write_recording(tmp_path / "rec.h5")


def window(stim: np.ndarray, s: int, h: int, mean: float, std: float) -> torch.Tensor:
    return (torch.from_numpy(stim[s:s + h]).float() - mean) / std


# ------------------------------------------------------------------------------------------------------------
# paths


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, "/env/root")
    assert resolve_data_root("/explicit") == Path("/explicit")
    assert resolve_data_root(None) == Path("/env/root")
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert resolve_data_root(None) == Path("~/experiments/data").expanduser()
    expected = Path("~/d/15-10-07/naturalscene.h5").expanduser()
    assert recording_path("~/d", "15-10-07", "naturalscene") == expected


def test_recording_key_names_what_changes_the_loaded_recording() -> None:
    cfg = {"cells": [2, 0], "img_shape": [40, 50, 50], "val_frac": 0.1, "val_size": 0, "lr": 1e-3, "device": "cpu"}
    key = recording_key(Path("/d/rec.h5"), cfg)
    assert key == ("/d/rec.h5", (2, 0), (40, 50, 50), 0.1, 0)
    assert hash(key) == hash(recording_key("/d/rec.h5", dict(cfg)))  # hashable; a str path gives the same key
    assert recording_key("/d/rec.h5", {**cfg, "lr": 1.0, "device": "cuda", "seed": 3}) == key  # not the run's own
    assert recording_key("/d/rec.h5", {**cfg, "cells": "all"})[1] == "all"
    for change in ({"cells": [0, 2]}, {"cells": "all"}, {"img_shape": [20, 50, 50]}, {"val_frac": 0.2},
                   {"val_size": 100}):
        assert recording_key("/d/rec.h5", {**cfg, **change}) != key, change
    assert recording_key("/d/other.h5", cfg) != key


# ------------------------------------------------------------------------------------------------------------
# windows


def test_window_is_frames_and_target_is_next_rate(rec: Path) -> None:
    h = 7
    d = load_data(rec, img_shape=(h, H, W))
    with h5py.File(rec) as f:
        train, test = f["train/stimulus"][()], f["test/stimulus"][()]
    for ws, stim in ((d.train, train), (d.val, train), (d.test, test)):
        idx = torch.tensor([0, len(ws) // 2, len(ws) - 1])
        x, y = ws.get(idx)
        assert x.shape == (3, h, H, W) and x.dtype == torch.float32 and y.dtype == torch.float32
        for k, i in enumerate(idx.tolist()):
            s = int(ws.starts[i])
            assert torch.equal(x[k], window(stim, s, h, d.stim_mean, d.stim_std))
            assert y[k].tolist() == [1000.0 * c + s + h for c in range(3)]
    assert torch.equal(d.test.targets, torch.tensor(rates_for(3, 60)[:, h:].T, dtype=torch.float32))


def test_windows_are_not_materialised(rec: Path) -> None:
    h = 7
    d = load_data(rec, img_shape=(h, H, W))
    # train and val gather from one uint8 copy of the frames
    assert d.train.stimulus.dtype == torch.uint8
    assert d.train.stimulus.untyped_storage().data_ptr() == d.val.stimulus.untyped_storage().data_ptr()
    assert d.train.rates.untyped_storage().data_ptr() == d.val.rates.untyped_storage().data_ptr()
    assert d.train.stimulus.untyped_storage().nbytes() == 200 * H * W
    held = sum(t.untyped_storage().nbytes() for t in (d.train.stimulus, d.train.rates, d.train.starts))
    assert held < len(d.train) * h * H * W  # less than one byte per windowed value


@pytest.mark.parametrize("n_frames,h,val_frac",
                         [(200, 7, 0.1), (200, 1, 0.5), (101, 10, 0.2), (1000, 40, 0.05)])
def test_split_is_disjoint_contiguous_and_complete(tmp_path: Path, n_frames: int, h: int,
                                                   val_frac: float) -> None:
    path = write_recording(tmp_path / "r.h5", train_frames=n_frames)
    d = load_data(path, img_shape=(h, H, W), val_frac=val_frac)
    train, val = d.train.starts.tolist(), d.val.starts.tolist()
    assert train == list(range(len(train)))
    assert val == list(range(val[0], n_frames - h))  # contiguous, ends with the last possible sample
    assert len(train) + h + len(val) == n_frames - h
    last_train_frame = train[-1] + h  # its target
    assert last_train_frame < val[0]  # first frame seen by any validation sample
    assert len(val) == max(1, round(val_frac * (n_frames - h)))


def test_shortest_train_that_splits(tmp_path: Path) -> None:
    def load(n_frames: int):
        path = write_recording(tmp_path / f"r{n_frames}.h5", train_frames=n_frames)
        return load_data(path, img_shape=(10, H, W), val_frac=0.25)

    with pytest.raises(DataError, match=r"train has 20 frames but history 10 .* at least \d+ frames") as e:
        load(20)
    needed = int(str(e.value).split("needs at least ")[1].split()[0])
    d = load(needed)
    assert len(d.train) == 1 and len(d.val) >= 1
    with pytest.raises(DataError, match=f"needs at least {needed} frames"):
        load(needed - 1)


def test_val_size_holds_out_that_many_samples_at_the_end(tmp_path: Path) -> None:
    """val_size: the original's 10,000 validation samples (5c2af72) as a count: the same stretch at the end, after
    the same gap; the shortest recording it fits is named when it does not."""
    h = 10
    path = write_recording(tmp_path / "r.h5", train_frames=400)
    d = load_data(path, img_shape=(h, H, W), val_size=123)
    train, val = d.train.starts.tolist(), d.val.starts.tolist()
    assert len(val) == 123 and val == list(range(400 - h - 123, 400 - h))
    assert train == list(range(len(train))) and train[-1] + h < val[0] and len(train) + h + 123 == 400 - h
    assert load_data(path, img_shape=(h, H, W), val_frac=0.25, val_size=0).val.starts.numel() == round(0.25 * 390)
    with pytest.raises(DataError, match=r"with val_size 380 needs at least 401 frames.*lower history/val_size"):
        load_data(path, img_shape=(h, H, W), val_size=380)
    assert len(load_data(path, img_shape=(h, H, W), val_size=379).train) == 1
    with pytest.raises(ConfigError, match="val_size must be a whole number"):
        load_data(path, img_shape=(h, H, W), val_size=-1)


def test_batches_shuffle_between_batches_only(rec: Path) -> None:
    h = 7
    d = load_data(rec, img_shape=(h, H, W))
    with h5py.File(rec) as f:
        stim = f["train/stimulus"][()]
    plain = list(d.train.batches(50))
    assert [len(y) for _, y in plain] == [50, 50, 50, len(d.train) - 150]  # last partial batch kept
    shuffled = list(d.train.batches(50, shuffle=True, generator=torch.Generator().manual_seed(1)))
    starts = []
    for x, y in shuffled:
        for k in range(len(y)):
            s = int(y[k, 0]) - h  # rates encode the bin, so the target says which window this is
            assert torch.equal(x[k], window(stim, s, h, d.stim_mean, d.stim_std))
            starts.append(s)
    assert sorted(starts) == d.train.starts.tolist()  # every sample exactly once
    assert starts != d.train.starts.tolist()  # ... in another order
    again = [y for _, y in d.train.batches(50, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert all(torch.equal(a, b) for a, b in zip(again, (y for _, y in shuffled), strict=True))
    with pytest.raises(ConfigError, match="batch_size"):
        next(d.train.batches(0))


def test_normalisation_uses_training_frames_only(tmp_path: Path) -> None:
    h, n_frames = 5, 200
    path = write_recording(tmp_path / "r.h5", train_frames=n_frames)
    with h5py.File(path, "a") as f:
        stim = f["train/stimulus"]
        frames = np.random.default_rng(3).integers(0, 50, size=stim.shape).astype(np.uint8)
        frames[156:] += 200  # the validation stretch (samples 156.. with val_frac 0.2) is much brighter
        stim[...] = frames
    d = load_data(path, img_shape=(h, H, W), val_frac=0.2)
    used = frames[: len(d.train) + h - 1].astype(np.float64)  # inputs of all training samples
    assert d.stim_mean == pytest.approx(used.mean(), rel=1e-12)
    assert d.stim_std == pytest.approx(used.std(), rel=1e-12)
    assert d.val.starts[0] == 156
    assert d.stim_mean < 30 < frames.mean()
    assert d.norm_stats() == {"mean": d.stim_mean, "std": d.stim_std}
    assert d.test.mean == d.val.mean == d.stim_mean


def test_cell_selection_picks_rows(rec: Path) -> None:
    h = 4
    d = load_data(rec, cells=[2, 0], img_shape=(h, H, W))
    assert d.n_cells == 2 and d.cell_ids == [2, 0]
    _, y = d.train.get(torch.tensor([3]))
    assert y[0].tolist() == [2000.0 + 3 + h, 0.0 + 3 + h]
    with h5py.File(rec) as f:
        rep2, rep0 = f["test/repeats/cell03"][()], f["test/repeats/cell01"][()]
    assert d.test_repeats.shape == (4, 60 - h, 2)
    np.testing.assert_array_equal(d.test_repeats[:, :, 0], rep2[:, h:])
    np.testing.assert_array_equal(d.test_repeats[:, :, 1], rep0[:, h:])


def test_repeats_missing_for_a_cell_gives_none(rec: Path) -> None:
    with h5py.File(rec, "a") as f:
        del f["test/repeats/cell02"]
    assert load_data(rec, img_shape=(4, H, W)).test_repeats is None
    assert load_data(rec, cells=[0, 2], img_shape=(4, H, W)).test_repeats.shape == (4, 56, 2)


def test_float_stimulus_keeps_dtype_and_chunked_stats_are_exact(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording, "CHUNK_VALUES", 7 * H * W)  # many uneven chunks
    path = write_recording(tmp_path / "f.h5", dtype=np.float32)
    with h5py.File(path, "a") as f:
        f["train/stimulus"][...] = f["train/stimulus"][()] * 1e-3 + 1e4  # large offset, small spread
        frames = f["train/stimulus"][()]
    d = load_data(path, img_shape=(5, H, W))
    assert d.train.stimulus.dtype == torch.float32
    used = frames[: len(d.train) + 4].astype(np.float64)
    assert d.stim_mean == pytest.approx(used.mean(), rel=1e-12)
    assert d.stim_std == pytest.approx(used.std(), rel=1e-9)


def test_uint16_stimulus_is_widened_for_torch(tmp_path: Path) -> None:
    d = load_data(write_recording(tmp_path / "u.h5", dtype=np.uint16), img_shape=(5, H, W))
    assert d.train.stimulus.dtype == torch.int32
    assert d.train.get(torch.tensor([0]))[0].dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------
# malformed recordings


def replace(key: str, value) -> callable:
    def edit(f: h5py.File) -> None:
        del f[key]
        if value is not None:
            f[key] = value
    return edit


def set_value(key: str, index: tuple, value: float) -> callable:
    def edit(f: h5py.File) -> None:
        f[key][index] = value
    return edit


def float_stimulus_with_nan(f: h5py.File) -> None:
    stim = f["test/stimulus"][()].astype(np.float32)
    stim[10, 1, 1] = np.nan
    del f["test/stimulus"]
    f["test/stimulus"] = stim


BAD = {
    "missing group": (replace("test", None), r"h5 group 'test' is missing"),
    "missing stimulus": (replace("train/stimulus", None), r"h5 dataset 'train/stimulus' is missing"),
    "missing rates": (replace("test/response/firing_rate_10ms", None),
                      r"'test/response/firing_rate_10ms' is missing"),
    "missing time": (replace("train/time", None), r"'train/time' is missing"),
    "group instead of dataset": (lambda f: (f.__delitem__("train/time"), f.create_group("train/time")),
                                 r"'train/time' is not a dataset"),
    "stimulus 2-D": (replace("train/stimulus", np.zeros((200, 30), np.uint8)),
                     r"'train/stimulus' .* must be 3-D"),
    "stimulus text": (replace("train/stimulus", np.array([[["a"]]], dtype="S1")), r"dtype .*real numbers"),
    "rates 1-D": (replace("train/response/firing_rate_10ms", np.ones(200)), r"shape \(n_cells, T\)"),
    "rates transposed": (replace("train/response/firing_rate_10ms", np.ones((200, 3))), r"looks transposed"),
    "rates length": (replace("test/response/firing_rate_10ms", np.ones((3, 59))),
                     r"'test/stimulus' has 60 frames but 'test/response/firing_rate_10ms' has 59 time bins"),
    "time length": (replace("train/time", np.arange(199) * 0.01),
                    r"200 frames but 'train/time' has shape \(199,\)"),
    "binned shape": (replace("train/response/binned", np.ones((3, 10))),
                     r"'train/response/binned' has shape"),
    "nan rate": (set_value("train/response/firing_rate_10ms", (1, 17), np.nan),
                 r"firing_rate_10ms' has 1 NaN/inf values \(first at row 1, bin 17\)"),
    "inf rate": (set_value("test/response/firing_rate_10ms", (0, 3), np.inf), r"'test/.*NaN/inf"),
    "negative rate": (set_value("train/response/firing_rate_10ms", (2, 5), -1.0), r"negative firing rates"),
    "nan stimulus": (float_stimulus_with_nan, r"'test/stimulus' has NaN/inf values \(first in frame 10\)"),
    "cells differ": (lambda f: [replace(f"test/response/{k}", np.ones((2, 60)))(f)
                                for k in ("firing_rate_10ms", "binned")],
                     r"train has 3 cells but test has 2"),
    "frames differ": (replace("test/stimulus", np.zeros((60, 4, 4), np.uint8)),
                      r"train frames are 6x5 but test frames are 4x4"),
    "test too short": (lambda f: [replace(f"test/{k}", v)(f) for k, v in (
        ("stimulus", np.zeros((8, H, W), np.uint8)), ("time", np.arange(8) * 0.01),
        ("response/firing_rate_10ms", np.ones((3, 8))), ("response/binned", np.ones((3, 8))))],
        r"test has 8 frames, shorter than one window \(history 10 \+ 1 target = 11 frames\)"),
    "constant stimulus": (set_value("train/stimulus", (slice(None),), 7), r"constant"),
    "repeats shape": (replace("test/repeats/cell02", np.ones((4, 50))), r"'test/repeats/cell02' has shape"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_recording_is_a_data_error(rec: Path, case: str) -> None:
    edit, message = BAD[case]
    with h5py.File(rec, "a") as f:
        edit(f)
    for run in (lambda: load_data(rec, img_shape=(10, H, W)), lambda: check_recording(rec, history=10)):
        with pytest.raises(DataError, match=message) as err:
            run()
        assert str(rec) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_non_h5_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.h5: recording not found"):
        load_data(tmp_path / "nope.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataError, match=r"notes\.h5: not a readable HDF5 file"):
        check_recording(text)
    with pytest.raises(DataError, match="is a folder"):
        check_recording(tmp_path)


def test_img_shape_and_cells_errors(rec: Path) -> None:
    with pytest.raises(DataError, match=r"frames are 6x5 but img_shape is \[40, 20, 20\]; set img_shape to "
                                        r"\[40, 6, 5\]"):
        load_data(rec, img_shape=[40, 20, 20])
    with pytest.raises(DataError, match=r"cells \[3\] \(from the config\) out of range; .* valid indices are 0\.\.2"):
        load_data(rec, cells=[0, 3], img_shape=(4, H, W))
    with pytest.raises(DataError, match=r"cells \[-1\] \(from the config\) out of range"):
        load_data(rec, cells=[-1], img_shape=(4, H, W))
    with pytest.raises(DataError, match=r"cells \[1\] \(from the config\) listed more than once"):
        load_data(rec, cells=[1, 2, 1], img_shape=(4, H, W))
    with pytest.raises(ConfigError, match="cells must be"):
        load_data(rec, cells="first", img_shape=(4, H, W))
    with pytest.raises(ConfigError, match="img_shape"):
        load_data(rec, img_shape=(4, H))
    with pytest.raises(ConfigError, match="val_frac"):
        load_data(rec, img_shape=(4, H, W), val_frac=1.0)


# ------------------------------------------------------------------------------------------------------------
# check_recording


def test_check_summary_values(tmp_path: Path) -> None:
    path = tmp_path / "tiny.h5"
    stim = np.zeros((30, 2, 2), np.uint8)
    stim[::2] = 10  # half the frames 10, half 0: mean 5, std 5
    stim[1, 0, 0] = 20  # one pixel at 20: shifts mean by 20/120
    with h5py.File(path, "w") as f:
        f["train/stimulus"] = stim
        f["train/time"] = np.arange(30) * 0.02  # 20 ms bins: duration from the time stamps
        f["train/response/firing_rate_10ms"] = np.stack([np.full(30, 4.0), np.arange(30.0)])
        f["test/stimulus"] = stim[:12]
        f["test/time"] = np.arange(12) * 0.02
        f["test/response/firing_rate_10ms"] = np.ones((2, 12))
        f["test/repeats/cell01"] = np.ones((6, 12))
        f["test/repeats/cell02"] = np.ones((6, 12))
    s = check_recording(path, history=3, val_frac=0.25)
    values = stim.astype(np.float64)
    assert s["path"] == str(path) and s["n_cells"] == 2 and s["frame_size"] == (2, 2)
    assert s["stimulus_dtype"] == "uint8"
    assert (s["train_frames"], s["test_frames"]) == (30, 12)
    assert s["train_duration_s"] == pytest.approx(0.6) and s["test_duration_s"] == pytest.approx(0.24)
    assert s["stimulus_mean"] == pytest.approx(values.mean())
    assert s["stimulus_std"] == pytest.approx(values.std())
    assert (s["stimulus_min"], s["stimulus_max"]) == (0, 20)
    assert s["mean_rate_hz"] == pytest.approx([4.0, 14.5])
    assert s["n_test_repeats"] == 6
    # 27 samples: val = round(0.25 * 27) = 7, gap 3, train 17; test 12 - 3 = 9
    assert (s["train_samples"], s["gap_samples"], s["val_samples"], s["test_samples"]) == (17, 3, 7, 9)
    text = format_summary(s)
    assert "17" in text and "6 test repeats" in text and "2x2 uint8" in text and "0: 4.00, 1: 14.50" in text


def test_check_agrees_with_load(rec: Path) -> None:
    s = check_recording(rec, history=7, val_frac=0.1)
    d = load_data(rec, img_shape=(7, H, W), val_frac=0.1)
    counts = (s["train_samples"], s["val_samples"], s["test_samples"])
    assert counts == (len(d.train), len(d.val), len(d.test))


def test_cli_check(rec: Path) -> None:
    result = CliRunner().invoke(data, ["check", str(rec), "--history", "7"])
    assert result.exit_code == 0, result.output
    assert "history 7" in result.output and "cells      3" in result.output
    bad = CliRunner().invoke(data, ["check", str(rec.parent / "missing.h5")])
    assert bad.exit_code != 0 and isinstance(bad.exception, DataError)
    usage = CliRunner().invoke(data, ["check", str(rec), "--val-frac", "1.5"])
    assert usage.exit_code == 2
