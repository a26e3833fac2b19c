"""Packing: K runs trained together on one batch stream give each member the run it would have had alone."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import SMALL, ListReporter
from trainer import config
from trainer.data.recording import load_data, recording_path
from trainer.data.windows import WindowSet
from trainer.errors import ConfigError
from trainer.launch.local import seed_everything
from trainer.models import build_model, prepare_model
from trainer.pack_rule import PACK_MEMBER_KEYS, pack_conflict, pack_key
from trainer.search import plan_packs
from trainer.training import checkpoint
from trainer.training.packed import PackedTrainer, StackedModels
from trainer.training.trainer import FitResult, Trainer, TrainingDiverged

# noise 0: the pack shares one random stream for its noise layers, so noisy members differ from solo runs.
BASE = {**SMALL, "n_epochs": 3, "noise": 0.0, "early_stopping": 0, "shuffle": True, "seed": 7}
MEMBERS = [{"lr": 0.01, "seed": 7}, {"lr": 0.003, "l2": 1e-3, "seed": 11}, {"lr": 0.02, "l1": 1e-3, "seed": 5}]

# How close a packed member and its solo run must be. Both compute the same sums in another order (the pack's
# convolution is one fused convolution over K members), so they differ by rounding, and how that rounding falls
# depends on the CPU's vector kernels (AVX2, AVX512, AMX). Over many steps float32 rounding is not a stable thing
# to compare: a conv bias under batch norm has a true gradient of 0, and Adam turns its float32 rounding noise
# (about 1e-9, near Adam's eps of 1e-8) into steps of +-lr. So:
# * runs of several epochs are compared in float64, where rounding (about 1e-16 of a gradient) lies eight orders
#   below Adam's eps and cannot be turned into steps. Measured: packed and solo runs agree to 2e-9 (metrics) and
#   2e-7 (weights, relative to each tensor's largest entry); a pack that is wrong by a 1% learning rate or by
#   1e-3 of a neighbour's gradient is off by more than 1e-2 (test_the_comparison_catches_a_wrong_pack). TOL64 sits
#   between, two orders from each side.
# * the float32 and bf16 paths are compared one step at a time against the same step in float64.
TOL64 = 1e-5
U32 = 2.0 ** -24  # float32 unit roundoff
# What one step may be off from float64, whatever a solo step happened to be off: in float32 2^10 roundoffs (sums
# of up to ~1e3 terms); in bf16, whose inputs and weights are rounded to 8 bits (roundoff 2^-8) and summed in
# float32, 4 roundoffs.
FLOOR = {"fp32": 2**10 * U32, "bf16": 4 * 2.0**-8}


@pytest.fixture(scope="module")
def bundle(data_root):
    return load_data(recording_path(data_root, "synth01", "whitenoise"), img_shape=SMALL["img_shape"])


@pytest.fixture(scope="module")
def bundle64(data_root):
    return load_data(recording_path(data_root, "synth01", "whitenoise"), img_shape=SMALL["img_shape"],
                     dtype=torch.float64)


def make(bundle, folder, overrides, batch_seed=None):
    """A Trainer built as the launcher builds one (seeded by its own seed), in the dtype of the bundle's samples;
    `batch_seed` sets its batch order."""
    cfg = config.resolve({**BASE, **overrides})
    seed_everything(cfg["seed"])
    model = build_model(cfg, bundle.n_cells)
    prepare_model(model, cfg, bundle)
    model = model.to(bundle.train.rates.dtype)
    t = Trainer(model, bundle, cfg, folder, torch.device("cpu"), reporter=ListReporter())
    if batch_seed is not None:
        t.shuffle_gen = torch.Generator().manual_seed(batch_seed)
    return t


def run_pack(bundle, tmp_path, members, resumes=None, sub="pack", fault=None):
    """Train `members` as one pack; `fault(trainers)`, when given, breaks the pack on purpose before it trains."""
    trainers = [make(bundle, tmp_path / sub / str(i), m) for i, m in enumerate(members)]
    done: dict[int, FitResult | Exception] = {}
    order: list[int] = []

    def on_done(i, outcome):
        assert i not in done, "on_done called twice for one member"
        done[i] = outcome
        order.append(i)

    packed = PackedTrainer(trainers)
    if fault is not None:
        fault(trainers)
    packed.fit(resumes or [None] * len(trainers), on_done)
    assert sorted(done) == list(range(len(members)))
    return trainers, done, order


def solo(bundle, tmp_path, member, batch_seed, name):
    t = make(bundle, tmp_path / "solo" / name, member, batch_seed=batch_seed)
    return t, t.fit()


def history_deviation(a, b) -> float:
    """Largest relative difference between two runs' per-epoch metrics (relative to max(1, |value|))."""
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b]
    keys = ("train_loss", "val_loss", "val_pearson", "test_pearson", "lr")
    return max(abs(ha[k] - hb[k]) / max(1.0, abs(hb[k])) for ha, hb in zip(a, b) for k in keys)


