"""Packing: K runs trained together on one batch stream give each member the run it would have had alone."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SMALL, ListReporter
from trainer import config
from trainer.data.recording import load_data, recording_path
from trainer.errors import ConfigError
from trainer.launch.local import seed_everything
from trainer.models import build_model
from trainer.search import pack_key, plan_packs
from trainer.training import checkpoint
from trainer.training.packed import PackedTrainer, StackedModels
from trainer.training.trainer import FitResult, Trainer, TrainingDiverged

# noise 0: the pack shares one random stream for its noise layers, so noisy members differ from solo runs.
# bias off: a conv bias followed by batch norm has a true gradient of 0, and Adam turns its rounding noise (which
# differs between a fused and a plain convolution) into steps of +-lr, so with biases packed and solo runs drift
# apart by about 1% of the loss, although both are correct.
BASE = {**SMALL, "n_epochs": 3, "noise": 0.0, "early_stopping": 0, "shuffle": True, "seed": 7, "bias": False}


@pytest.fixture(scope="module")
def bundle(data_root):
    return load_data(recording_path(data_root, "synth01", "whitenoise"), img_shape=SMALL["img_shape"])


def make(bundle, folder, overrides, batch_seed=None):
    """A Trainer built as the launcher builds one (seeded by its own seed); `batch_seed` sets its batch order."""
    cfg = config.resolve({**BASE, **overrides})
    seed_everything(cfg["seed"])
    model = build_model(cfg, bundle.n_cells)
    if hasattr(model, "prepare"):
        model.prepare(bundle)
    t = Trainer(model, bundle, cfg, folder, torch.device("cpu"), reporter=ListReporter())
    if batch_seed is not None:
        t.shuffle_gen = torch.Generator().manual_seed(batch_seed)
    return t


def run_pack(bundle, tmp_path, members, resumes=None, sub="pack"):
    trainers = [make(bundle, tmp_path / sub / str(i), m) for i, m in enumerate(members)]
    done: dict[int, FitResult | Exception] = {}
    order: list[int] = []

    def on_done(i, outcome):
        assert i not in done, "on_done called twice for one member"
        done[i] = outcome
        order.append(i)

    PackedTrainer(trainers).fit(resumes or [None] * len(trainers), on_done)
    assert sorted(done) == list(range(len(members)))
    return trainers, done, order


def solo(bundle, tmp_path, member, batch_seed, name):
    t = make(bundle, tmp_path / "solo" / name, member, batch_seed=batch_seed)
    return t, t.fit()


def close_history(a, b, tol=2e-3):
    keys = ("train_loss", "val_loss", "val_pearson", "test_pearson", "lr")
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b]
    for ha, hb in zip(a, b):
        for k in keys:
            assert math.isclose(ha[k], hb[k], rel_tol=tol, abs_tol=tol), (k, ha["epoch"], ha[k], hb[k])


MEMBERS = [{"lr": 0.01, "seed": 7}, {"lr": 0.003, "l2": 1e-3, "seed": 11}, {"lr": 0.02, "l1": 1e-3, "seed": 5}]


def test_each_member_trains_as_it_would_alone_with_the_packs_batch_order(bundle, tmp_path):
    trainers, done, _ = run_pack(bundle, tmp_path, MEMBERS)
    for i, member in enumerate(MEMBERS):
        alone, result = solo(bundle, tmp_path, member, batch_seed=MEMBERS[0]["seed"], name=str(i))
        packed = done[i]
        assert isinstance(packed, FitResult)
        close_history(packed.history, result.history)
        assert packed.best_epoch == result.best_epoch
        for (k, a), b in zip(trainers[i].model.state_dict().items(), alone.model.state_dict().values()):
            assert a.shape == b.shape
            if a.dtype.is_floating_point:
                assert torch.allclose(a, b, atol=2e-3, rtol=2e-3), k
    # the members really differ: different seeds and learning rates give different weights
    w = [t.model.conv1.weight for t in trainers]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[0], w[2])
    # training moved the weights away from their initial values
    seed_everything(MEMBERS[0]["seed"])
    init = build_model(config.resolve({**BASE, **MEMBERS[0]}), bundle.n_cells)
    assert (trainers[0].model.conv1.weight - init.conv1.weight).abs().max() > 1e-3


def test_members_stop_on_their_own_and_the_rest_go_on(bundle, tmp_path):
    members = [{"lr": 0.01, "n_epochs": 6, "seed": 7},
               {"lr": 1e-9, "n_epochs": 6, "early_stopping": 1, "seed": 3},  # barely learns: stops early
               {"lr": 0.005, "n_epochs": 2, "seed": 4}]
    trainers, done, order = run_pack(bundle, tmp_path, members)
    stop = done[1].epochs_run
    assert done[1].stopped_early and 2 <= stop < 6 and done[1].best_epoch == stop - 1
    assert [done[0].epochs_run, done[2].epochs_run] == [6, 2]
    assert not done[2].stopped_early and not done[0].stopped_early
    assert order[-1] == 0  # the long-running member is handed on last
    assert [e for e, _ in trainers[0].reporter.epochs] == [1, 2, 3, 4, 5, 6]
    sizes = [m["pack_size"] for _, m in trainers[0].reporter.epochs]
    assert sizes == [3, 3] + [2] * (stop - 2) + [1] * (6 - stop)
    # after the others left, member 0 still trains as alone (6 epochs at lr 0.01 let rounding grow a little)
    _, result = solo(bundle, tmp_path, members[0], batch_seed=7, name="long")
    close_history(done[0].history, result.history, tol=5e-3)


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


def test_a_pack_resumed_from_its_checkpoints_goes_on_as_if_never_stopped(bundle, tmp_path):
    members = [{**m, "n_epochs": 4} for m in MEMBERS[:2]]
    _, straight, _ = run_pack(bundle, tmp_path, members, sub="straight")
    run_pack(bundle, tmp_path, [{**m, "n_epochs": 2} for m in members], sub="cut")
    states = [checkpoint.load(checkpoint.latest(tmp_path / "cut" / str(i))) for i in range(2)]
    for s, m in zip(states, members):  # the resumed run's config says 4 epochs; its checkpoints stop at 2
        s["config"]["n_epochs"] = m["n_epochs"]
    _, resumed, _ = run_pack(bundle, tmp_path, members, resumes=states, sub="cut")
    for i in range(2):
        assert resumed[i].epochs_run == 4
        close_history(resumed[i].history, straight[i].history, tol=1e-4)


@pytest.mark.parametrize("model_type, extra", [
    ("LN", {}), ("LinearStackedBNCNN", {}), ("VaryModel", {"n_layers": 3, "convgc": True}),
    ("RetinotopicModel", {}),
])
def test_every_model_type_packs(bundle, tmp_path, model_type, extra):
    members = [{"model_type": model_type, "n_epochs": 1, **extra, **m} for m in MEMBERS[:2]]
    _, done, _ = run_pack(bundle, tmp_path, members)
    for i, m in enumerate(members):
        _, result = solo(bundle, tmp_path, m, batch_seed=7, name=f"{model_type}{i}")
        close_history(done[i].history, result.history)
    # and in bf16 (autocast under vmap): it trains, and lands near the fp32 pack
    _, half, _ = run_pack(bundle, tmp_path, [{**m, "precision": "bf16"} for m in members], sub="bf16")
    for i in range(2):
        assert isinstance(half[i], FitResult), half[i]
        assert math.isclose(half[i].best_val_pearson, done[i].best_val_pearson, abs_tol=0.05)


def test_members_that_differ_in_the_forward_pass_are_refused(bundle, tmp_path):
    for other in ({"batch_size": 64}, {"lossfxn": "MSELoss"}, {"prune": True}):
        trainers = [make(bundle, tmp_path / "a", {}), make(bundle, tmp_path / "b", other)]
        with pytest.raises(ConfigError, match="pack"):
            PackedTrainer(trainers)
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


def test_a_member_whose_checkpoint_does_not_load_fails_alone(bundle, tmp_path):
    run_pack(bundle, tmp_path, [{**m, "n_epochs": 1} for m in MEMBERS[:2]], sub="first")
    states = [checkpoint.load(checkpoint.latest(tmp_path / "first" / str(i))) for i in range(2)]
    states[1]["model"]["conv1.weight"] = torch.zeros(1, 1, 1, 1)  # not this model's shape
    _, done, order = run_pack(bundle, tmp_path, MEMBERS[:2], resumes=states, sub="first")
    assert order[0] == 1 and isinstance(done[1], RuntimeError) and "conv1.weight" in str(done[1])
    assert isinstance(done[0], FitResult) and [h["epoch"] for h in done[0].history] == [1, 2, 3]


def test_a_bf16_pack_trains_like_its_members_alone_in_bf16(bundle, tmp_path):
    members = [{**m, "precision": "bf16", "n_epochs": 2} for m in MEMBERS[:2]]
    _, done, _ = run_pack(bundle, tmp_path, members)
    _, fp32, _ = run_pack(bundle, tmp_path, [{**m, "precision": "fp32"} for m in members], sub="fp32")
    for i, m in enumerate(members):
        _, alone = solo(bundle, tmp_path, m, batch_seed=7, name=f"bf16-{i}")
        packed = done[i].history
        assert packed != fp32[i].history  # autocast really ran in bf16
        # bf16 keeps about 3 significant digits: after an epoch, two bf16 paths differ by a few % of the loss
        # (measured: the pack, whose batch norms compute in float32 under vmap, is closer to fp32 than solo bf16)
        for ours, theirs in ((packed, alone.history), (packed, fp32[i].history)):
            for a, b in zip(ours, theirs):
                assert math.isclose(a["val_pearson"], b["val_pearson"], abs_tol=0.03), (a, b)
                assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=0.1, abs_tol=0.05), (a, b)
        assert done[i].best_val_pearson > 0.2
