"""`retina-trainer import`: checkpoints of the original torchdeepretina become ours and compute the same rates.

The original's models are re-created here at small shapes, module for module (torchdeepretina/models.py:
BNCNN, LinearStackedBNCNN; custom_modules.py: Flatten, Reshape, GaussianNoise with its `sigma` parameter,
Exponential, AbsBatchNorm with scale/shift/running stats as parameters, LinearStackedConv2d's `convs`), given
random weights and random running statistics, and saved as its training loop saved them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from trainer.cli import main
from trainer.errors import UserError
from trainer.importer import import_checkpoint
from trainer.inference import load_checkpoint
from trainer.training import checkpoint

IMG = (8, 16, 16)
CHANS = [3, 4]
KSIZES = (5, 3)
DATASET = "15-11-21a"  # the original's "all" for this recording is rows 6, 10, 12, 13 (datas.py: CELLS)
CELLS = [6, 10, 12, 13]
N_UNITS = len(CELLS)
MEAN, STD = 41.5, 17.25


# ---- a re-creation of the original's modules --------------------------------------------------------------------


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1)


class Reshape(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.view(*self.shape)


class GaussianNoise(nn.Module):
    def __init__(self, std=0.05):
        super().__init__()
        self.std = std
        self.sigma = nn.Parameter(torch.ones(1) * std, requires_grad=False)

    def forward(self, x):
        if not self.training or self.std == 0:
            return x
        return x + self.sigma * torch.randn_like(x)


class Exponential(nn.Module):
    def forward(self, x):
        return x if self.training else torch.exp(x)


class AbsBatchNorm(nn.Module):
    """AbsBatchNorm1d / AbsBatchNorm2d: running statistics are parameters, the scale is used as |scale|."""

    def __init__(self, n, eps=1e-3, momentum=0.01):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.running_mean = nn.Parameter(torch.zeros(n))
        self.running_var = nn.Parameter(torch.ones(n))
        self.scale = nn.Parameter(torch.ones(n))
        self.shift = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean.data, self.running_var.data, weight=self.scale.abs(),
                            bias=self.shift, eps=self.eps, momentum=self.momentum, training=self.training)


class StackedConv(nn.Module):
    """LinearStackedConv2d: (k-1)/2 linear 3x3 convs in `convs`, only the last with a bias, dropout between."""

    def __init__(self, cin, cout, k, bias=True, drop_p=0.0):
        super().__init__()
        n = (k - 1) // 2
        convs = []
        for i in range(n):
            convs.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, bias=bias and i == n - 1))
            if drop_p > 0 and i < n - 1:
                convs.append(nn.Dropout(drop_p))
        self.convs = nn.Sequential(*convs)

    def forward(self, x):
        return self.convs(x)


class Original(nn.Module):
    """The original's TDRModel: everything in `self.sequential`."""

    def __init__(self, modules):
        super().__init__()
        self.sequential = nn.Sequential(*modules)

    def forward(self, x):
        return self.sequential(x)


def _maps(img=IMG, ksizes=KSIZES):
    h1 = img[1] - ksizes[0] + 1
    return h1, h1 - ksizes[1] + 1