def weight_deviation(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest difference between two models' float tensors, relative to each tensor's largest entry."""
    devs = []
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert x.shape == y.shape, k
        if x.dtype.is_floating_point:
            devs.append(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item())
    return max(devs)


def close_history(a, b, tol=TOL64):
    assert history_deviation(a, b) < tol, (history_deviation(a, b), a, b)


# Member 2 stops after 2 epochs: member 0 and 1 then go on in a pack of 2 (restacked), still equal to solo.
MEMBERS64 = [MEMBERS[0], MEMBERS[1], {**MEMBERS[2], "n_epochs": 2}]


def test_each_member_trains_as_it_would_alone_with_the_packs_batch_order(bundle64, tmp_path):
    # float64, default settings (bias on): see TOL64
    trainers, done, _ = run_pack(bundle64, tmp_path, MEMBERS64)
    for i, member in enumerate(MEMBERS64):
        alone, result = solo(bundle64, tmp_path, member, batch_seed=MEMBERS64[0]["seed"], name=str(i))
        packed = done[i]
        assert isinstance(packed, FitResult)
        assert packed.epochs_run == member.get("n_epochs", BASE["n_epochs"])
        close_history(packed.history, result.history)
        assert packed.best_epoch == result.best_epoch
        assert weight_deviation(trainers[i].model, alone.model) < TOL64, i
    # the members really differ: different seeds and learning rates give different weights
    w = [t.model.conv1.weight for t in trainers]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[0], w[2])
    # training moved the weights away from their initial values
    seed_everything(MEMBERS[0]["seed"])
    init = build_model(config.resolve({**BASE, **MEMBERS[0]}), bundle64.n_cells).double()
    assert (trainers[0].model.conv1.weight - init.conv1.weight).abs().max() > 1e-3


def _wrong_lr(trainers):
    """A pack that hands member 1 a learning rate 1% off its own."""
    trainers[1].optimizer.param_groups[0]["lr"] *= 1.01


def _neighbours_gradient(monkeypatch):
    """A pack whose member 1 gets 1e-3 of member 0's gradient mixed into its own."""
    scatter = StackedModels.scatter_grads

    def leaky(self):
        scatter(self)
        if len(self.models) > 1:
            for p, q in zip(self.models[1].parameters(), self.models[0].parameters()):
                p.grad = p.grad + 1e-3 * q.grad

    monkeypatch.setattr(StackedModels, "scatter_grads", leaky)


@pytest.mark.parametrize("fault", ["wrong_lr", "neighbours_gradient"])
def test_the_comparison_catches_a_wrong_pack(bundle64, tmp_path, monkeypatch, fault):
    """The float64 comparison above is sharp: a pack broken on purpose in a small way fails it by far."""
    if fault == "neighbours_gradient":
        _neighbours_gradient(monkeypatch)
    members = MEMBERS[:2]
    trainers, done, _ = run_pack(bundle64, tmp_path, members, fault=_wrong_lr if fault == "wrong_lr" else None)
    results = [solo(bundle64, tmp_path, m, batch_seed=members[0]["seed"], name=str(i)) for i, m in enumerate(members)]
    assert history_deviation(done[0].history, results[0][1].history) < TOL64  # the untouched member is fine
    assert history_deviation(done[1].history, results[1][1].history) > 100 * TOL64
    assert weight_deviation(trainers[1].model, results[1][0].model) > 100 * TOL64


def test_members_stop_on_their_own_and_the_rest_go_on(bundle, tmp_path):
    # Member 1 cannot improve: an lr of 1e-30 moves no float32 weight, and without batch norm (whose running
    # statistics move while training) its validation outputs, and so its r, are the same every epoch. With a
    # patience of 1 it stops after epoch 2, on any machine. Member 2 ends at its n_epochs; member 0 trains on.
    members = [{"lr": 0.01, "n_epochs": 6, "seed": 7},
               {"lr": 1e-30, "n_epochs": 6, "early_stopping": 1, "seed": 3},
               {"lr": 0.005, "n_epochs": 2, "seed": 4}]
    members = [{**m, "bnorm": False} for m in members]
    start = make(bundle, tmp_path / "init", members[1]).model.state_dict()
    trainers, done, order = run_pack(bundle, tmp_path, members)
    assert isinstance(done[1], FitResult) and done[1].stopped_early
    assert (done[1].epochs_run, done[1].best_epoch) == (2, 1)
    assert done[1].history[0]["val_pearson"] == done[1].history[1]["val_pearson"]
    assert all(torch.equal(v, start[k]) for k, v in trainers[1].model.state_dict().items())
    assert [done[0].epochs_run, done[2].epochs_run] == [6, 2]
    assert not done[2].stopped_early and not done[0].stopped_early
    assert order[-1] == 0  # the long-running member is handed on last
    # each member reported its own epochs; the pack shrank to member 0 alone after epoch 2
    assert [e for e, _ in trainers[0].reporter.epochs] == [1, 2, 3, 4, 5, 6]
    assert [e for e, _ in trainers[1].reporter.epochs] == [1, 2]
    assert [e for e, _ in trainers[2].reporter.epochs] == [1, 2]
    assert [m["pack_size"] for _, m in trainers[0].reporter.epochs] == [3, 3, 1, 1, 1, 1]
    # each member's checkpoints end where it ended: its last epoch, and its best
    for i, (last, best) in enumerate([(6, done[0].best_epoch), (2, 1), (2, done[2].best_epoch)]):
        assert checkpoint.load(checkpoint.latest(tmp_path / "pack" / str(i)))["epoch"] == last
        assert checkpoint.load(tmp_path / "pack" / str(i) / checkpoint.BEST)["epoch"] == best
    # member 0 went on training after the others left: its outputs changed from epoch to epoch
    assert len({h["val_pearson"] for h in done[0].history[2:]}) == 4


def test_a_diverging_member_fails_alone(bundle, tmp_path):
    trainers = [make(bundle, tmp_path / str(i), m) for i, m in enumerate(MEMBERS[:2])]
    with torch.no_grad():
        trainers[1].model.readout.weight.fill_(math.nan)
    done = {}
    PackedTrainer(trainers).fit([None, None], lambda i, o: done.__setitem__(i, o))
    assert isinstance(done[1], TrainingDiverged) and "lower lr" in str(done[1])
    assert isinstance(done[0], FitResult) and done[0].epochs_run == 3
    assert math.isfinite(done[0].best_val_pearson) and done[0].best_val_pearson > 0.1


def test_member_checkpoints_hold_only_their_own_tensors(bundle, tmp_path):
    trainers, done, _ = run_pack(bundle, tmp_path, MEMBERS)
    alone, _ = solo(bundle, tmp_path, MEMBERS[1], batch_seed=7, name="size")
    packed_file = tmp_path / "pack" / "1" / checkpoint.BEST
    solo_file = tmp_path / "solo" / "size" / checkpoint.BEST
    # a view of the stacked tensors would write all three members' storage into each file
    assert packed_file.stat().st_size < 1.2 * solo_file.stat().st_size
    state = checkpoint.load(packed_file)
    model = build_model(config.resolve({**BASE, **MEMBERS[1]}), bundle.n_cells)
    model.load_state_dict(state["model"])
    assert state["epoch"] == done[1].best_epoch
    assert state["config"]["lr"] == MEMBERS[1]["lr"]


def test_a_pack_resumed_from_its_checkpoints_goes_on_as_if_never_stopped(bundle64, tmp_path):
    members = [{**m, "n_epochs": 4} for m in MEMBERS[:2]]
    _, straight, _ = run_pack(bundle64, tmp_path, members, sub="straight")
    run_pack(bundle64, tmp_path, [{**m, "n_epochs": 2} for m in members], sub="cut")
    states = [checkpoint.load(checkpoint.latest(tmp_path / "cut" / str(i))) for i in range(2)]
    for s, m in zip(states, members):  # the resumed run's config says 4 epochs; its checkpoints stop at 2
        s["config"]["n_epochs"] = m["n_epochs"]
    _, resumed, _ = run_pack(bundle64, tmp_path, members, resumes=states, sub="cut")
    for i in range(2):
        assert resumed[i].epochs_run == 4
        close_history(resumed[i].history, straight[i].history)


MODEL_TYPES = [("BNCNN", {}), ("LN", {}), ("LinearStackedBNCNN", {}), ("VaryModel", {"n_layers": 3, "convgc": True}),
               ("RetinotopicModel", {})]


@pytest.mark.parametrize("model_type, extra", MODEL_TYPES[1:])
def test_every_model_type_packs(bundle64, tmp_path, model_type, extra):
    members = [{"model_type": model_type, "n_epochs": 2, **extra, **m} for m in MEMBERS[:2]]
    trainers, done, _ = run_pack(bundle64, tmp_path, members)
    for i, m in enumerate(members):
        alone, result = solo(bundle64, tmp_path, m, batch_seed=7, name=f"{model_type}{i}")
        close_history(done[i].history, result.history)
        assert weight_deviation(trainers[i].model, alone.model) < TOL64


def one_batch(bundle):
    """The bundle with a training split of one batch: an epoch of it is one optimiser step."""
    t = bundle.train
    starts = t.starts[:SMALL["batch_size"]]
    return dataclasses.replace(bundle, train=WindowSet(t.stimulus, t.rates, starts, t.history, t.mean, t.std))


def first_step(bundle, tmp_path, members, packed: bool) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Each member's loss and gradients (float64 copies) after one training step, packed or each alone."""
    trainers = [make(bundle, tmp_path / str(i), {**m, "shuffle": False}) for i, m in enumerate(members)]
    if packed:
        pack = PackedTrainer(trainers)
        losses = pack._train_epoch(StackedModels([t.model for t in trainers]), trainers)
    else:
        losses = [t._train_epoch(1)["train_loss"] for t in trainers]
    return [(loss, {k: p.grad.double() for k, p in t.model.named_parameters()}) for loss, t in zip(losses, trainers)]


def step_error(step, truth) -> tuple[float, float]:
    """A step's error against the float64 step: (relative loss error, largest gradient error relative to the largest
    gradient entry of the model)."""
    (loss, grads), (loss64, grads64) = step, truth
    scale = max(g.abs().max().item() for g in grads64.values())
    return (abs(loss - loss64) / abs(loss64),
            max((grads[k] - grads64[k]).abs().max().item() for k in grads64) / scale)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type, extra", MODEL_TYPES)
def test_a_packed_step_is_as_accurate_as_a_step_alone(bundle, bundle64, tmp_path, model_type, extra, precision):
    """In the precision runs train in, one packed step (default settings, biases on) is measured against the same
    step in float64, and must be about as accurate as the step of each member alone: within 4x the solo step's
    error, or within the rounding of the precision (FLOOR)."""
    members = [{"model_type": model_type, "precision": precision, **extra, **m} for m in MEMBERS]
    truth = first_step(one_batch(bundle64), tmp_path / "64", [{**m, "precision": "fp32"} for m in members], False)
    packed = first_step(one_batch(bundle), tmp_path / "pack", members, True)
    alone = first_step(one_batch(bundle), tmp_path / "solo", members, False)
    for i in range(len(members)):
        pack_err, solo_err = step_error(packed[i], truth[i]), step_error(alone[i], truth[i])
        for ours, theirs in zip(pack_err, solo_err):
            assert ours <= max(4 * theirs, FLOOR[precision]), (i, pack_err, solo_err)
        if precision == "bf16":  # autocast ran: the pack's error is that of bf16, far above float32's
            assert pack_err[1] > 2**10 * U32, pack_err


def test_members_that_differ_in_the_forward_pass_are_refused(bundle, tmp_path):
    """The pack runs member 0's modules: a member with another activation or noise would train as member 0 does."""
    for other in ({"batch_size": 64}, {"lossfxn": "MSELoss"}, {"prune": True}, {"activ_fxn": "Tanh"},
                  {"noise": 0.1}, {"bn_moment": 0.5}):
        trainers = [make(bundle, tmp_path / "a", {}), make(bundle, tmp_path / "b", other)]
        key = next(iter(other))
        with pytest.raises(ConfigError, match=f"pack member 1 has {key}" if key != "prune" else "pack member 1"):
            PackedTrainer(trainers)
    PackedTrainer([make(bundle, tmp_path / "e", {}), make(bundle, tmp_path / "f", MEMBERS[1])])  # member keys differ
    with pytest.raises(ConfigError, match="shape"):
        StackedModels([make(bundle, tmp_path / "c", {}).model, make(bundle, tmp_path / "d", {"chans": [4, 2]}).model])


def spec(index, **cfg):
    from trainer.search import RunSpec

    full = config.resolve({**BASE, **cfg})
    return RunSpec(index=index, name=f"r{index}", config_id=str(index), seed=full["seed"], repeat=0, searched={},
                   config=full)


def test_plan_packs_groups_runs_that_differ_only_in_member_settings():
    runs = [spec(0, lr=0.1), spec(1, lr=0.2, chans=[4, 2]), spec(2, lr=0.3, seed=9), spec(3, lr=0.4, l2=0.1),
            spec(4, prune=True), spec(5, lr=0.5, chans=[4, 2]), spec(6, lr=0.6, n_epochs=9)]
    assert pack_key(runs[0].config) == pack_key(runs[2].config) == pack_key(runs[6].config)
    assert pack_key(runs[0].config) != pack_key(runs[1].config)
    assert pack_key(runs[4].config) is None
    groups = [[r.index for r in p] for p in plan_packs(runs, 3)]
    assert groups == [[0, 2, 3], [1, 5], [4], [6]]
    assert [[r.index for r in p] for p in plan_packs(runs, 1)] == [[i] for i in range(7)]
    with pytest.raises(ConfigError, match="--pack"):
        plan_packs(runs, 0)


def test_every_setting_outside_the_member_keys_keeps_runs_apart():
    """One rule for plan_packs and PackedTrainer: for every key of the schema outside PACK_MEMBER_KEYS, two
    configurations that differ in it get other pack keys and are refused as one pack; the member keys may differ."""
    cfg = config.resolve(BASE)
    outside = sorted(set(cfg) - PACK_MEMBER_KEYS)
    assert len(outside) > 30 and {"activ_fxn", "noise", "dataset", "chans"} <= set(outside)
    for key in outside:
        other = {**cfg, key: ("another value", cfg[key])}
        assert pack_key(other) != pack_key(cfg), key
        assert f"member 1 has {key}" in (pack_conflict([cfg, other]) or ""), key
    member = {**cfg, **{k: ("another value", cfg[k]) for k in PACK_MEMBER_KEYS}}
    assert pack_key(member) == pack_key(cfg) and pack_conflict([cfg, member]) is None


def test_plan_packs_keeps_runs_with_other_noise_or_activation_apart():
    runs = [spec(0), spec(1, noise=0.1), spec(2, activ_fxn="Tanh"), spec(3, lr=0.5)]
    assert [[r.index for r in p] for p in plan_packs(runs, 4)] == [[0, 3], [1], [2]]


def test_a_member_whose_checkpoint_does_not_load_fails_alone(bundle, tmp_path):
    run_pack(bundle, tmp_path, [{**m, "n_epochs": 1} for m in MEMBERS[:2]], sub="first")
    states = [checkpoint.load(checkpoint.latest(tmp_path / "first" / str(i))) for i in range(2)]
    states[1]["model"]["conv1.weight"] = torch.zeros(1, 1, 1, 1)  # not this model's shape
    _, done, order = run_pack(bundle, tmp_path, MEMBERS[:2], resumes=states, sub="first")
    assert order[0] == 1 and isinstance(done[1], RuntimeError) and "conv1.weight" in str(done[1])
    assert isinstance(done[0], FitResult) and [h["epoch"] for h in done[0].history] == [1, 2, 3]
