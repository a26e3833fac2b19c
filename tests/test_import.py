"""`retina-trainer import`: checkpoints of the original torchdeepretina become ours and compute the same rates.

The original's models are re-created here at small shapes, module for module (torchdeepretina/models.py:
BNCNN, LinearStackedBNCNN at 00bb0ca, a0c756d and fb78691, VaryModel and RetinotopicModel at fb78691;
custom_modules.py @fb78691: Flatten, Reshape, GaussianNoise with its `sigma` parameter, Exponential, AbsBatchNorm
with scale/shift/running stats as parameters, LinearStackedConv2d's `convs`, GrabUnits; OneHot in its normalised
version, the one a RetinotopicModel trained with), given random
weights and random running statistics, and saved as its training loop saved them. The max |difference| each test
states was measured on its largest case (float64 unless it says float32).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from conftest import invoke
from trainer.cli import main
from trainer.errors import UserError
from trainer.importer import import_checkpoint, run_metrics
from trainer.inference import load_checkpoint
from trainer.training import checkpoint

IMG = (8, 16, 16)
CHANS = [3, 4]
KSIZES = (5, 3)
DATASET = "15-11-21a"  # the original's "all" for this recording is rows 6, 10, 12, 13 (datas.py: CELLS)
CELLS = [6, 10, 12, 13]
N_UNITS = len(CELLS)
MEAN, STD = 41.5, 17.25
CENTERS = [[4, 5], [6, 7], [8, 9], [10, 11]]  # the recording's receptive-field centres (hyps['centers'])
VARY_KSIZES = (5, 3, 3)


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


class GrabUnits(nn.Module):
    """GrabUnits (custom_modules.py @fb78691): no tensors; cell i is channel i of the map at a position made from
    its centre: the centre less half the effective kernel of ksizes[0..2], clamped to [0, img - 2 * (half - 1)]
    (an upper bound below 0 reads from the far edge, as python indexing does)."""

    def __init__(self, centers, ksizes, img_shape):
        super().__init__()
        half = (ksizes[0] - 1) + (ksizes[1] - 1) + (ksizes[2] // 2 - 1) + 1
        rows = [min(max(0, r - half), img_shape[1] - 2 * (half - 1)) for r, _ in centers]
        cols = [min(max(0, c - half), img_shape[2] - 2 * (half - 1)) for _, c in centers]
        self.coords = torch.LongTensor([rows, cols]).T
        self.chans = torch.arange(len(centers))

    def forward(self, x):
        return x[:, self.chans, self.coords[:, 0], self.coords[:, 1]]


class OneHot(nn.Module):
    """RetinotopicModel's read-out (custom_modules.py, the normalised version): p = (w - min w) / sum, per cell."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.ones(shape[0], shape[1] * shape[2]) / (shape[1] * shape[2]))

    def probs(self):
        positive = self.w - self.w.min(dim=-1, keepdim=True).values
        return positive / positive.sum(dim=-1, keepdim=True)

    def forward(self, x):
        return (x.reshape(*x.shape[:2], -1) * self.probs()).sum(dim=-1)


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


def _gc_layer(c_in, k, gc_bias, ksizes, img=IMG, centers=CENTERS):
    """convgc: a conv with one channel per cell, then GrabUnits (models.py @fb78691)."""
    return [nn.Conv2d(c_in, N_UNITS, k, bias=gc_bias), GrabUnits(centers, ksizes, img)]


def original_bncnn(bnorm_d=1, softplus=True, layout="new", gc_bias=False, convgc=False, ksizes=KSIZES):
    """layout "new": BN, Reshape, noise, ReLU after both convs (507decb, fb78691); "old": BN, noise, ReLU, Reshape
    after the first, and no Reshape (nor Flatten) before the linear layer after the second (00bb0ca). convgc
    (fb78691): the second block keeps its map and a conv of ksizes[2] with GrabUnits replaces the linear layer."""
    (c1, c2), (h1, h2) = CHANS, _maps(ksizes=ksizes)
    m = [nn.Conv2d(IMG[0], c1, ksizes[0])]
    if bnorm_d == 2:
        m += [nn.BatchNorm2d(c1, eps=1e-3), GaussianNoise(), nn.ReLU()]
    elif layout == "new":
        m += [Flatten(), nn.BatchNorm1d(c1 * h1 * h1, eps=1e-3), Reshape((-1, c1, h1, h1)), GaussianNoise(),
              nn.ReLU()]
    else:
        m += [Flatten(), nn.BatchNorm1d(c1 * h1 * h1, eps=1e-3), GaussianNoise(), nn.ReLU(),
              Reshape((-1, c1, h1, h1))]
    m += [nn.Conv2d(c1, c2, ksizes[1])]
    if bnorm_d == 2:
        m += [nn.BatchNorm2d(c2, eps=1e-3), GaussianNoise(), nn.ReLU()]
    elif layout == "new":
        m += [Flatten(), nn.BatchNorm1d(c2 * h2 * h2, eps=1e-3), Reshape((-1, c2, h2, h2)), GaussianNoise(),
              nn.ReLU()]
    else:
        m += [Flatten(), nn.BatchNorm1d(c2 * h2 * h2, eps=1e-3), GaussianNoise(), nn.ReLU()]
    if convgc:
        m += _gc_layer(c2, ksizes[2], gc_bias, ksizes)
    else:
        m += ([Flatten()] if layout == "new" else []) + [nn.Linear(c2 * h2 * h2, N_UNITS, bias=gc_bias)]
    m += [nn.BatchNorm1d(N_UNITS, eps=1e-3), nn.Softplus() if softplus else Exponential()]
    return Original(m)


