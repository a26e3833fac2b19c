"""Defaults reproduce the original torchdeepretina (docs/differences.md): each row of that table that is a default
or a switch has a test here or is named in the table with the test that holds it."""

from __future__ import annotations

import math

import h5py
import pytest
import torch
from torch import nn

from conftest import SMALL
from trainer import config
from trainer.data.cells import ORIGINAL_CELLS
from trainer.data.recording import load_data, recording_path
from trainer.data.synth import write_synthetic
from trainer.errors import ConfigError, DataError
from trainer.launch.local import seed_everything
from trainer.models import build_model, init_output_rates, output_shift, prepare_model
from trainer.models.layers import Exponential
from trainer.training.trainer import Trainer, as_rates, make_scheduler

FULL = {"chans": [8, 8], "ksizes": [15, 11, 11], "img_shape": [40, 50, 50]}
MODEL_TYPES = [m for m in config.MODEL_TYPES if m != "RevCorLN"]  # trained ones; RevCorLN is fitted: test_revcor.py


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def bundle(data_root):
    return load_data(recording_path(data_root, "synth01", "whitenoise"), img_shape=SMALL["img_shape"])


# ---- architectures ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, count", [
    # conv 40x8x15x15+8, BN over 8x36x36 (weight, bias), conv 8x8x11x11+8, BN over 8x26x26, linear 5408x5, BN(5)
    ({"model_type": "BNCNN", "bnorm_d": 1}, 72008 + 20736 + 7752 + 10816 + 27040 + 10),
    ({"model_type": "BNCNN", "bnorm_d": 2}, 72008 + 16 + 7752 + 16 + 27040 + 10),
    # 3x3 stacks: 40x8x9 + 6 x 8x8x9 + 8 and 5 x 8x8x9 + 8; positive-scale batch norms as above
    ({"model_type": "LinearStackedBNCNN", "bnorm_d": 1}, 6344 + 20736 + 2888 + 10816 + 27040 + 10),
    ({"model_type": "LinearStackedBNCNN", "bnorm_d": 2}, 6344 + 16 + 2888 + 16 + 27040 + 10),
    # config.json (4fdcfbf): VaryModel, stacks, bnorm_d 2, convgc: GC conv 8x5x11x11 without bias
    ({"model_type": "VaryModel", "bnorm_d": 2, "convgc": True}, 6344 + 16 + 2888 + 16 + 4840 + 10),
    # hyperparams.json (5c2af72): RetinotopicModel, plain convs [15, 12, 9], bnorm_d 2: the per-cell conv has a
    # bias, batch norm per cell channel, one-hot maps over the 17x17 positions
    ({"model_type": "RetinotopicModel", "bnorm_d": 2, "stackconvs": False, "ksizes": [15, 12, 9]},
     72008 + 16 + 9224 + 16 + 3245 + 10 + 5 * 17 * 17),
    ({"model_type": "LN"}, 40 * 50 * 50 * 5 + 5),
])
def test_parameter_counts_equal_the_originals(overrides, count):
    """Trainable parameters for 5 cells, counted from the original's layer lists (models.py); the running
    statistics of batch norm are not trainable (the original's AbsBatchNorm kept them as Parameters without
    gradients)."""
    assert trainable(build_model(config.resolve({**FULL, **overrides}), 5)) == count


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_batch_norm_uses_the_originals_eps(model_type):
    model = build_model(config.resolve({**SMALL, "model_type": model_type, "convgc": model_type == "VaryModel"}), 3)
    norms = batch_norms(model)
    assert (model_type == "LN") == (not norms)
    assert all(bn.eps == 1e-3 for bn in norms)


@pytest.mark.parametrize("model_type", ["BNCNN", "LinearStackedBNCNN", "VaryModel"])
def test_softplus_off_is_the_originals_exponential(model_type):
    """Identity while training (the loss takes log rates), exp at evaluation (custom_modules.py: Exponential)."""
    model = build_model(config.resolve({**SMALL, "model_type": model_type, "softplus": False, "noise": 0.0}), 3)
    assert isinstance(model.out_act, Exponential)
    x = torch.randn(16, *SMALL["img_shape"])
    model.eval()
    before = model.bn_out(model.readout(torch.flatten(_hidden(model, x), 1)))
    assert torch.allclose(model(x), before.exp())
    act = model.out_act.train()
    z = torch.randn(5, 3)
    assert torch.equal(act(z), z)


def _hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "hidden"):
        for block in model.hidden:
            x = block(x)
        return x
    x = model.act1(model.noise1(model.bn1(model.conv1(x))))
    return model.act2(model.noise2(model.bn2(model.conv2(x))))


