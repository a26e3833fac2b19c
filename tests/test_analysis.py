"""The analyses on models whose answers are known: STAs, their split, the phenomena's statistics, the interneuron
match and its alignment, attribution, the files and their errors (trainer/analysis)."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import SMALL
from trainer import analysis, config
from trainer.analysis import attribution, interneurons, phenomena, receptive_fields, stimuli
from trainer.analysis.run import Model, analyze, control_model
from trainer.analysis.units import hidden_layers, probe
from trainer.errors import ConfigError, DataError
from trainer.models import build_model
from trainer.training.trainer import as_rates


def small(model_type="BNCNN", **extra):
    cfg = config.resolve({**SMALL, "model_type": model_type, "seed": 3, **extra})
    torch.manual_seed(cfg["seed"])
    return cfg, build_model(cfg, 2).eval()


# ---- receptive fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["BNCNN", "LN", "VaryModel", "LinearStackedBNCNN"])
def test_sta_is_the_mean_input_gradient_for_cells_and_central_units(model_type):
    """The STA computed at the first layer's output and mapped back through its weights equals the mean over the
    noise windows of the gradient with respect to the window itself (float64: exact up to rounding)."""
    cfg, model = small(model_type)
    model = model.double()
    fields = receptive_fields.compute(model, cfg, seed=5, n_frames=140, batch_size=48, hold=2)
    noise = np.repeat(np.random.default_rng(5).standard_normal((70, *cfg["img_shape"][1:])), 2, axis=0)
    x = torch.as_tensor(stimuli.windows(noise, cfg["img_shape"][0]), dtype=torch.float64).requires_grad_(True)
    layers = hidden_layers(model)
    with probe([layer.module for layer in layers]) as outs:
        out = as_rates(cfg, model(x))
        (g,) = torch.autograd.grad(out[:, 1].sum(), x, retain_graph=True)
        np.testing.assert_allclose(fields.cells[1], g.mean(0).numpy(), atol=1e-12)
        for layer, act in zip(layers, outs, strict=True):
            c, h, w = layer.shape
            (g,) = torch.autograd.grad(act[:, c - 1, h // 2, w // 2].sum(), x, retain_graph=True)
            np.testing.assert_allclose(fields.layers[layer.name][c - 1], g.mean(0).numpy(), atol=1e-12)
    assert set(fields.layers) == {layer.name for layer in layers}  # LN: none


@pytest.mark.parametrize("polarity", [1, -1])
def test_decompose_signs_centre_and_label(polarity):
    rows, cols = np.mgrid[:12, :15]
    spatial = np.exp(-((rows - 4.3) ** 2 + (cols - 9.0) ** 2) / 3.0)
    t = np.arange(10)
    temporal = np.exp(-(t - 7.0) ** 2 / 2.0) - 0.4 * np.exp(-(t - 3.0) ** 2 / 3.0)  # biphasic, main lobe late
    sta = polarity * temporal[:, None, None] * spatial[None]
    s, tt, pol, center, sep = receptive_fields.decompose(sta)
    assert pol == polarity
    assert tt[np.argmax(np.abs(tt))] > 0  # the temporal profile's largest lobe is positive
    assert np.sign(s[4, 9]) == polarity  # so the map carries the sign: an ON centre is positive
    np.testing.assert_allclose(center, [4.3, 9.0], atol=0.35)
    assert sep == pytest.approx(1.0)
    np.testing.assert_allclose(np.einsum("t,hw->thw", tt, s), sta, atol=1e-12)


def test_truth_scores_against_a_synthetic_recording(tmp_path):
    """The ground truth is each true cell's STA to the analyses' noise; the model's maps are scored against its
    rank-1 split, and a model whose maps are the truth's with the sign flipped has every label wrong."""
    from trainer.data.synth import write_synthetic

    rec = write_synthetic(tmp_path, n_cells=2, size=12, train_frames=300, test_frames=120, history=10)
    with h5py.File(rec) as f:
        true = f["ground_truth/sta"][()]
        filters = f["ground_truth/temporal_filters"][()]
    assert true.shape == (2, 10, 12, 12)
    spatial, temporal, *_ = receptive_fields.decompose(true[0])
    assert receptive_fields.pearson(temporal[1:], filters[0, :9][::-1]) == pytest.approx(1.0)  # lags 9..1
    noisy = true + 0.05 * np.abs(true).max() * np.random.default_rng(0).standard_normal(true.shape)
    truth = receptive_fields.truth_scores(receptive_fields.Fields(noisy, {}), rec, [0, 1])
    assert all(0.9 < c["spatial_r"] < 1 for c in truth["cells"])
    assert all(c["label_right"] for c in truth["cells"])
    flipped = receptive_fields.truth_scores(receptive_fields.Fields(-true, {}), rec, [0, 1])
    assert [c["spatial_r"] for c in flipped["cells"]] == pytest.approx([-1.0, -1.0])
    assert not any(c["label_right"] for c in flipped["cells"])
    assert receptive_fields.truth_scores(receptive_fields.Fields(true, {}), rec, [1, 0])["cells"][0]["spatial_r"] < 0.5
    assert receptive_fields.truth_scores(receptive_fields.Fields(true, {}), tmp_path / "none.h5", [0, 1]) is None