def original_stacked(bnorm_d=1, drop_p=0.0, softplus=True, convgc=False, layout="new", ksizes=KSIZES,
                     gc_bias=False):
    """fb78691's LinearStackedBNCNN ("new"), or a0c756d's ("old": BN, noise, ReLU, Reshape; with convgc a Reshape
    before the ganglion-cell conv and the output AbsBatchNorm1d at its default eps, 1e-5)."""
    (c1, c2), (h1, h2) = CHANS, _maps(ksizes=ksizes)
    m = [StackedConv(IMG[0], c1, ksizes[0], drop_p=drop_p)]
    if layout == "old":
        m += [Flatten(), AbsBatchNorm(c1 * h1 * h1), GaussianNoise(), nn.ReLU(), Reshape((-1, c1, h1, h1))]
    else:
        m += ([Flatten(), AbsBatchNorm(c1 * h1 * h1), Reshape((-1, c1, h1, h1))] if bnorm_d == 1 else
              [AbsBatchNorm(c1)])
        m += [GaussianNoise(), nn.ReLU()]
    m += [StackedConv(c1, c2, ksizes[1], drop_p=drop_p)]
    if layout == "old":
        m += [Flatten(), AbsBatchNorm(c2 * h2 * h2), GaussianNoise(), nn.ReLU()]
        m += [Reshape((-1, c2, h2, h2)), *_gc_layer(c2, ksizes[2], gc_bias, ksizes), AbsBatchNorm(N_UNITS, eps=1e-5)] \
            if convgc else [nn.Linear(c2 * h2 * h2, N_UNITS, bias=gc_bias), AbsBatchNorm(N_UNITS)]
    else:
        m += ([Flatten(), AbsBatchNorm(c2 * h2 * h2), Reshape((-1, c2, h2, h2))] if bnorm_d == 1 else
              [AbsBatchNorm(c2)])
        m += [GaussianNoise(), nn.ReLU()]
        m += _gc_layer(c2, ksizes[2], gc_bias, ksizes) if convgc else \
            [Flatten(), nn.Linear(c2 * h2 * h2, N_UNITS, bias=gc_bias)]
        m += [AbsBatchNorm(N_UNITS)]
    m += [nn.Softplus() if softplus else Exponential()]
    return Original(m)


def _hidden(img, n_layers, chans, ksizes, bnorm_d, stackconvs, drop_p, activ):
    """VaryModel's and RetinotopicModel's layer loop (models.py @fb78691): conv (stacked or plain), AbsBatchNorm
    (flat with Reshape, or per channel), noise, activation; returns the modules, channels and map size."""
    m, c_in, h = [], img[0], img[1]
    for i in range(n_layers - 1):
        c, k = chans[i], ksizes[i]
        m.append(StackedConv(c_in, c, k, drop_p=drop_p) if stackconvs else nn.Conv2d(c_in, c, k))
        h = h - k + 1
        m += [Flatten(), AbsBatchNorm(c * h * h), Reshape((-1, c, h, h))] if bnorm_d == 1 else [AbsBatchNorm(c)]
        m += [GaussianNoise(), activ()]
        c_in = c
    return m, c_in, h


def original_vary(n_layers=3, chans=CHANS, ksizes=VARY_KSIZES, bnorm_d=2, stackconvs=True, convgc=True,
                  drop_p=0.0, softplus=True, gc_bias=False, activ=nn.ReLU, img=IMG, centers=CENTERS):
    """VaryModel (models.py @fb78691; the stored version with `activ_fxn` builds the same modules): n_layers - 1
    hidden layers, then convgc's conv of ksizes[n_layers - 1] with GrabUnits, or Flatten and a linear layer;
    AbsBatchNorm1d over the cells, Softplus or Exponential."""
    m, c_in, h = _hidden(img, n_layers, chans, ksizes, bnorm_d, stackconvs, drop_p, activ)
    if convgc:
        m += _gc_layer(c_in, ksizes[n_layers - 1], gc_bias, ksizes, img, centers)
    else:
        m += [Flatten(), nn.Linear(c_in * h * h, N_UNITS, bias=gc_bias)]
    m += [AbsBatchNorm(N_UNITS), nn.Softplus() if softplus else Exponential()]
    return Original(m)


def original_retinotopic(n_layers=3, chans=CHANS, ksizes=(5, 4, 3), bnorm_d=2, stackconvs=False, img=IMG):
    """RetinotopicModel (models.py @fb78691): VaryModel's hidden layers, a conv of ksizes[-1] from chans[-1] to one
    channel per cell with `bias`, AbsBatchNorm2d, Softplus, OneHot over the map."""
    m, _, h = _hidden(img, n_layers, chans, ksizes, bnorm_d, stackconvs, 0.0, nn.ReLU)
    h = h - ksizes[-1] + 1
    m += [nn.Conv2d(chans[-1], N_UNITS, ksizes[-1], bias=True), AbsBatchNorm(N_UNITS), nn.Softplus(),
          OneHot((N_UNITS, h, h))]
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
            "save_every_epoch": False, "centers": CENTERS, "device": torch.device("cpu")}
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