def test_retinotopic_models_rates_and_one_hot_as_the_original():
    """conv with `bias` -> positive batch norm -> softplus -> one-hot read-out; softplus cannot be turned off."""
    cfg = config.resolve({**SMALL, "model_type": "RetinotopicModel", "softplus": False, "gc_bias": False})
    model = build_model(cfg, 3).eval()
    assert model.gc_conv.bias is not None  # from bias, not gc_bias
    assert isinstance(model.out_act, nn.Softplus) and not hasattr(model, "bn_out")
    x = torch.randn(8, *SMALL["img_shape"])
    with torch.no_grad():
        model.gc_bn.weight.copy_(-torch.rand(3) - 0.5)  # a negative raw scale acts as its absolute value
        maps = nn.functional.softplus(model.gc_bn(model.gc_conv(_hidden(model, x))))
        assert (maps >= 0).all()
        expected = (maps.flatten(2) * model.onehot_probs()).sum(2)
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_vary_models_output_batch_norm_is_positive_scale():
    cfg = config.resolve({**SMALL, "model_type": "VaryModel"})
    model = build_model(cfg, 3).eval()
    x = torch.randn(8, *SMALL["img_shape"])
    with torch.no_grad():
        out = model(x)
        model.bn_out.weight.neg_()
        assert torch.allclose(model(x), out)


@pytest.mark.parametrize("model_type", ["BNCNN", "LinearStackedBNCNN"])
def test_convgc_reads_each_cell_at_its_own_position_in_bncnn_models(model_type):
    cfg = config.resolve({**SMALL, "model_type": model_type, "convgc": True, "bnorm": False, "noise": 0.0})
    model = build_model(cfg, 3).eval()
    assert model.gc_conv.out_channels == 3 and model.gc_conv.kernel_size == (3, 3) and not hasattr(model, "readout")
    chosen = torch.tensor([[0, 0], [2, 1], [1, 2]])
    model.positions.copy_(chosen)
    x = torch.randn(4, *SMALL["img_shape"])
    maps = model.gc_conv(_hidden(model, x))
    out = model(x)
    for cell, (r, c) in enumerate(chosen.tolist()):
        assert torch.allclose(out[:, cell], nn.functional.softplus(maps[:, cell, r, c]))


def test_convgc_needs_a_third_kernel_size():
    with pytest.raises(ConfigError, match="3 ksizes"):
        build_model(config.resolve({**SMALL, "model_type": "BNCNN", "convgc": True, "ksizes": [5, 3]}), 3)


def test_ln_has_the_originals_dropout_and_elu():
    model = build_model(config.resolve({**SMALL, "model_type": "LN", "drop_p": 0.2, "softplus": False}), 3)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.2 and isinstance(model.out_act, nn.ELU)


def test_even_kernels_need_plain_convolutions_as_in_the_original():
    """The original's LinearStackedConv2d asserts an odd kernel size; plain convolutions take any size."""
    with pytest.raises(ConfigError, match="odd"):
        build_model(config.resolve({**SMALL, "model_type": "VaryModel", "ksizes": [6, 3, 3]}), 3)
    build_model(config.resolve({**SMALL, "model_type": "VaryModel", "ksizes": [6, 3, 3], "stackconvs": False}), 3)


# ---- output scale at the start ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("log_poisson", [False, True])
def test_outputs_start_at_each_cells_mean_rate(bundle, model_type, log_poisson):
    overrides = {**SMALL, "model_type": model_type, "noise": 0.0, "log_poisson": log_poisson,
                 "softplus": not log_poisson}
    cfg = config.resolve(overrides)
    seed_everything(0)
    model = build_model(cfg, bundle.n_cells)
    prepare_model(model, cfg, bundle)
    rates = bundle.train.targets.double().mean(0)
    x, _ = bundle.train.get(torch.arange(512))
    with torch.no_grad():
        out = as_rates(cfg, model.eval()(x)) if not log_poisson else model.train()(x).exp()
    start = out.double().mean(0)
    # within a factor of 2 of each cell's rate (the activation is applied to a spread of inputs around the shift)
    assert ((start / rates) > 0.5).all() and ((start / rates) < 2).all(), (start, rates)

    seed_everything(0)
    plain = build_model(config.resolve({**overrides, "init_output_rate": False}), bundle.n_cells)
    with torch.no_grad():
        shift = output_shift(plain)
        assert shift is not None and not torch.allclose(shift, output_shift(model))