def original_bncnn(bnorm_d=1, softplus=True, layout="new", gc_bias=False):
    """layout "new": BN, Reshape, noise, ReLU after both convs (507decb); "old": BN, noise, ReLU, Reshape after
    the first, and no Reshape (nor Flatten) before the linear layer after the second (00bb0ca)."""
    (c1, c2), (h1, h2) = CHANS, _maps()
    m = [nn.Conv2d(IMG[0], c1, KSIZES[0])]
    if bnorm_d == 2:
        m += [nn.BatchNorm2d(c1, eps=1e-3), GaussianNoise(), nn.ReLU()]
    elif layout == "new":
        m += [Flatten(), nn.BatchNorm1d(c1 * h1 * h1, eps=1e-3), Reshape((-1, c1, h1, h1)), GaussianNoise(),
              nn.ReLU()]
    else:
        m += [Flatten(), nn.BatchNorm1d(c1 * h1 * h1, eps=1e-3), GaussianNoise(), nn.ReLU(),
              Reshape((-1, c1, h1, h1))]
    m += [nn.Conv2d(c1, c2, KSIZES[1])]
    if bnorm_d == 2:
        m += [nn.BatchNorm2d(c2, eps=1e-3), GaussianNoise(), nn.ReLU(), Flatten()]
    elif layout == "new":
        m += [Flatten(), nn.BatchNorm1d(c2 * h2 * h2, eps=1e-3), Reshape((-1, c2, h2, h2)), GaussianNoise(),
              nn.ReLU(), Flatten()]
    else:
        m += [Flatten(), nn.BatchNorm1d(c2 * h2 * h2, eps=1e-3), GaussianNoise(), nn.ReLU()]
    m += [nn.Linear(c2 * h2 * h2, N_UNITS, bias=gc_bias), nn.BatchNorm1d(N_UNITS, eps=1e-3),
          nn.Softplus() if softplus else Exponential()]
    return Original(m)


def original_stacked(bnorm_d=1, drop_p=0.0, softplus=True):
    (c1, c2), (h1, h2) = CHANS, _maps()
    m = [StackedConv(IMG[0], c1, KSIZES[0], drop_p=drop_p)]
    m += ([Flatten(), AbsBatchNorm(c1 * h1 * h1), Reshape((-1, c1, h1, h1))] if bnorm_d == 1 else
          [AbsBatchNorm(c1)])
    m += [GaussianNoise(), nn.ReLU(), StackedConv(c1, c2, KSIZES[1], drop_p=drop_p)]
    m += ([Flatten(), AbsBatchNorm(c2 * h2 * h2), Reshape((-1, c2, h2, h2))] if bnorm_d == 1 else
          [AbsBatchNorm(c2)])
    m += [GaussianNoise(), nn.ReLU(), Flatten(), nn.Linear(c2 * h2 * h2, N_UNITS, bias=False),
          AbsBatchNorm(N_UNITS), nn.Softplus() if softplus else Exponential()]
    return Original(m)


@torch.no_grad()
def randomise(model, seed=0):
    """Random weights (batch-norm scales of both signs) and random running statistics, so eval mode matters."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("sigma"):
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
        elif name.endswith("num_batches_tracked"):
            t.fill_(1234)
        elif t.dim() > 1:
            t.copy_(torch.randn(t.shape, generator=g) / (t[0].numel() ** 0.5))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model


def hyps_for(model_type="BNCNN", **over):
    """Hyperparameters as the original kept them: tuples, its own keys, a clock seed, a torch.device."""
    hyps = {"exp_name": "test", "exp_num": 3, "model_type": model_type, "dataset": DATASET,
            "stim_type": "naturalscene", "cells": "all", "img_shape": IMG, "chans": CHANS, "ksizes": KSIZES,
            "bnorm_d": 1, "softplus": True, "gc_bias": None, "bias": True, "noise": 0.05, "bn_moment": 0.01,
            "drop_p": 0.0, "lr": 1e-3, "n_epochs": 50, "batch_size": 512, "lossfxn": "PoissonNLLLoss",
            "log_poisson": False, "save_folder": "/data/test_3_lr0.001", "seed": 1587412345.25, "shuffle": True,
            "datapath": "~/experiments/data", "prune": False, "n_cv_folds": 10, "starting_exp_num": 0,
            "save_every_epoch": False, "centers": [[4, 5], [6, 7], [8, 9], [10, 11]], "device": torch.device("cpu")}
    hyps.update(over)
    return hyps


def save_original(path, model, hyps, epoch=7, hyps_key="hyps", val_acc=0.51, fmt_zip=True, **extra):
    """Save a checkpoint as the original's training loop did (training.py, 507decb)."""
    hyps = {**hyps, "model_class": Original}  # hyps['model_class'] held the model class itself
    data = {"model_type": hyps.get("model_type", "BNCNN"), "model_state_dict": model.state_dict(),
            "optim_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            hyps_key: hyps, "loss": 0.25, "epoch": epoch, "val_loss": np.float64(0.3),
            "val_acc": np.float64(val_acc), "test_pearson": np.float64(0.42),
            "norm_stats": {"mean": np.float32(MEAN), "std": np.float32(STD)}, "zero_dict": {},
            "y_stats": {"mean": np.zeros(N_UNITS, np.float32), "std": np.ones(N_UNITS)}, "cur_lr": 1e-3, **extra}
    for k, v in hyps.items():
        data.setdefault(k, v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path, _use_new_zipfile_serialization=fmt_zip)
    return path