def assert_same_outputs(orig, ours, n=48, seed=1, img=IMG, dtype=torch.float64, rtol=None):
    """Eval-mode outputs of both models on the same random input, in float64 (or float32, the precision the
    original ran in), equal to rounding (or to `rtol`); returns the largest |difference|."""
    orig, ours = copy.deepcopy(orig).to(dtype).eval(), copy.deepcopy(ours).to(dtype).eval()
    x = torch.randn(n, *img, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 2
    with torch.no_grad():
        want, got = orig(x), ours(x)
    assert want.shape == (n, N_UNITS)
    assert want.std(0).min() > 1e-5 and want.std(0).max() > 1e-2  # not a comparison of constants
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-7}
    if rtol is not None:
        tol = {"rtol": rtol, "atol": 0.0}
    torch.testing.assert_close(got, want, **tol)
    return (got - want).abs().max().item()


def do_import(tmp_path, orig, hyps, name="run", **kw):
    src = save_original(tmp_path / name / "test_epoch_7.pt", orig, hyps, **kw)
    done = import_checkpoint(src, out=tmp_path / "out" / name)
    return done, load_checkpoint(done.path)


# ---- equal outputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bnorm_d, softplus, layout", [(1, True, "new"), (1, False, "new"), (1, True, "old"),
                                                       (2, True, "new"), (2, False, "new")])
def test_bncnn_computes_as_the_original(tmp_path, bnorm_d, softplus, layout):
    """Max |difference| 0.0 (float64)."""
    orig = randomise(original_bncnn(bnorm_d=bnorm_d, softplus=softplus, layout=layout))
    done, loaded = do_import(tmp_path, orig, hyps_for(bnorm_d=bnorm_d, softplus=softplus))
    assert assert_same_outputs(orig, loaded.model) == 0.0
    assert loaded.cell_ids == CELLS and loaded.epoch == 8  # the original's epoch 7, counted from 0
    assert (loaded.mean, loaded.std) == (MEAN, STD)
    assert loaded.config["bnorm_d"] == bnorm_d and loaded.config["softplus"] is softplus
    assert loaded.config["img_shape"] == list(IMG) and loaded.config["dataset"] == DATASET
    st = done.state
    assert st["format"] == checkpoint.FORMAT and st["n_cells"] == N_UNITS and st["history"] == []
    assert st["imported_from"]["epoch"] == 7 and st["imported_from"]["model_type"] == "BNCNN"
    assert st["imported_from"]["source"] == str((tmp_path / "run" / "test_epoch_7.pt").resolve())
    # the original's scores under their own names; ours need the recording (test_scored_on_our_validation_split)
    assert st["metrics"] == {"original_val_acc": pytest.approx(0.51), "original_test_pearson": pytest.approx(0.42),
                             "original_val_loss": pytest.approx(0.3)}
    assert math.isnan(st["best_val_pearson"]) and math.isnan(st["best_test"])
    # what was dropped, and why, is said
    notes = " ".join(done.notes)
    assert "test_import.Original" in notes  # hyps['model_class'], left out without importing it
    assert "save_folder" in notes and "centers" in notes and "seed" in notes and "device" in notes


@pytest.mark.parametrize("keys", [{"gc_bias": True}, {"linear_bias": True}, {"gc_bias": None, "linear_bias": True}])
def test_bncnn_with_a_ganglion_cell_bias(tmp_path, keys):
    """gc_bias, or its older name linear_bias (versions differ in which they read; the saved weights decide). Max
    |difference| 0.0 (float64)."""
    orig = randomise(original_bncnn(gc_bias=True))
    hyps = {k: v for k, v in hyps_for().items() if k != "gc_bias"}
    done, loaded = do_import(tmp_path, orig, {**hyps, **keys})
    assert loaded.model.readout.bias is not None and loaded.config["gc_bias"] is True
    assert assert_same_outputs(orig, loaded.model) == 0.0
    assert ("disagree" in " ".join(done.notes)) == (len(keys) == 2)


@pytest.mark.parametrize("bnorm_d, drop_p, softplus", [(1, 0.2, True), (2, 0.1, False), (1, 0.0, True)])
def test_linear_stacked_computes_as_the_original(tmp_path, bnorm_d, drop_p, softplus):
    """Max |difference| 0.0 (float64)."""
    orig = randomise(original_stacked(bnorm_d=bnorm_d, drop_p=drop_p, softplus=softplus))
    keys = set(orig.state_dict())
    if drop_p > 0:  # the convs of a stack sit at 0, 2, ... with dropout between them
        assert {"sequential.0.convs.0.weight", "sequential.0.convs.2.bias"} <= keys
        assert "sequential.0.convs.1.weight" not in keys
    hyps = hyps_for("LinearStackedBNCNN", bnorm_d=bnorm_d, drop_p=drop_p, softplus=softplus)
    _, loaded = do_import(tmp_path, orig, hyps)
    assert type(loaded.model).__name__ == "LinearStackedBNCNN"
    assert any((p < 0).any() for n, p in loaded.model.named_parameters() if n.startswith("bn") and "weight" in n)
    assert assert_same_outputs(orig, loaded.model) == 0.0