def test_a_model_without_an_output_shift_starts_as_built(bundle):
    model = build_model(config.resolve({**SMALL, "bnorm": False, "gc_bias": False}), bundle.n_cells)
    assert output_shift(model) is None
    assert init_output_rates(model, torch.ones(bundle.n_cells), False) is False


# ---- cells: "all" ------------------------------------------------------------------------------------------------

def test_all_cells_means_the_originals_list_for_its_recordings(tmp_path):
    write_synthetic(tmp_path, "15-11-21a", "whitenoise", n_cells=16, size=12, train_frames=600, test_frames=200,
                    n_repeats=2, history=10, seed=0)
    data = load_data(recording_path(tmp_path, "15-11-21a", "whitenoise"), img_shape=SMALL["img_shape"])
    assert data.cell_ids == list(ORIGINAL_CELLS["15-11-21a"]) == [6, 10, 12, 13]
    assert "original's list for 15-11-21a" in data.cells_source
    # a recording the original did not know: every row, or the list the file names
    path = write_synthetic(tmp_path, "mine", "whitenoise", n_cells=4, size=12, train_frames=600, test_frames=200,
                           n_repeats=2, history=10, seed=0)
    assert load_data(path, img_shape=SMALL["img_shape"]).cell_ids == [0, 1, 2, 3]
    with h5py.File(path, "a") as f:
        f.attrs["cells"] = [3, 1]
    data = load_data(path, img_shape=SMALL["img_shape"])
    assert data.cell_ids == [3, 1] and "'cells' attribute" in data.cells_source


def test_the_originals_list_must_fit_the_recording(tmp_path):
    write_synthetic(tmp_path, "15-11-21a", "whitenoise", n_cells=8, size=12, train_frames=600, test_frames=200,
                    n_repeats=2, history=10, seed=0)
    with pytest.raises(DataError, match=r"cells \[10, 12, 13\] \(from the original's list for 15-11-21a"):
        load_data(recording_path(tmp_path, "15-11-21a", "whitenoise"), img_shape=SMALL["img_shape"])


# ---- training regime ---------------------------------------------------------------------------------------------

def test_schedules_have_the_originals_settings():
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    plateau = make_scheduler(config.resolve({}), opt)
    assert (plateau.mode, plateau.patience, plateau.threshold, plateau.threshold_mode, plateau.factor) == (
        "max", 10, 0.01, "rel", 0.5)
    steps = make_scheduler(config.resolve({"scheduler": "MultiStepLR"}), opt)
    assert sorted(steps.milestones) == [10, 20, 30] and steps.gamma == 0.1
    assert make_scheduler(config.resolve({"scheduler": "none"}), opt) is None
    assert config.resolve({})["early_stopping"] == 0  # the original trained n_epochs


def _shipped(name: str) -> dict:
    from test_original_configs import CONFIGS, label

    entry = next(e for e in CONFIGS if label(e) == name)
    return config.parse_hyperparams(entry["content"], name).values


def _stepped(cfg: dict, epochs: list[dict[str, float]]) -> list[float]:
    """The lr of each epoch under make_scheduler(cfg), stepped after each epoch as Trainer.scored steps it."""
    from trainer.training.trainer import OriginalSchedule

    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg["lr"])
    schedule = make_scheduler(cfg, opt)
    assert isinstance(schedule, OriginalSchedule)
    lrs = []
    for metrics in epochs:
        lrs.append(opt.param_groups[0]["lr"])
        schedule.step(metrics)
    return lrs


def test_scheduler_original_reproduces_the_labs_learning_rate_for_its_shipped_vary_model_config():
    """config.json @4fdcfbf (VaryModel, 50 epochs, ReduceLROnPlateau scale 0.5, patience 6, thresh 0.01) under
    scheduler_original 507decb: the per-epoch lr equals a re-creation of that commit's calls (get_optim_objs:
    ReduceLROnPlateau(optimizer, 'min', factor=scheduler_scale, patience, threshold); train_loop:
    scheduler.step(val_acc)), and with r rising it halves every patience + 1 epochs: six times within the 50
    epochs, the seventh after the last (the original's extra 51st epoch, docs/differences.md, trained at lr / 128)."""
    hyps = _shipped("config.json@4fdcfbf")
    cfg = config.resolve({**hyps, "scheduler_original": "507decb"})
    val_r = 0.3 + torch.linspace(0, 0.4, cfg["n_epochs"], dtype=torch.float64)  # r rising, as training does
    val_r[20] -= 0.2  # one bad epoch: a drop below best x (1 - thresh) counts as an improvement in min mode
    ours = _stepped(cfg, [{"val_pearson": float(r), "val_loss": 1.0, "train_loss": 1.0} for r in val_r])

    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=hyps["lr"])
    original = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=hyps["scheduler_scale"],
                                                          patience=hyps["scheduler_patience"],
                                                          threshold=hyps["scheduler_thresh"])
    recreated = []
    for r in val_r.tolist():
        recreated.append(opt.param_groups[0]["lr"])
        original.step(r)
    assert ours == recreated
    plain = _stepped(cfg, [{"val_pearson": 0.3 + 0.01 * e} for e in range(cfg["n_epochs"])])
    decays = [e + 1 for e in range(1, len(plain)) if plain[e] < plain[e - 1]]  # 1-based epochs that start lower
    assert decays == [9, 16, 23, 30, 37, 44] and plain[-1] == pytest.approx(hyps["lr"] / 64)  # the 7th after 50
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=hyps["lr"])
    assert make_scheduler(config.resolve(hyps), opt).mode == "max"  # ours by default: the fix