# ---- phenomena ------------------------------------------------------------------------------------------------


class FullField(nn.Module):
    """rate = softplus(gain * (mean luminance of the last `lag` frames - of the `lag` before)): a transient cell,
    ON for gain > 0, OFF for gain < 0."""

    def __init__(self, gains, history, lag=3):
        super().__init__()
        self.gains = torch.tensor(gains, dtype=torch.float32)
        self.lag = lag
        self.w = nn.Parameter(torch.zeros(1))
        self.img_shape = (history, 12, 12)

    def forward(self, x):
        drive = x[:, -self.lag:].mean(dim=(1, 2, 3)) - x[:, -2 * self.lag:-self.lag].mean(dim=(1, 2, 3))
        return nn.functional.softplus(2.0 * drive[:, None] * self.gains + 1.0) + self.w


def predictor(model, cfg):
    from trainer.analysis.units import rates

    return lambda frames: rates(model, cfg, stimuli.windows(frames, cfg["img_shape"][0]))


def test_step_response_tells_on_from_off_cells():
    cfg = config.resolve({**SMALL, "img_shape": [10, 12, 12]})
    r = phenomena.step_response(predictor(FullField([1.0, -1.0], 10), cfg), (12, 12), 10, 0)
    on, off = r["per_cell"]["on_off_index"]
    assert on > 0.9 and off < -0.9  # the ON cell fires at the dark step's end, the OFF cell at its start
    assert all(0 <= t <= 1 for t in r["per_cell"]["transience"])


def test_a_silent_cell_is_null_never_nan_and_small_frames_skip_oms():
    cfg = config.resolve({**SMALL, "img_shape": [10, 12, 12]})

    class Silent(FullField):
        def forward(self, x):
            out = super().forward(x)
            return torch.stack([out[:, 0], out[:, 1] * 0], dim=1)

    results = phenomena.run(predictor(Silent([1.0, -1.0], 10), cfg), (12, 12), 10, 0)
    assert "skipped" in results["oms"] and "12x12" in results["oms"]["skipped"]
    text = json.dumps(phenomena.as_json(results, {}), default=lambda v: v.tolist())
    assert "NaN" not in text and "Infinity" not in text
    assert results["contrast_adaptation"]["per_cell"]["index"][1] is None  # 0/0 for the silent cell
    assert results["step_response"]["per_cell"]["on_off_index"][1] is None
    assert all(np.isfinite(v) for v in phenomena.metrics(results).values())


def test_oms_ratio_of_a_cell_that_only_sees_its_centre():
    """A cell driven by the change of its centre's pixels only: global motion moves the centre as much as
    differential motion does, so the ratio is near 1; a cell also inhibited by background motion prefers the
    differential movie (ratio < 1)."""
    cfg = config.resolve({**SMALL, "img_shape": [10, 24, 24]})

    class Motion(nn.Module):
        def __init__(self, surround):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.surround = surround
            inside = torch.as_tensor(stimuli.disk((12, 12), 8, (24, 24)))
            self.register_buffer("inside", inside)

        def forward(self, x):
            change = (x[:, -1] - x[:, -2]).abs()
            centre = (change * self.inside).sum(dim=(1, 2)) / self.inside.sum()
            back = (change * ~self.inside).sum(dim=(1, 2)) / (~self.inside).sum()
            return nn.functional.relu(1 + 4 * centre - self.surround * 4 * back)[:, None] + self.w

    plain = phenomena.oms(predictor(Motion(0.0), cfg), (24, 24), 10, 0)["statistics"]["ratio"]
    inhibited = phenomena.oms(predictor(Motion(1.0), cfg), (24, 24), 10, 0)["statistics"]["ratio"]
    assert 0.85 < plain < 1.15
    assert inhibited < plain - 0.1