@pytest.mark.parametrize("softplus, drop_p", [(True, 0.0), (False, 0.0), (True, 0.05)])
def test_ln_computes_as_the_original(tmp_path, softplus, drop_p):
    """The original's LN: Flatten, Dropout(drop_p), Linear(bias), Softplus or ELU (models.py: LN @fb78691). Max
    |difference| 0.0 (float64)."""
    d = IMG[0] * IMG[1] * IMG[2]
    orig = randomise(Original([Flatten(), nn.Dropout(drop_p), nn.Linear(d, N_UNITS, bias=True),
                               nn.Softplus() if softplus else nn.ELU()]))
    done, loaded = do_import(tmp_path, orig, hyps_for("LN", softplus=softplus, drop_p=drop_p))
    assert assert_same_outputs(orig, loaded.model) == 0.0
    assert loaded.config["model_type"] == "LN" and loaded.config["softplus"] is softplus
    assert loaded.config["drop_p"] == drop_p and not any("batch norms" in n for n in done.notes)


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


# ---- VaryModel, convgc, RetinotopicModel ---------------------------------------------------------------------------

SMALL_POSITIONS = [[0, 0], [0, 0], [1, 2], [3, 4]]  # GrabUnits of CENTERS with ksizes (5, 3, 3) on 16x16 frames


def test_vary_model_of_the_shipped_config_computes_as_the_original(tmp_path):
    """The seven shipped VaryModel configs (tests/data/original_configs.json: stackconvs, convgc, bnorm_d 2,
    n_layers 3, chans [8, 8], ksizes [15, 11, 11], img_shape [40, 50, 50]) at their full shapes: GrabUnits clamps
    every centre to row and column 50 - 2 * 28 = -6, i.e. (10, 10) of the 16x16 map, and the import reads the
    same. Max |difference| 0.0 (float64)."""
    img, chans, ksizes = (40, 50, 50), [8, 8], (15, 11, 11)
    centers = [[12, 30], [25, 25], [33, 9], [40, 44]]
    orig = randomise(original_vary(chans=chans, ksizes=ksizes, img=img, centers=centers), seed=11)
    assert orig.sequential[-3].coords.tolist() == [[-6, -6]] * N_UNITS  # what the original indexed the map with
    hyps = hyps_for("VaryModel", img_shape=img, chans=chans, ksizes=ksizes, bnorm_d=2, n_layers=3, stackconvs=True,
                    convgc=True, gc_bias=False, centers=centers)
    done, loaded = do_import(tmp_path, orig, hyps)
    assert type(loaded.model).__name__ == "VaryModel" and loaded.model.convgc
    assert loaded.model.positions.tolist() == [[10, 10]] * N_UNITS
    assert assert_same_outputs(orig, loaded.model, n=8, img=img) == 0.0
    notes = " ".join(done.notes)
    assert not any("ignoring keys" in n and "centers" in n for n in done.notes)  # read by the import
    assert "reads every one of the 4 cells at (row, col) (10, 10) of the 16x16 ganglion-cell map" in notes
    assert "a model trained here would read each cell at its own receptive-field peak" in notes


@pytest.mark.parametrize("kw", [
    {"bnorm_d": 2, "stackconvs": True, "convgc": True},
    {"bnorm_d": 1, "stackconvs": True, "convgc": True, "drop_p": 0.1, "gc_bias": True},
    {"bnorm_d": 1, "stackconvs": True, "convgc": False, "drop_p": 0.2},
    {"bnorm_d": 2, "stackconvs": False, "convgc": False, "softplus": False},
    {"bnorm_d": 2, "stackconvs": False, "convgc": True, "n_layers": 2, "seed": 0},
    {"bnorm_d": 1, "stackconvs": False, "convgc": False, "n_layers": 4, "chans": (3, 4, 2), "ksizes": (5, 3, 3, 3),
     "activ": "ELU"},
    {"bnorm_d": 2, "stackconvs": True, "convgc": False, "n_layers": 1},
])
def test_vary_model_computes_as_the_original(tmp_path, kw):
    """VaryModel's layouts (models.py @fb78691 and the version with activ_fxn): stacked or plain convs, flat or
    per-channel AbsBatchNorm, dropout in the stacks, a linear or convgc ganglion-cell layer (with its bias),
    Exponential, 1 to 4 layers, another activation. Max |difference| 0.0 (float64)."""
    kw = dict(kw)
    activ, seed = kw.pop("activ", "ReLU"), kw.pop("seed", 7)
    orig = randomise(original_vary(**kw, activ=getattr(nn, activ)), seed=seed)
    hyps = hyps_for("VaryModel", **{"ksizes": VARY_KSIZES, "n_layers": 3, **kw}, activ_fxn=activ)
    done, loaded = do_import(tmp_path, orig, hyps)
    model = loaded.model
    assert type(model).__name__ == "VaryModel" and model.convgc == kw["convgc"]
    assert len(model.hidden) == kw.get("n_layers", 3) - 1
    if kw["convgc"]:
        assert model.positions.tolist() == SMALL_POSITIONS
        assert (model.gc_conv.bias is not None) == kw.get("gc_bias", False)
    assert assert_same_outputs(orig, model) == 0.0