def test_scheduler_original_eras_step_what_their_commit_stepped():
    """5c2af72: the plateau factor fixed at 0.1 (scheduler_scale ignored); its retinotopic_loop steps MultiStepLR
    with the training loss as its epoch. 507decb's train_loop steps MultiStepLR with the validation r as its epoch
    (never past a milestone); its retinotopic_loop once per epoch. 003f581: min mode on the validation loss."""
    retino = _shipped("hyperparams.json@5c2af72")  # RetinotopicModel, MultiStepLR [5, 15, 25]
    assert (retino["train_loop"], retino["scheduler"], retino["scheduler_milestones"]) == (
        "retinotopic_loop", "MultiStepLR", [5, 15, 25])
    cfg = config.resolve({**retino, "scheduler_original": "5c2af72"})
    losses = [3.0, 6.0, 16.0, 2.0, 30.0]
    lrs = _stepped(cfg, [{"train_loss": v, "val_pearson": 0.5} for v in losses])
    lr = cfg["lr"]
    assert lrs == pytest.approx([lr, lr, lr * 0.1, lr * 0.01, lr])  # each epoch's lr: gamma^(milestones <= loss)

    epochs = [{"train_loss": 1.0, "val_pearson": 0.2 + 0.1 * e} for e in range(8)]
    newest = config.resolve({**retino, "scheduler_original": "507decb", "train_loop": "train_loop",
                             "model_type": "BNCNN", "scheduler_milestones": [1, 2]})
    assert _stepped(newest, epochs) == [lr] * 8  # step(val_acc): r < 1 is before every milestone
    newest_retino = config.resolve({**newest, "train_loop": "retinotopic_loop"})
    assert _stepped(newest_retino, epochs) == pytest.approx([lr, lr * 0.1] + [lr * 0.01] * 6)

    plateau = {**retino, "scheduler": "ReduceLROnPlateau", "scheduler_scale": 0.5, "scheduler_patience": 1,
               "train_loop": "train_loop", "model_type": "BNCNN"}
    rising = [{"val_pearson": 0.2 + 0.1 * e, "val_loss": 1.0, "train_loss": 1.0} for e in range(4)]
    assert _stepped(config.resolve({**plateau, "scheduler_original": "5c2af72"}), rising) == pytest.approx(
        [lr, lr, lr, lr * 0.1])  # factor 0.1, not scheduler_scale
    assert _stepped(config.resolve({**plateau, "scheduler_original": "507decb"}), rising) == pytest.approx(
        [lr, lr, lr, lr * 0.5])
    falling_loss = [{"val_pearson": 0.5, "val_loss": 1.0 - 0.1 * e, "train_loss": 1.0} for e in range(13)]
    oldest = _stepped(config.resolve({**plateau, "scheduler_original": "003f581"}), falling_loss)
    assert oldest == [lr] * 13  # the validation loss improves: no decay, whatever the correlation does
    flat_loss = [{"val_pearson": 0.5, "val_loss": 1.0, "train_loss": 1.0}] * 13
    assert _stepped(config.resolve({**plateau, "scheduler_original": "003f581"}), flat_loss)[-1] == \
        pytest.approx(lr * 0.1)  # patience 10 (torch's default), factor 0.1
    with pytest.raises(ConfigError, match="003f581 always built ReduceLROnPlateau"):
        config.check_run(config.resolve({**plateau, "scheduler": "MultiStepLR", "scheduler_original": "003f581"}),
                         "hp.json")