def test_the_battery_runs_at_any_history_and_size():
    for shape in ([6, 12, 12], [40, 20, 20], [15, 24, 30]):
        cfg, model = small(img_shape=shape, ksizes=[3, 3, 3])
        results = phenomena.run(predictor(model, cfg), tuple(shape[1:]), shape[0], 0)
        assert set(results) == set(analysis.PHENOMENA)
        ran = [n for n, r in results.items() if "skipped" not in r]
        assert len(ran) >= 7 and all(results[n]["statistics"] for n in ran)


# ---- interneurons ----------------------------------------------------------------------------------------------


def intr_file(path, stimulus, potentials, group="boxes"):
    with h5py.File(path, "w") as f:
        f[f"{group}/stimuli"] = stimulus
        f[f"{group}/detrended_membrane_potential"] = potentials
    return path


def test_interneuron_matched_to_the_unit_that_made_it_at_its_position(tmp_path):
    """Potentials that are a hidden unit's responses (one shifted by a frame) are matched to that unit with r = 1;
    the one-frame shift shows that each window is paired with the potential at the frame after it."""
    cfg, model = small()
    h = cfg["img_shape"][0]
    boxes = (np.random.default_rng(1).random((400, 10, 10)) > 0.5).astype(np.float32)  # smaller than 12x12
    prepared = interneurons.pad(2 * boxes - 1, (12, 12))
    layer = hidden_layers(model)[1]
    with probe([layer.module]) as outs, torch.no_grad():
        model(torch.as_tensor(stimuli.windows(prepared, h)))
    unit = outs[0][:, 2, 1, 3].double().numpy()  # (400 - h,)
    pots = np.zeros((2, 400))
    pots[0, h:] = unit
    pots[1, h - 1:-1] = unit  # one frame early: no longer the best at r = 1
    path = intr_file(tmp_path / "bipolars_test.h5", boxes, pots)
    rec = interneurons.read(path, (12, 12), h)
    rows = interneurons.best_units(interneurons.correlations(model, rec, h), rec, hidden_layers(model))
    assert {k: rows[0][k] for k in ("layer", "channel", "row", "col")} == \
        {"layer": layer.name, "channel": 2, "row": 1, "col": 3}
    assert rows[0]["r"] == pytest.approx(1.0, abs=1e-9)
    assert rows[1]["r"] < 0.999