@pytest.mark.parametrize("model_type, ksizes, kw", [
    ("BNCNN", (5, 3, 3), {"bnorm_d": 1}),
    ("BNCNN", (5, 5, 5), {"bnorm_d": 2, "gc_bias": True}),
    ("LinearStackedBNCNN", (5, 3, 3), {"bnorm_d": 1, "drop_p": 0.1}),
    ("LinearStackedBNCNN", (5, 5, 5), {"bnorm_d": 2, "seed": 8}),
])
def test_convgc_bncnn_models_compute_as_the_original(tmp_path, model_type, ksizes, kw):
    """BNCNN and LinearStackedBNCNN with convgc (models.py @fb78691): a conv of ksizes[2] read by GrabUnits. With
    ksizes (5, 5, 5) every centre clamps to -2, i.e. (2, 2) of the 4x4 map. Max |difference| 0.0 (float64)."""
    build = original_bncnn if model_type == "BNCNN" else original_stacked
    kw = dict(kw)
    orig = randomise(build(convgc=True, ksizes=ksizes, **{k: v for k, v in kw.items() if k != "seed"}),
                     seed=kw.pop("seed", 9))
    done, loaded = do_import(tmp_path, orig, hyps_for(model_type, ksizes=ksizes, convgc=True, **kw))
    model = loaded.model
    assert type(model).__name__ == model_type and model.convgc
    assert model.positions.tolist() == (SMALL_POSITIONS if ksizes == (5, 3, 3) else [[2, 2]] * N_UNITS)
    assert (model.gc_conv.bias is not None) == kw.get("gc_bias", False)
    assert assert_same_outputs(orig, model) == 0.0


def test_a0c756d_stacked_convgc_keeps_its_output_eps(tmp_path):
    """a0c756d's LinearStackedBNCNN with convgc (BN, noise, ReLU, Reshape; linear_bias, no bnorm_d in its hyps)
    built its output AbsBatchNorm1d at eps 1e-5, not 1e-3: the import keeps it, through best.pt's bn_eps. Max
    |difference| 0.0 (float64); at 1e-3 the outputs would differ by more than 1e-4."""
    orig = randomise(original_stacked(layout="old", convgc=True, ksizes=VARY_KSIZES), seed=2)
    hyps = {k: v for k, v in hyps_for("LinearStackedBNCNN", ksizes=VARY_KSIZES, convgc=True).items()
            if k not in ("gc_bias", "bnorm_d")}
    done, loaded = do_import(tmp_path, orig, {**hyps, "linear_bias": False})
    assert done.state["bn_eps"] == {"bn_out": 1e-5} and loaded.model.bn_out.eps == 1e-5
    assert "eps 1e-05, not 1e-3: kept" in " ".join(done.notes)
    assert assert_same_outputs(orig, loaded.model) == 0.0
    loaded.model.bn_out.eps = 1e-3
    with pytest.raises(AssertionError):
        assert_same_outputs(orig, loaded.model)
    # the same layout without convgc kept eps 1e-3 there: nothing to keep
    plain = randomise(original_stacked(layout="old"), seed=2)
    done, loaded = do_import(tmp_path, plain, {**hyps, "convgc": False, "ksizes": KSIZES}, name="plain")
    assert "bn_eps" not in done.state and loaded.model.bn_out.eps == 1e-3
    assert assert_same_outputs(plain, loaded.model) == 0.0


@torch.no_grad()
def learnt(orig, seed=5):
    """One-hot weights as training leaves them: near one position per cell (a uniform read-out of random maps
    averages them to near constants), with small random weights elsewhere."""
    w = orig.sequential[-1].w
    g = torch.Generator().manual_seed(seed)
    w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    w[torch.arange(len(w)), torch.randperm(w.shape[1], generator=g)[:len(w)]] += 20.0
    return orig


@pytest.mark.parametrize("kw", [
    {},
    {"bnorm_d": 1, "stackconvs": True, "ksizes": (5, 3, 3)},
    {"n_layers": 2, "chans": (3,), "ksizes": (5, 4, 3)},
])
def test_retinotopic_model_keeps_its_one_hot_maps(tmp_path, kw):
    """RetinotopicModel (models.py @fb78691; shipped: plain convs, bnorm_d 2, even ksizes [15, 12, 9]): its learnt
    one-hot maps p = (w - min w) / sum are ours exactly (OneHotReadout weights w - min w); with more ksizes than
    layers the original's per-cell conv took the last. Max |difference| 0.0 in float32, the precision the
    original ran in; 4.1e-10 in float64 (the float32 rounding of the stored w - min w, below 1e-7 relative)."""
    kw = {"n_layers": 3, "bnorm_d": 2, "stackconvs": False, "ksizes": (5, 4, 3), **kw}
    orig = learnt(randomise(original_retinotopic(**kw), seed=4))
    hyps = hyps_for("RetinotopicModel", **kw, convgc=True)
    done, loaded = do_import(tmp_path, orig, hyps)
    model = loaded.model
    assert type(model).__name__ == "RetinotopicModel"
    with torch.no_grad():
        assert torch.equal(model.onehot_probs(), orig.sequential[-1].probs())
    assert assert_same_outputs(orig, model, dtype=torch.float32) == 0.0
    assert assert_same_outputs(orig, model, dtype=torch.float64, rtol=1e-7) < 1e-8
    notes = " ".join(done.notes)
    assert "convgc is ignored" in notes
    if kw["n_layers"] == 2:
        assert loaded.config["ksizes"] == [5, 3] and "used the last ksize (3)" in notes