def assert_same_outputs(orig, ours, n=48, seed=1):
    """Eval-mode outputs of both models on the same random input, in float64."""
    orig, ours = copy.deepcopy(orig).double().eval(), copy.deepcopy(ours).double().eval()
    x = torch.randn(n, *IMG, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
    with torch.no_grad():
        want, got = orig(x), ours(x)
    assert want.shape == (n, N_UNITS)
    assert want.std(0).min() > 1e-5 and want.std(0).max() > 1e-2  # not a comparison of constants
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def do_import(tmp_path, orig, hyps, name="run", **kw):
    src = save_original(tmp_path / name / "test_epoch_7.pt", orig, hyps, **kw)
    done = import_checkpoint(src, out=tmp_path / "out" / name)
    return done, load_checkpoint(done.path)


# ---- equal outputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bnorm_d, softplus, layout", [(1, True, "new"), (1, False, "new"), (1, True, "old"),
                                                       (2, True, "new"), (2, False, "new")])
def test_bncnn_computes_as_the_original(tmp_path, bnorm_d, softplus, layout):
    orig = randomise(original_bncnn(bnorm_d=bnorm_d, softplus=softplus, layout=layout))
    done, loaded = do_import(tmp_path, orig, hyps_for(bnorm_d=bnorm_d, softplus=softplus))
    assert_same_outputs(orig, loaded.model)
    assert loaded.cell_ids == CELLS and loaded.epoch == 7
    assert (loaded.mean, loaded.std) == (MEAN, STD)
    assert loaded.config["bnorm_d"] == bnorm_d and loaded.config["softplus"] is softplus
    assert loaded.config["img_shape"] == list(IMG) and loaded.config["dataset"] == DATASET
    st = done.state
    assert st["format"] == checkpoint.FORMAT and st["n_cells"] == N_UNITS and st["history"] == []
    assert st["imported_from"]["epoch"] == 7 and st["imported_from"]["model_type"] == "BNCNN"
    assert st["imported_from"]["source"] == str((tmp_path / "run" / "test_epoch_7.pt").resolve())
    assert st["metrics"]["val_pearson"] == pytest.approx(0.51) and st["best_val_pearson"] == pytest.approx(0.51)
    # what was dropped, and why, is said
    notes = " ".join(done.notes)
    assert "test_import.Original" in notes  # hyps['model_class'], left out without importing it
    assert "save_folder" in notes and "centers" in notes and "seed" in notes and "device" in notes


@pytest.mark.parametrize("keys", [{"gc_bias": True}, {"linear_bias": True}, {"gc_bias": None, "linear_bias": True}])
def test_bncnn_with_a_ganglion_cell_bias(tmp_path, keys):
    """gc_bias, or its older name linear_bias (versions differ in which they read; the saved weights decide)."""
    orig = randomise(original_bncnn(gc_bias=True))
    hyps = {k: v for k, v in hyps_for().items() if k != "gc_bias"}
    done, loaded = do_import(tmp_path, orig, {**hyps, **keys})
    assert loaded.model.readout.bias is not None and loaded.config["gc_bias"] is True
    assert_same_outputs(orig, loaded.model)
    assert ("disagree" in " ".join(done.notes)) == (len(keys) == 2)