def test_the_trainer_steps_the_original_schedule_with_its_own_epoch_metrics(bundle, tmp_path):
    """In a real run the Trainer feeds the schedule each epoch's validation r: its logged lr per epoch equals the
    re-created original stepped with the same logged r."""
    cfg = config.resolve({**SMALL, "n_epochs": 5, "scheduler_original": "507decb", "scheduler_patience": 1,
                          "lr": 0.01})
    seed_everything(0)
    result = Trainer(build_model(cfg, bundle.n_cells), bundle, cfg, tmp_path, torch.device("cpu")).fit()
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg["lr"])
    original = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=0.5, patience=1, threshold=0.01)
    recreated = []
    for row in result.history:
        recreated.append(opt.param_groups[0]["lr"])
        original.step(row["val_pearson"])
    assert [row["lr"] for row in result.history] == recreated and min(recreated) < cfg["lr"]


def test_validation_scores_every_sample_not_only_full_batches_of_500(bundle, tmp_path):
    """The original scored validation in batches of 500 and dropped the rest (datas.py: val_sample @507decb yields
    n // 500 batches): a validation stretch under 500 samples was never scored. Ours scores every sample."""
    from trainer.training.metrics import pearson_per_cell

    cfg = config.resolve({**SMALL, "n_epochs": 1})
    t = Trainer(build_model(cfg, bundle.n_cells), bundle, cfg, tmp_path, torch.device("cpu"))
    n = len(bundle.val)
    assert n % 500 != 0
    out = t.predict(bundle.val)
    assert out.shape[0] == n
    _, r = t.score(bundle.val)
    assert torch.equal(r, pearson_per_cell(as_rates(cfg, out), bundle.val.targets))
    assert not torch.equal(r, pearson_per_cell(as_rates(cfg, out[:-1]), bundle.val.targets[:-1]))


def test_semantic_l1_is_the_mean_over_cells_of_each_cells_l1_norm(bundle, tmp_path):
    cfg = config.resolve({**SMALL, "model_type": "RetinotopicModel", "train_loop": "retinotopic_loop"})
    assert cfg["semantic_scale"] == 10.0  # the original's default
    model = build_model(cfg, bundle.n_cells)
    t = Trainer(model, bundle, cfg, tmp_path, torch.device("cpu"))
    weights = model.onehot_weights()
    _, term = t._onehot_penalties()["onehot_l1"]
    assert term.item() == pytest.approx(weights.abs().sum(1).mean().item())
    assert term.item() == pytest.approx(weights.shape[1] * weights.abs().mean().item())


def test_a_last_batch_of_one_sample_is_dropped_not_fatal(bundle, tmp_path):
    """Batch norm cannot train on one sample; the original dropped every last partial batch (n // batch_size)."""
    batch = len(bundle.train) - 1  # leaves exactly one sample over
    cfg = config.resolve({**SMALL, "batch_size": batch, "n_epochs": 1})
    model = build_model(cfg, bundle.n_cells)
    t = Trainer(model, bundle, cfg, tmp_path, torch.device("cpu"))
    steps = []
    t.optimizer.register_step_post_hook(lambda *a: steps.append(1))
    result = t.fit()
    assert len(steps) == 1 and math.isfinite(result.best_val_pearson)


def test_correlation_under_log_poisson_is_of_rates():
    out = torch.randn(6, 3)
    log_cfg = config.resolve({"log_poisson": True})
    assert torch.equal(as_rates(log_cfg, out), out.exp())
    # softplus off: the evaluated model already ends in the original's exp; no second exp
    assert torch.equal(as_rates(config.resolve({"log_poisson": True, "softplus": False}), out), out)
    assert torch.equal(as_rates(config.resolve({}), out), out)


def test_the_test_split_comes_from_the_same_data_root(tmp_path):
    """The original read the test split from ~/experiments/data whatever datapath said, and scored r 0."""
    path = write_synthetic(tmp_path / "elsewhere", "15-10-07", "naturalscene", n_cells=5, size=12,
                           train_frames=600, test_frames=300, n_repeats=2, history=10, seed=0)
    data = load_data(recording_path(tmp_path / "elsewhere", "15-10-07", "naturalscene"),
                     img_shape=SMALL["img_shape"])
    assert data.path == path and len(data.test) == 300 - SMALL["img_shape"][0]
    with h5py.File(path) as f:
        rates = f["test/response/firing_rate_10ms"][()][:, SMALL["img_shape"][0]:].T
    assert torch.allclose(data.test.targets.double(), torch.from_numpy(rates), atol=1e-4)


def test_device_auto_uses_cuda_when_present_else_the_cpu():
    from trainer.errors import UserError
    from trainer.training.trainer import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available here"):
            resolve_device("cuda:0")