def test_a_constant_one_hot_row_is_noted(tmp_path):
    """A cell whose one-hot weights are all equal read 0/0 (NaN) in the original; here 0, with a note."""
    orig = learnt(randomise(original_retinotopic(), seed=4))
    with torch.no_grad():
        orig.sequential[-1].w[2] = 0.25
    done, _ = do_import(tmp_path, orig, hyps_for("RetinotopicModel", bnorm_d=2, stackconvs=False, ksizes=(5, 4, 3)))
    assert f"one-hot weights of cells [{CELLS[2]}] are all equal" in " ".join(done.notes)


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
    assert loaded.epoch == 10 and loaded.cell_ids == CELLS  # the dataset came from the folder's hyperparams.json
    assert "model_hyps" in done.state["imported_from"]["hyperparams"]
    assert "hyperparams.json" in done.state["imported_from"]["hyperparams"]
    assert_same_outputs(newer, loaded.model)


def test_the_originals_epoch_counts_from_0(tmp_path):
    """training.py: train_loop @5c2af72 saves test_epoch_0.pt after the first epoch: it is our epoch 1 (epochs
    trained); the original's number stays in imported_from with epoch_counted_from 0. A file without `epoch`
    takes the N of its name."""
    orig = randomise(original_bncnn())
    src = save_original(tmp_path / "r" / "test_epoch_0.pt", orig, hyps_for(), epoch=0)
    done = import_checkpoint(src, out=tmp_path / "o")
    st = done.state
    assert (st["epoch"], st["best_epoch"], load_checkpoint(done.path).epoch) == (1, 1, 1)
    assert st["imported_from"]["epoch"] == 0 and st["imported_from"]["epoch_counted_from"] == 0
    assert "the original counted epochs from 0: its epoch 0 is epoch 1 here" in " ".join(done.notes)
    assert run_metrics(st)["best_epoch"] == 1.0
    data = torch.load(src, weights_only=False)
    del data["epoch"]
    (tmp_path / "s").mkdir()
    torch.save(data, tmp_path / "s" / "test_epoch_4.pt")
    done = import_checkpoint(tmp_path / "s" / "test_epoch_4.pt", out=tmp_path / "o2")
    assert done.state["epoch"] == 5 and done.state["imported_from"]["epoch"] == 4


def test_pth_files_are_found_like_pt_files(tmp_path):
    """analysis.py: read_model @f67a275 reads test_epoch_<N>.pth: a run folder's .pth files count as its .pt do.
    Max |difference| 0.0 (float64)."""
    folder = tmp_path / "old_run"
    older, newer = randomise(original_bncnn(), seed=1), randomise(original_bncnn(), seed=2)
    save_original(folder / "test_epoch_3.pt", older, hyps_for(), epoch=3)
    save_original(folder / "test_epoch_4.pth", newer, hyps_for(), epoch=4)
    done = import_checkpoint(folder, out=tmp_path / "o")
    assert done.source == folder / "test_epoch_4.pth" and done.state["epoch"] == 5
    assert assert_same_outputs(newer, load_checkpoint(done.path).model) == 0.0
    strip(folder / "test_epoch_4.pth")  # then the newest with weights is the .pt
    done = import_checkpoint(folder, out=tmp_path / "o", force=True)
    assert done.source == folder / "test_epoch_3.pt"
    only = tmp_path / "pth_only"
    save_original(only / "test_epoch_2.pth", newer, hyps_for(), epoch=2)
    assert import_checkpoint(only / "test_epoch_2.pth", out=tmp_path / "o3").state["epoch"] == 3


def test_the_old_noise_name_cuda_param_is_accepted(tmp_path):
    """Older GaussianNoise saved its std as `cuda_param` (analysis.py: read_model @f67a275 renamed it to sigma):
    dropped as sigma is. Max |difference| 0.0 (float64)."""
    orig = randomise(original_bncnn(bnorm_d=2))
    sd = {k.replace(".sigma", ".cuda_param"): v for k, v in orig.state_dict().items()}
    assert sum(k.endswith(".cuda_param") for k in sd) == 2
    saved = copy.deepcopy(orig)
    saved.state_dict = lambda: sd
    _, loaded = do_import(tmp_path, saved, hyps_for(bnorm_d=2))
    assert assert_same_outputs(orig, loaded.model) == 0.0


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
    with pytest.raises(UserError, match=r"model_type 'RNNCNN' cannot be imported: .*BNCNN, LinearStackedBNCNN, "
                                        r"VaryModel, RetinotopicModel, LN.*sequential\.0\.weight"):
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


def test_inference_exp_is_refused(tmp_path):
    orig = randomise(original_bncnn())
    src = save_original(tmp_path / "b" / "test_epoch_1.pt", orig, hyps_for(inference_exp=True))
    with pytest.raises(UserError, match="inference_exp is true"):
        import_checkpoint(src, out=tmp_path / "o2")