@pytest.mark.parametrize("bnorm_d, drop_p, softplus", [(1, 0.2, True), (2, 0.1, False), (1, 0.0, True)])
def test_linear_stacked_computes_as_the_original(tmp_path, bnorm_d, drop_p, softplus):
    orig = randomise(original_stacked(bnorm_d=bnorm_d, drop_p=drop_p, softplus=softplus))
    keys = set(orig.state_dict())
    if drop_p > 0:  # the convs of a stack sit at 0, 2, ... with dropout between them
        assert {"sequential.0.convs.0.weight", "sequential.0.convs.2.bias"} <= keys
        assert "sequential.0.convs.1.weight" not in keys
    hyps = hyps_for("LinearStackedBNCNN", bnorm_d=bnorm_d, drop_p=drop_p, softplus=softplus)
    _, loaded = do_import(tmp_path, orig, hyps)
    assert type(loaded.model).__name__ == "LinearStackedBNCNN"
    assert any((p < 0).any() for n, p in loaded.model.named_parameters() if n.startswith("bn") and "weight" in n)
    assert_same_outputs(orig, loaded.model)


def test_predict_gives_the_originals_rates_on_normalised_windows(tmp_path):
    orig = randomise(original_bncnn(), seed=3)
    _, loaded = do_import(tmp_path, orig, hyps_for())
    rng = np.random.default_rng(0)
    stim = rng.uniform(0, 255, size=(37, *IMG[1:])).astype(np.float32)
    rates = loaded.predict(stim, batch_size=10)
    h = IMG[0]
    windows = torch.from_numpy(np.stack([stim[i:i + h] for i in range(len(stim) - h)]))
    with torch.no_grad():
        want = orig.eval()((windows - MEAN) / STD).numpy()
    assert rates.shape == (len(stim) - h, N_UNITS)
    np.testing.assert_allclose(rates, want, rtol=1e-4, atol=1e-5)


# ---- where the checkpoint and its hyperparameters come from ------------------------------------------------------


def strip(path):
    """What the original did to the previous epoch's file without save_every_epoch: drop the state dicts."""
    data = torch.load(path, weights_only=False)
    torch.save({k: v for k, v in data.items() if "state_dict" not in k}, path)


def test_folder_takes_the_newest_checkpoint_with_weights(tmp_path, monkeypatch):
    folder = tmp_path / "test_3_lr0.001"
    older, newer = randomise(original_bncnn(), seed=1), randomise(original_bncnn(), seed=2)
    # older versions: model_hyps (constructor arguments only, no dataset, no cells) and no copies at the top
    model_hyps = {k: v for k, v in hyps_for().items() if k in ("img_shape", "chans", "ksizes", "bnorm_d", "bias",
                                                                "softplus", "noise", "bn_moment", "centers")}
    model_hyps["n_units"] = N_UNITS
    for epoch, model in ((2, older), (9, newer), (10, newer)):
        f = save_original(folder / f"test_epoch_{epoch}.pt", model, model_hyps, epoch=epoch, hyps_key="model_hyps")
        data = torch.load(f, weights_only=False)
        torch.save({k: v for k, v in data.items() if k not in hyps_for() or k == "model_type"}, f)
    strip(folder / "test_epoch_10.pt")  # e.g. a run stopped while writing epoch 10's file
    json_hyps = {k: v for k, v in hyps_for().items() if k not in ("device",)}
    (folder / "hyperparams.json").write_text(json.dumps(json_hyps))
    monkeypatch.chdir(tmp_path)
    done = import_checkpoint(folder)
    assert done.source == folder / "test_epoch_9.pt"
    assert done.path == Path("imported") / folder.name / "best.pt" and done.path.is_file()
    loaded = load_checkpoint(done.path)
    assert loaded.epoch == 9 and loaded.cell_ids == CELLS  # the dataset came from the folder's hyperparams.json
    assert "model_hyps" in done.state["imported_from"]["hyperparams"]
    assert "hyperparams.json" in done.state["imported_from"]["hyperparams"]
    assert_same_outputs(newer, loaded.model)


def test_refuses_to_overwrite_without_force(tmp_path):
    orig = randomise(original_bncnn())
    src = save_original(tmp_path / "run" / "test_epoch_7.pt", orig, hyps_for())
    first = import_checkpoint(src, out=tmp_path / "out")
    before = first.path.stat().st_mtime_ns
    with pytest.raises(UserError, match=r"best.pt exists; pass --force"):
        import_checkpoint(src, out=tmp_path / "out")
    assert first.path.stat().st_mtime_ns == before
    again = import_checkpoint(src, out=tmp_path / "out", force=True)
    assert_same_outputs(orig, load_checkpoint(again.path).model)