def test_control_is_the_runs_initial_weights():
    cfg, model = small()
    control = control_model(cfg, 2, torch.device("cpu"), torch.float32)
    for a, b in zip(model.state_dict().values(), control.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    before = torch.random.get_rng_state()
    control_model(cfg, 2, torch.device("cpu"), torch.float32)
    assert torch.equal(before, torch.random.get_rng_state())  # the global generator is left as it was


def test_interneuron_files_of_another_layout_are_one_clear_error(tmp_path):
    good = np.zeros((50, 12, 12), np.float32), np.zeros((2, 50))
    cases = {
        "flashes group only": (intr_file(tmp_path / "a.h5", *good, group="flashes"), "no group 'boxes'"),
        "no potentials": (tmp_path / "b.h5", "boxes/detrended_membrane_potential is missing"),
        "lengths differ": (intr_file(tmp_path / "c.h5", good[0], np.zeros((2, 49))), "with the same T"),
        "too few frames": (intr_file(tmp_path / "d.h5", good[0][:10], good[1][:, :10]), "history"),
        "larger than the model": (intr_file(tmp_path / "e.h5", np.zeros((50, 13, 12)), good[1]), "larger"),
        "not h5": (tmp_path / "f.h5", "not a readable h5"),
    }
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f["boxes/stimuli"] = good[0]
    (tmp_path / "f.h5").write_text("text")
    for what, (path, message) in cases.items():
        with pytest.raises(DataError, match=message) as err:
            interneurons.read(path, (12, 12), 10)
        assert "\n" not in str(err.value), what
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .h5"):
        interneurons.find_files([tmp_path / "empty"])
    with pytest.raises(DataError, match="not found"):
        interneurons.find_files([tmp_path / "missing"])


# ---- attribution -----------------------------------------------------------------------------------------------


def test_attribution_fractions_and_a_silenced_channel():
    cfg, model = small()
    with torch.no_grad():  # channel 1 of conv2 carries nothing to the outputs
        model.readout.weight.view(2, 4, -1)[:, 1] = 0
    x = np.random.default_rng(0).standard_normal((60, *cfg["img_shape"])).astype(np.float32)
    layers = attribution.compute(model, x, alpha_steps=5, batch_size=25)
    for layer in layers.values():
        for f in layer["fraction"]:
            assert sum(f) == pytest.approx(1.0)
    assert max(f[1] for f in layers["conv2"]["fraction"]) < 1e-6
    assert all(1 not in top for top in layers["conv2"]["top"])
    coarse = attribution.compute(model, x, alpha_steps=2)["conv1"]["completeness"]
    fine = attribution.compute(model, x, alpha_steps=20)["conv1"]["completeness"]
    assert fine < coarse  # the path integral converges to F(x) - F(0)


def test_channels_for():
    assert attribution.channels_for([0.5, 0.3, 0.15, 0.05]) == 3
    assert attribution.channels_for([1.0, 0, 0]) == 1


# ---- selection, the run's files -------------------------------------------------------------------------------


def test_analysis_setting_and_only():
    assert analysis.selection("all") == list(analysis.PARTS)
    assert analysis.selection("none") == []
    assert analysis.selection(["oms", "receptive_fields"]) == ["receptive_fields", "oms"]
    assert analysis.phenomena_of(["oms"]) == ("oms",)
    assert analysis.phenomena_of(["phenomena", "oms"]) == analysis.PHENOMENA
    with pytest.raises(ConfigError, match="did you mean 'osr'"):
        analysis.parse_only("receptive_fields,osrr")
    with pytest.raises(ConfigError, match="analysis"):
        config.parse_hyperparams({"analysis": "some"}, "hp.json")
    with pytest.raises(ConfigError, match="cannot be searched"):
        config.parse_hyperranges({"analysis": ["all", "none"]}, "hr.json")


def test_analyze_writes_the_contract_and_skips_what_a_model_cannot_do(tmp_path):
    cfg, model = small()
    boxes = (np.random.default_rng(1).random((120, 12, 12)) > 0.5).astype(np.float32)
    files = tmp_path / "intr"
    files.mkdir()
    intr_file(files / "bipolars_x.h5", boxes, np.random.default_rng(2).standard_normal((3, 120)))
    out = tmp_path / "out"
    report = analyze(Model(model, cfg, [4, 7], 0.0, 1.0), out, analysis.selection("all"), interneurons=[files])
    with h5py.File(out / "receptive_fields.h5") as f:
        assert f["cells/sta"].shape == (2, *cfg["img_shape"])
        assert f["layers/conv1/sta"].shape == (4, *cfg["img_shape"])
        assert list(f["cells/cell_ids"][()]) == [4, 7]
        assert {"spatial", "temporal", "center", "polarity", "label"} <= set(f["cells"])
    with (out / "interneurons.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == interneurons.COLUMNS and len(rows) == 3 and rows[0]["file"] == "bipolars_x.h5"
    attr = json.loads((out / "attribution.json").read_text())
    assert set(attr["layers"]) == {"conv1", "conv2"} and "white noise" in attr["stimulus"]
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["ran"] == list(analysis.PARTS) and summary["skipped"] == {"oms": report.skipped["oms"]}
    assert {"analysis_intr_r_mean", "analysis_intr_control_r_mean", "analysis_rf_on_fraction",
            "analysis_attr_conv1_top_fraction", "analysis_osr_ratio"} <= set(report.metrics)
    assert all(k.startswith("analysis_") for k in report.metrics)
    assert {folder for folder, _ in report.files} == {"analysis", "plots/analysis"}

    ln_cfg, ln = small("LN")
    report = analyze(Model(ln, ln_cfg, [0, 1], 0.0, 1.0), tmp_path / "ln", analysis.selection("all"),
                     interneurons=[files])
    assert set(report.skipped) >= {"interneurons", "attribution"}
    assert "no hidden layers" in report.skipped["interneurons"]
    with pytest.raises(ConfigError, match="no hidden layers"):
        analyze(Model(ln, ln_cfg, [0, 1], 0.0, 1.0), tmp_path / "ln2", ["interneurons"], interneurons=[files],
                required=frozenset({"interneurons"}))


def _cell_gradient_factors(cell, z, norm, i):
    """Per sample, d rate / d drive_k of a true cell (its formula written out) for normalised drives z (n, n_k)."""
    signs, weights = np.array(cell.subunit_signs, float), np.array(cell.subunit_weights)
    if cell.kind == "LN":
        g, inner = signs[0] * z[:, 0], np.ones_like(z)
    else:
        m, s = norm["g"][i]
        g = ((weights * np.maximum(signs * z - cell.threshold, 0)).sum(axis=1) - m) / s
        inner = weights * (signs * z - cell.threshold > 0) / s
    return cell.scale * cell.gain / (1 + np.exp(-cell.gain * (g - cell.offset)))[:, None] * inner * signs, g


def test_the_synthetic_cells_true_sta_is_their_mean_gradient():
    """ground_truth/sta (trainer/data/synth.py: _gradient_sta) against brute force. Unheld noise: by Stein's
    identity the rate-weighted average of Gaussian white noise is the mean gradient, so a reverse correlation of each
    true cell's rate must give its map. Noise held 3 bins: drives made by filtering an actual held noise movie give
    the same mean gradient as the phase mixture of _gradient_sta."""
    import trainer.data.synth as sy

    rng = np.random.default_rng(0)
    size, history = 12, 20
    made = [sy._make_cell(i, int(s), size, history) for i, s in enumerate(rng.integers(0, 2**31, size=4))]
    cells, fields, temporal = [m[0] for m in made], [m[1] for m in made], [m[2] for m in made]
    _, norm = sy._rates(cells, fields, temporal, sy._checkerboard(np.random.default_rng(1), 20000, size))
    unheld = sy._gradient_sta(cells, fields, temporal, norm, size, history, np.random.default_rng(2), 1)
    held = sy._gradient_sta(cells, fields, temporal, norm, size, history, np.random.default_rng(2), 3)
    u = np.random.default_rng(3).standard_normal((200000, size * size))  # filtered unheld noise: N(0, 1) per pixel
    movie = np.repeat(np.random.default_rng(4).standard_normal((40000, size * size)), 3, axis=0)
    first = 0
    for i, (cell, f) in enumerate(zip(cells, fields, strict=True)):
        rows = slice(first, first + f.shape[0])
        first += f.shape[0]
        mu, sd = norm["mu"][rows, 0], norm["sd"][rows, 0]
        _, g = _cell_gradient_factors(cell, (u @ f.T - mu) / sd, norm, i)
        rate = cell.scale * np.logaddexp(0, cell.gain * (g - cell.offset))
        revcor = ((rate - rate.mean())[:, None] * u).mean(axis=0)
        spatial, temporal_profile, *_ = receptive_fields.decompose(unheld[i])
        assert receptive_fields.pearson(spatial, revcor) > 0.99, (i, cell.kind)
        assert receptive_fields.pearson(temporal_profile[-len(temporal[i]):], temporal[i][::-1]) > 0.999
        causal = np.concatenate([[0.0], temporal[i]])
        drives = np.stack([np.convolve(movie @ fk, causal)[:len(movie)] for fk in f], axis=1)[100:]
        factors, _ = _cell_gradient_factors(cell, (drives - mu) / sd, norm, i)
        expected = (factors.mean(axis=0) / sd) @ f
        assert receptive_fields.pearson(receptive_fields.decompose(held[i])[0], expected) > 0.999, (i, cell.kind)
        assert receptive_fields.pearson(held[i], unheld[i]) < 1 - 1e-6 or cell.kind == "LN"