@pytest.mark.parametrize("over, match", [
    ({"centers": None}, r"convgc without hyps 'centers' \(the cells' receptive-field centres"),
    ({"centers": [[4, 5]]}, r"hyps 'centers' must be a list of one \[row, col\] per cell \(4 cells\), got 1 "),
    ({"centers": [[4, 5], [6, 7], [8, "x"], [1, 2]]}, r"entry 2 is \[8, 'x'\]"),
    ({"ksizes": (5, 3), "n_layers": 2}, r"convgc with ksizes \[5, 3\]: the original's GrabUnits needs 3 ksizes"),
    ({"paddings": [1, 0]}, r"paddings \[1, 0\] pad the hidden convolutions"),
    ({"stack_ksizes": [5, 5]}, r"stack_ksizes \[5, 5\]: retina-trainer stacks 3x3 convolutions only"),
    ({"stack_chans": [6, None]}, r"stack_chans \[6, None\]: retina-trainer's stacked convolutions keep"),
    ({"one2one": True}, r"one2one is true \(stacked convolutions without crosstalk"),
])
def test_vary_model_settings_that_cannot_be_imported(tmp_path, over, match):
    orig = randomise(original_vary())
    hyps = hyps_for("VaryModel", **{"ksizes": VARY_KSIZES, "n_layers": 3, "bnorm_d": 2, "stackconvs": True,
                                    "convgc": True, **over})
    src = save_original(tmp_path / "r" / "test_epoch_1.pt", orig, hyps)
    with pytest.raises(UserError, match=match) as info:
        import_checkpoint(src, out=tmp_path / "o")
    assert "\n" not in str(info.value) and str(src) in str(info.value)


def test_a_grab_units_position_off_the_map_is_an_error(tmp_path):
    """ksizes (7, 5, 5) on 16x16 frames clamp every centre to row -6 of a 2x2 map: the original's forward failed
    on such weights, so they cannot be imported."""
    ksizes = (7, 5, 5)
    src = save_original(tmp_path / "r" / "test_epoch_1.pt", randomise(original_bncnn(convgc=True, ksizes=ksizes)),
                        hyps_for(convgc=True, ksizes=ksizes))
    with pytest.raises(UserError, match=r"reads cell 0 \(centre \[4, 5\]\) at row -6, column -6 of the 2x2 "
                                        r"ganglion-cell map, outside it"):
        import_checkpoint(src, out=tmp_path / "o")


def test_a_collapsed_retinotopic_model_is_refused(tmp_path):
    src = save_original(tmp_path / "r" / "test_epoch_1.pt", randomise(original_retinotopic()),
                        hyps_for("RetinotopicModel", bnorm_d=2, stackconvs=False, ksizes=(5, 4, 3), collapsed=True))
    with pytest.raises(UserError, match="collapsed is true"):
        import_checkpoint(src, out=tmp_path / "o")


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
    with pytest.raises(UserError, match=r"holds no <exp>_epoch_<N>.pt \(or .pth\)"):
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
    assert (f"imported BNCNN (epoch 8, the original's epoch 7, {N_UNITS} cells, original val_acc 0.510) from {src} "
            f"-> {tmp_path / 'ok' / 'best.pt'}") in res.output
    res = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "ok")])
    assert res.exit_code == 2 and "pass --force" in res.output


# ---- our validation score --------------------------------------------------------------------------------------------


def synthetic_recording(root):
    """A recording the small models fit: 16x16 frames, 4 cells, history 8."""
    from trainer.data.synth import write_synthetic

    return write_synthetic(root, "synthimp", "whitenoise", n_cells=N_UNITS, size=IMG[1], train_frames=1500,
                           test_frames=300, n_repeats=2, history=IMG[0], seed=3)


SYNTH = {"dataset": "synthimp", "stim_type": "whitenoise", "cells": [0, 1, 2, 3]}


def originals_scores(orig, rec):
    """Mean over cells of Pearson r (numpy) of the original model's rates on our validation and test windows of
    `rec` (load_data with val_frac 0.1, the hyps' n_cv_folds 10), z-scored with the checkpoint's norm_stats."""
    from trainer.data.recording import load_data

    data = load_data(rec, cells=SYNTH["cells"], img_shape=IMG, val_frac=0.1)
    out = []
    for split in (data.val, data.test):
        x = torch.stack([split.stimulus[s:s + IMG[0]] for s in split.starts.tolist()]).float()
        with torch.no_grad():
            pred = orig.eval()((x - float(np.float32(MEAN))) / float(np.float32(STD))).numpy()
        y = split.targets.numpy()
        out.append(float(np.mean([np.corrcoef(pred[:, i], y[:, i])[0, 1] for i in range(N_UNITS)])))
    return out


def test_scored_on_our_validation_split(tmp_path):
    """With the recording at hand the import scores the model on our validation and test splits: best_val_pearson
    and best_test (MLflow: best_val_pearson, test_pearson_at_best), equal to the original model's r computed here
    independently; the original's val_acc (its own, leaky split) is only original_val_acc."""
    rec = synthetic_recording(tmp_path / "data")
    orig = randomise(original_vary(convgc=False, bnorm_d=1), seed=6)
    hyps = hyps_for("VaryModel", ksizes=VARY_KSIZES, n_layers=3, stackconvs=True, convgc=False, **SYNTH)
    src = save_original(tmp_path / "run" / "test_epoch_7.pt", orig, hyps, val_acc=0.99)
    want_val, want_test = originals_scores(orig, rec)
    done = import_checkpoint(src, out=tmp_path / "o", recording=rec)
    st = done.state
    assert st["best_val_pearson"] == pytest.approx(want_val, abs=1e-5)
    assert st["best_test"] == pytest.approx(want_test, abs=1e-5)
    assert st["imported_from"]["scored_on"] == str(rec.resolve())
    assert checkpoint.load(done.path)["best_val_pearson"] == st["best_val_pearson"]
    m = run_metrics(st)
    assert m["best_val_pearson"] == st["best_val_pearson"] and m["test_pearson_at_best"] == st["best_test"]
    assert m["original_val_acc"] == pytest.approx(0.99) and m["original_test_pearson"] == pytest.approx(0.42)
    assert m["best_epoch"] == 8.0
    # --data-root: <root>/<dataset>/<stim_type>.h5 of the hyperparameters
    res = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "o2"), "--data-root",
                                    str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    assert f"val r {st['best_val_pearson']:.3f} on our split, original val_acc 0.990" in res.output
    # unscored, the original's figure ranks nothing
    plain = import_checkpoint(src, out=tmp_path / "o3")
    assert "best_val_pearson" not in run_metrics(plain.state) and "test_pearson_at_best" not in run_metrics(
        plain.state)
    # a data root without the dataset named, a recording that does not fit: one line each
    unnamed = save_original(tmp_path / "r2" / "test_epoch_1.pt", orig,
                            {k: v for k, v in hyps.items() if k != "dataset"})
    with pytest.raises(UserError, match=r"--data-root: the checkpoint's hyperparameters do not name its recording"):
        import_checkpoint(unnamed, out=tmp_path / "o4", data_root=str(tmp_path / "data"))
    res = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "o5"), "--recording",
                                    str(tmp_path / "data" / "missing.h5")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