def test_pre_1_6_file_format(tmp_path):
    orig = randomise(original_bncnn(bnorm_d=2))
    done, loaded = do_import(tmp_path, orig, hyps_for(bnorm_d=2), fmt_zip=False)
    assert_same_outputs(orig, loaded.model)
    assert "test_import.Original" in " ".join(done.notes)


class Payload:
    """Unpickling this would run code: the import must never do it."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("fmt_zip", [True, False])
def test_never_runs_code_from_the_checkpoint(tmp_path, fmt_zip):
    orig = randomise(original_bncnn())
    marker = tmp_path / "ran"
    done, loaded = do_import(tmp_path, orig, hyps_for(), fmt_zip=fmt_zip,
                             extra_thing=Payload(exec, f"open({str(marker)!r}, 'w')"))
    assert not marker.exists()
    assert "builtins.exec" in " ".join(done.notes)
    assert_same_outputs(orig, loaded.model)
    src = save_original(tmp_path / "evil" / "test_epoch_1.pt", orig, hyps_for(), fmt_zip=fmt_zip,
                        extra_thing=Payload(os.system, f"touch {marker}"))
    with pytest.raises(UserError, match=r"can be read safely \(it refers to \S+\.system, which is never"):
        import_checkpoint(src, out=tmp_path / "evil-out")
    assert not marker.exists()


# ---- errors -------------------------------------------------------------------------------------------------------


def test_unknown_model_type(tmp_path):
    src = save_original(tmp_path / "r" / "test_epoch_1.pt", randomise(original_bncnn()), hyps_for("RNNCNN"))
    with pytest.raises(UserError, match=r"model_type 'RNNCNN' cannot be imported: .*BNCNN and LinearStackedBNCNN"
                                        r".*sequential\.0\.weight"):
        import_checkpoint(src, out=tmp_path / "o")


@pytest.mark.parametrize("extra", ["sequential.2.extra_thing", "sequential.20.weight", "readout.bias"])
def test_a_key_that_maps_nowhere_is_named(tmp_path, extra):
    orig = randomise(original_bncnn())
    sd = orig.state_dict()
    sd[extra] = torch.randn(2, 2)
    orig.state_dict = lambda: sd
    src = save_original(tmp_path / "r" / "test_epoch_1.pt", orig, hyps_for())
    with pytest.raises(UserError, match="map onto no layer") as info:
        import_checkpoint(src, out=tmp_path / "o")
    msg = str(info.value)
    assert extra in msg and "\n" not in msg
    assert "sequential.2.weight" not in msg  # only the key that does not map is named


def test_a_batch_norm_inside_the_stack_is_named(tmp_path):
    """Older versions put AbsBatchNorm2d between the stacked convs (abs_bnorm): nothing of ours takes it."""
    orig = randomise(original_stacked())
    orig.sequential[0].convs = nn.Sequential(orig.sequential[0].convs[0], AbsBatchNorm(CHANS[0]),
                                             orig.sequential[0].convs[1])
    src = save_original(tmp_path / "r" / "test_epoch_1.pt", orig, hyps_for("LinearStackedBNCNN"))
    with pytest.raises(UserError, match=r"sequential\.0\.convs\.1\.scale.* map onto no layer"):
        import_checkpoint(src, out=tmp_path / "o")


def test_weights_that_do_not_fit_the_hyperparameters(tmp_path):
    src = save_original(tmp_path / "r" / "test_epoch_1.pt", randomise(original_bncnn()), hyps_for(chans=[3, 5]))
    with pytest.raises(UserError, match=r"sequential\.6\.weight has shape \[4, 3, 3, 3\] but conv2\.weight"):
        import_checkpoint(src, out=tmp_path / "o")


def test_convgc_and_inference_exp_are_refused(tmp_path):
    orig = randomise(original_bncnn())
    src = save_original(tmp_path / "a" / "test_epoch_1.pt", orig, hyps_for(convgc=True, ksizes=(5, 3, 3)))
    with pytest.raises(UserError, match="convgc is true"):
        import_checkpoint(src, out=tmp_path / "o1")
    src = save_original(tmp_path / "b" / "test_epoch_1.pt", orig, hyps_for(inference_exp=True))
    with pytest.raises(UserError, match="inference_exp is true"):
        import_checkpoint(src, out=tmp_path / "o2")


def test_files_that_are_not_the_originals_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="is not a torch checkpoint"):
        import_checkpoint(text, out=tmp_path / "o")
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    with pytest.raises(UserError, match="not a torchdeepretina checkpoint: it holds a list"):
        import_checkpoint(listing, out=tmp_path / "o")
    stripped = save_original(tmp_path / "r" / "test_epoch_1.pt", randomise(original_bncnn()), hyps_for())
    strip(stripped)
    with pytest.raises(UserError, match="no model_state_dict .*newest epoch"):
        import_checkpoint(stripped, out=tmp_path / "o")
    with pytest.raises(UserError, match="checkpoint not found"):
        import_checkpoint(tmp_path / "missing.pt", out=tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no <exp>_epoch_<N>.pt"):
        import_checkpoint(empty, out=tmp_path / "o")
    ours = import_checkpoint(save_original(tmp_path / "s" / "test_epoch_1.pt", randomise(original_bncnn()),
                                           hyps_for()), out=tmp_path / "ours")
    with pytest.raises(UserError, match="already a retina-trainer checkpoint"):
        import_checkpoint(ours.path, out=tmp_path / "o3")


def test_cli_one_line_error_and_exit_2(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint\n")
    res = CliRunner().invoke(main, ["import", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a torch checkpoint" in lines[0]
    src = save_original(tmp_path / "run" / "test_epoch_7.pt", randomise(original_bncnn()), hyps_for())
    res = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert f"imported BNCNN (epoch 7, {N_UNITS} cells, val r 0.510) from {src} -> {tmp_path / 'ok' / 'best.pt'}" \
        in res.output
    res = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "ok")])
    assert res.exit_code == 2 and "pass --force" in res.output


# ---- registering, against a real MLflow server ---------------------------------------------------------------------


def run_cli(args, cwd, uri):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.e2e
def test_register_an_imported_model(tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from trainer.inference import load_model

    orig = randomise(original_stacked(drop_p=0.2), seed=5)
    src = save_original(tmp_path / "run" / "test_epoch_7.pt", orig, hyps_for("LinearStackedBNCNN", drop_p=0.2))
    res = run_cli(["import", str(src), "--register", "imported-stacked"], tmp_path, mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered imported-stacked version 1" in res.stdout
    assert "alias champion -> version 1" in res.stdout
    assert (tmp_path / "imported" / "run" / "best.pt").is_file()

    client = MlflowClient(mlflow_server)
    mv = client.get_model_version("imported-stacked", "1")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["imported_from"] == str(src.resolve())
    assert run.data.params["model_type"] == "LinearStackedBNCNN"
    assert run.data.metrics["best_val_pearson"] == pytest.approx(0.51)
    assert client.get_experiment(run.info.experiment_id).name == "imported"
    assert "best.pt" in {Path(f.path).name for f in client.list_artifacts(mv.run_id, "checkpoints")}
    assert mv.tags["model_type"] == "LinearStackedBNCNN" and mv.tags["dataset"] == DATASET

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    loaded = load_model("models:/imported-stacked/1")
    assert loaded.cell_ids == CELLS and loaded.source == "models:/imported-stacked/1"
    assert_same_outputs(orig, loaded.model)

    # a second, worse import becomes version 2 and leaves the champion alone
    worse = save_original(tmp_path / "run2" / "test_epoch_3.pt", orig, hyps_for("LinearStackedBNCNN", drop_p=0.2),
                          val_acc=0.2)
    res = run_cli(["import", str(worse), "--register", "imported-stacked", "--experiment", "lab"], tmp_path,
                  mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered imported-stacked version 2" in res.stdout
    assert "alias champion stays on version 1" in res.stdout
