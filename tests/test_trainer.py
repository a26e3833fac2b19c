"""The Trainer on a small synthetic recording: learning, checkpoints, early stopping, resume, named loops."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SMALL, ListReporter
from trainer import config
from trainer.data.recording import load_data, recording_path
from trainer.errors import UserError
from trainer.launch.local import seed_everything
from trainer.models import build_model, prepare_model
from trainer.training import checkpoint
from trainer.training.trainer import Trainer


@pytest.fixture(scope="module")
def bundle(data_root):
    return load_data(recording_path(data_root, "synth01", "whitenoise"), img_shape=SMALL["img_shape"])


def make(bundle, tmp_path, reporter=None, **overrides):
    cfg = config.resolve({**SMALL, "n_epochs": 3, "lr": 0.01, **overrides})
    seed_everything(cfg["seed"])
    model = build_model(cfg, bundle.n_cells)
    prepare_model(model, cfg, bundle)
    return Trainer(model, bundle, cfg, tmp_path / "run", torch.device("cpu"), reporter=reporter)


def test_loss_falls_and_correlation_rises(bundle, tmp_path):
    rep = ListReporter()
    result = make(bundle, tmp_path, rep, n_epochs=6, early_stopping=0).fit()
    losses = [m["train_loss"] for _, m in rep.epochs]
    assert [e for e, _ in rep.epochs] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0]
    assert result.best_val_pearson > 0.3  # the synthetic cells are predictable from the stimulus
    last = rep.epochs[-1][1]
    for key in ("val_loss", "val_pearson", "test_pearson", "test_loss", "lr", "epoch_seconds", "samples_per_s"):
        assert math.isfinite(last[key])
    assert {f"val_pearson_cell{c}" for c in bundle.cell_ids} <= set(last)
    assert last["val_pearson"] == pytest.approx(
        sum(last[f"val_pearson_cell{c}"] for c in bundle.cell_ids) / bundle.n_cells)


def test_checkpoints_latest_only_by_default_and_best_always(bundle, tmp_path):
    rep = ListReporter()
    make(bundle, tmp_path, rep, n_epochs=3, early_stopping=0).fit()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == ["epoch_0003.pt"]
    best = checkpoint.load(run / "best.pt")
    assert best["epoch"] == best["best_epoch"]
    state = checkpoint.load(run / "epoch_0003.pt")
    for key in ("model", "optimizer", "config", "norm", "cell_ids", "history", "metrics"):
        assert key in state
    assert state["norm"] == {"mean": bundle.stim_mean, "std": bundle.stim_std}
    assert [n for _, n in rep.checkpoints].count("latest.pt") == 3


def test_save_every_epoch_keeps_every_epoch(bundle, tmp_path):
    rep = ListReporter()
    make(bundle, tmp_path, rep, n_epochs=3, early_stopping=0, save_every_epoch=True).fit()
    assert sorted(p.name for p in (tmp_path / "run").glob("epoch_*.pt")) == [
        "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    assert {"epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"} <= {n for _, n in rep.checkpoints}


def test_early_stopping_ends_before_n_epochs(bundle, tmp_path):
    # Nothing can improve after epoch 1: an lr of 1e-30 moves no float32 weight, and without batch norm (whose
    # running statistics move while training) and noise the validation outputs are the same every epoch. So
    # patience 1 stops after epoch 2, on any machine.
    rep = ListReporter()
    result = make(bundle, tmp_path, rep, n_epochs=20, early_stopping=1, lr=1e-30, noise=0.0, bnorm=False).fit()
    assert result.stopped_early and (result.epochs_run, result.best_epoch) == (2, 1)
    assert [e for e, _ in rep.epochs] == [1, 2]


def test_exactly_n_epochs_without_early_stopping(bundle, tmp_path):
    rep = ListReporter()
    result = make(bundle, tmp_path, rep, n_epochs=4, early_stopping=0).fit()
    assert result.epochs_run == 4 and len(rep.epochs) == 4 and not result.stopped_early


def scripted(t, val_r, val_loss):
    """`t` with training and scoring replaced by scripted validation figures (epoch e scores val_r[e - 1] and
    val_loss[e - 1]); everything else, the scheduler's step, early stopping and checkpoints, is the Trainer's own."""
    t.loops = {"train_loop": lambda epoch: {"train_loss": 0.0}}
    t.predict = lambda windows: torch.zeros(len(windows), t.data.n_cells)
    t._check_alive = lambda out: None

    def score_outputs(out, windows):
        e = t.epoch - 1
        return val_loss[e], torch.full((t.data.n_cells,), val_r[e])

    t.score_outputs = score_outputs
    return t


def test_early_stopping_waits_its_patience_after_the_best_epoch(bundle, tmp_path):
    """Patience 3: best at epoch 2, then three epochs without a better r (one of them equal to it) end the run."""
    rep = ListReporter()
    val_r = [0.1, 0.5, 0.4, 0.5, 0.45, 0.9, 0.9, 0.9]
    t = scripted(make(bundle, tmp_path, rep, n_epochs=8, early_stopping=3, scheduler="none"), val_r, [0.0] * 8)
    result = t.fit()
    assert (result.epochs_run, result.best_epoch, result.stopped_early) == (5, 2, True)
    assert [e for e, _ in rep.epochs] == [1, 2, 3, 4, 5]


def test_the_plateau_schedule_steps_on_validation_r_in_max_mode(bundle, tmp_path):
    """ReduceLROnPlateau (the default) watches validation r, not the loss: with r rising every epoch and the loss
    flat the rate stays; with r flat and the loss falling it is cut by scheduler_scale after each patience + 1
    epochs without a relative gain above scheduler_thresh."""
    kw = {"n_epochs": 6, "early_stopping": 0, "scheduler": "ReduceLROnPlateau", "scheduler_patience": 1,
          "scheduler_scale": 0.5, "scheduler_thresh": 0.01}
    rising = ListReporter()
    scripted(make(bundle, tmp_path / "a", rising, **kw), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1.0] * 6).fit()
    assert [m["lr"] for _, m in rising.epochs] == [pytest.approx(0.01)] * 6
    flat = ListReporter()
    scripted(make(bundle, tmp_path / "b", flat, **kw), [0.3] * 6, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]).fit()
    # lr is the rate each epoch trained with: epochs 2 and 3 fail to beat epoch 1, so epoch 4 trains at half
    assert [m["lr"] for _, m in flat.epochs] == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.005, 0.0025])


def test_multistep_schedule_decays_at_its_milestones(bundle, tmp_path):
    t2 = make(bundle, tmp_path, scheduler="MultiStepLR", scheduler_milestones=[1], scheduler_scale=0.1,
              n_epochs=2, early_stopping=0)
    rep = ListReporter()
    t2.reporter = rep
    t2.fit()
    # lr is the rate each epoch trained with: milestone 1 decays it after epoch 1
    assert [m["lr"] for _, m in rep.epochs] == [pytest.approx(0.01), pytest.approx(0.001)]


def test_resume_continues_exactly(bundle, tmp_path):
    """Training 2 epochs, then resuming for 2 more, gives the same weights as 4 epochs straight."""
    straight = make(bundle, tmp_path / "a", n_epochs=4, early_stopping=0)
    straight.fit()
    first = make(bundle, tmp_path / "b", n_epochs=2, early_stopping=0)
    first.fit()
    state = checkpoint.load(tmp_path / "b" / "run" / "epoch_0002.pt")
    second = make(bundle, tmp_path / "c", n_epochs=4, early_stopping=0)
    rep = ListReporter()
    second.reporter = rep
    second.fit(resume=state)
    assert [e for e, _ in rep.epochs] == [3, 4]
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_l1_penalty_is_the_originals_sum_over_batch_and_cells_or_a_mean_per_sample(bundle, tmp_path):
    plain = make(bundle, tmp_path, l1=0.0)
    summed = make(bundle, tmp_path, l1=0.5)
    mean = make(bundle, tmp_path, l1=0.5, l1_per_sample=True)
    x, y = bundle.train.get(torch.arange(64))
    out = summed.model.eval()(x).detach()
    two_out, two_y = torch.cat([out, out]), torch.cat([y, y])

    def extra(t, o, target):
        return (t.batch_loss(o, target) - plain.batch_loss(o, target)).item()

    # the original (training.py: l1 * torch.norm(y, 1)): summed over batch and cells, so it doubles with the batch
    assert extra(summed, out, y) == pytest.approx(0.5 * out.abs().sum().item())
    assert extra(summed, two_out, two_y) == pytest.approx(2 * extra(summed, out, y))
    # l1_per_sample: a mean, the same for a batch twice as large
    assert extra(mean, out, y) == pytest.approx(0.5 * out.abs().mean().item())
    assert extra(mean, two_out, two_y) == pytest.approx(extra(mean, out, y))
    # validation adds the per-sample sum over cells (validate_static: l1 * norm(outs, 1) / n)
    val = summed.predict(bundle.val)
    added = summed.score_outputs(val, bundle.val)[0] - plain.score_outputs(val, bundle.val)[0]
    assert added == pytest.approx(0.5 * val.abs().sum(1).mean().item(), rel=1e-5)


def test_log_poisson_changes_the_loss_on_the_same_outputs(bundle, tmp_path):
    x, y = bundle.train.get(torch.arange(64))
    out = torch.rand(64, bundle.n_cells) + 0.5
    rate = make(bundle, tmp_path, log_poisson=False).batch_loss(out, y)
    log = make(bundle, tmp_path, log_poisson=True).batch_loss(out, y)
    assert log.item() == pytest.approx((out.exp() - y * out).mean().item(), rel=1e-5)
    assert rate.item() == pytest.approx((out - y * torch.log(out + 1e-8)).mean().item(), rel=1e-5)


def test_unknown_train_loop_lists_the_loops(bundle, tmp_path):
    cfg = config.resolve({**SMALL, "train_loop": "nope"})
    with pytest.raises(UserError, match="unknown train_loop 'nope': available: train_loop"):
        Trainer(build_model(cfg, bundle.n_cells), bundle, cfg, tmp_path, torch.device("cpu"))


def test_divergence_is_a_clear_error(bundle, tmp_path):
    t = make(bundle, tmp_path, lossfxn="MSELoss", lr=1e12, bnorm=False, softplus=False)
    with pytest.raises(UserError, match="lower lr"):
        t.fit()


def test_lossfxn_selects_the_loss(bundle, tmp_path):
    out = torch.rand(32, bundle.n_cells) + 0.5
    y = torch.rand(32, bundle.n_cells) * 3
    mse = make(bundle, tmp_path, lossfxn="MSELoss").batch_loss(out, y)
    assert mse.item() == pytest.approx(((out - y) ** 2).mean().item(), rel=1e-6)
    poisson = make(bundle, tmp_path, lossfxn="PoissonNLLLoss").batch_loss(out, y)
    assert poisson.item() != pytest.approx(mse.item())


def test_batch_size_sets_the_number_of_optimiser_steps(bundle, tmp_path):
    for batch_size in (64, 500):
        t = make(bundle, tmp_path, batch_size=batch_size)
        steps = []
        t.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
        t.train_loop(1)
        assert len(steps) == len(bundle.train) // batch_size  # a last partial batch is dropped, as the original


def test_lr_and_l2_set_adams_step_and_weight_decay(bundle, tmp_path):
    """One optimiser step equals torch's Adam with lr and weight_decay l2 on the same gradients (float64)."""
    t = make(bundle, tmp_path, lr=0.0123, l2=0.004)
    t.model.double()  # the optimiser holds the same Parameter objects, now float64
    reference = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    ref_params = [torch.nn.Parameter(v.clone()) for v in reference.values()]
    ref_opt = torch.optim.Adam(ref_params, lr=0.0123, weight_decay=0.004)
    x, y = bundle.train.get(torch.arange(32))
    t.model.train()
    torch.manual_seed(0)
    t.optimizer.zero_grad()
    t.batch_loss(t.model(x.double()), y.double()).backward()
    for p, (_, q) in zip(ref_params, t.model.named_parameters()):
        p.grad = None if q.grad is None else q.grad.clone()
    t.optimizer.step()
    ref_opt.step()
    for p, (k, q) in zip(ref_params, t.model.named_parameters()):
        assert torch.equal(p, q), k
    moved = [k for k, q in t.model.named_parameters() if not torch.equal(q, reference[k])]
    assert moved and t.optimizer.param_groups[0]["lr"] == 0.0123


def test_bf16_precision_runs_the_forward_pass_in_bfloat16(bundle, tmp_path):
    dtypes = {}
    for precision in ("fp32", "bf16"):
        t = make(bundle, tmp_path, precision=precision, n_epochs=1, early_stopping=0)
        seen = []
        t.model.conv1.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        result = t.fit()
        dtypes[precision] = set(seen)
        assert math.isfinite(result.best_val_pearson)
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}


def test_tf32_flags_hold_during_training_and_are_restored(bundle, tmp_path):
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    during = []
    t = make(bundle, tmp_path, precision="tf32", n_epochs=1)
    t.on_epoch = lambda e, m: during.append((torch.backends.cudnn.allow_tf32,
                                             torch.backends.cuda.matmul.allow_tf32))
    t.fit()
    assert during == [(True, True)]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_compile_wraps_the_forward_and_keeps_plain_checkpoints(bundle, tmp_path):
    t = make(bundle, tmp_path, compile=True)
    assert t.forward is not t.model and getattr(t.forward, "_orig_mod", None) is t.model
    plain = make(bundle, tmp_path)
    assert plain.forward is plain.model
    assert not any(k.startswith("_orig_mod") for k in t.model.state_dict())