# ---- registering, against a real MLflow server ---------------------------------------------------------------------


def run_cli(args, cwd, uri):
    return invoke(args, cwd, uri)


@pytest.mark.slow
@pytest.mark.e2e
def test_register_an_imported_model(tmp_path, mlflow_server, monkeypatch):
    """An import ranks on our validation r only: unscored, it logs the original's figures as original_val_acc and
    original_test_pearson (its val_acc came from its own, leaky split) and no best_val_pearson, so it takes the
    champion alias only where there is none; scored on the recording (--recording) it has best_val_pearson, which
    beats a champion without one; a later unscored import whose original val_acc is 0.99 does not take it."""
    from mlflow.tracking import MlflowClient

    from trainer.inference import load_model

    orig = randomise(original_stacked(drop_p=0.2), seed=5)
    src = save_original(tmp_path / "run" / "test_epoch_7.pt", orig, hyps_for("LinearStackedBNCNN", drop_p=0.2))
    res = run_cli(["import", str(src), "--register", "imported-stacked"], tmp_path, mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered imported-stacked version 1" in res.stdout
    assert "alias champion -> version 1" in res.stdout
    assert "not scored on a recording" in res.stderr
    assert (tmp_path / "imported" / "run" / "best.pt").is_file()

    client = MlflowClient(mlflow_server)
    mv = client.get_model_version("imported-stacked", "1")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["imported_from"] == str(src.resolve())
    assert run.data.tags["imported_epoch"] == "7" and run.data.metrics["best_epoch"] == 8
    assert run.data.params["model_type"] == "LinearStackedBNCNN"
    assert run.data.metrics["original_val_acc"] == pytest.approx(0.51)
    assert run.data.metrics["original_test_pearson"] == pytest.approx(0.42)
    assert "best_val_pearson" not in run.data.metrics and "test_pearson_at_best" not in run.data.metrics
    assert client.get_experiment(run.info.experiment_id).name == "imported"
    assert "best.pt" in {Path(f.path).name for f in client.list_artifacts(mv.run_id, "checkpoints")}
    assert mv.tags["model_type"] == "LinearStackedBNCNN" and mv.tags["dataset"] == DATASET

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    loaded = load_model("models:/imported-stacked/1")
    assert loaded.cell_ids == CELLS and loaded.source == "models:/imported-stacked/1"
    assert_same_outputs(orig, loaded.model)

    # a second import, unscored, becomes version 2 and leaves the champion alone
    worse = save_original(tmp_path / "run2" / "test_epoch_3.pt", orig, hyps_for("LinearStackedBNCNN", drop_p=0.2),
                          val_acc=0.2)
    res = run_cli(["import", str(worse), "--register", "imported-stacked", "--experiment", "lab"], tmp_path,
                  mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered imported-stacked version 2" in res.stdout
    assert "alias champion stays on version 1" in res.stdout

    # scored on our validation split: best_val_pearson, the original's r there, and the alias
    rec = synthetic_recording(tmp_path / "data")
    hyps = hyps_for("LinearStackedBNCNN", drop_p=0.2, **SYNTH)
    scored = save_original(tmp_path / "run3" / "test_epoch_5.pt", orig, hyps, val_acc=0.3)
    res = run_cli(["import", str(scored), "--recording", str(rec), "--register", "imported-stacked"], tmp_path,
                  mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered imported-stacked version 3" in res.stdout
    assert "alias champion -> version 3 (was version 1)" in res.stdout
    run = client.get_run(client.get_model_version("imported-stacked", "3").run_id)
    want_val, want_test = originals_scores(orig, rec)
    assert run.data.metrics["best_val_pearson"] == pytest.approx(want_val, abs=1e-5)
    assert run.data.metrics["test_pearson_at_best"] == pytest.approx(want_test, abs=1e-5)
    assert run.data.metrics["original_val_acc"] == pytest.approx(0.3)

    # the original's leaky 0.99 ranks nothing
    leaky = save_original(tmp_path / "run4" / "test_epoch_9.pt", orig, hyps, val_acc=0.99)
    res = run_cli(["import", str(leaky), "--register", "imported-stacked"], tmp_path, mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered imported-stacked version 4" in res.stdout
    assert "alias champion stays on version 3" in res.stdout
