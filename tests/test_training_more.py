"""The semantic loss, the retinotopic loop and channel pruning, on the small synthetic recording."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from conftest import SMALL, ListReporter
from trainer import config, models
from trainer.data.recording import load_data, recording_path
from trainer.errors import ConfigError, UserError
from trainer.launch.local import seed_everything
from trainer.models import build_model, prepare_model
from trainer.training import checkpoint
from trainer.training.losses import semantic_loss
from trainer.training.pruning import channel_importance, integrated_gradients
from trainer.training.trainer import Trainer


class TinyOneHot(nn.Module):
    """A conv with one channel per cell read out by a learned distribution over positions (RetinotopicModel-like)."""

    def __init__(self, n_units, img_shape):
        super().__init__()
        history, height, width = img_shape
        self.conv = nn.Conv2d(history, n_units, 3)
        self.weight = nn.Parameter(torch.rand(n_units, (height - 2) * (width - 2)))  # not uniform: see below

    def onehot_weights(self):
        return self.weight

    def onehot_probs(self):
        w = self.weight.abs()
        return w / w.sum(dim=1, keepdim=True)

    def conv_layers(self):
        return {"conv1": self.conv}

    def forward(self, x):
        return nn.functional.softplus((self.conv(x).flatten(2) * self.onehot_probs()).sum(dim=2))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: on a shared 2-core machine one thread steps several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle(data_root):
    return load_data(recording_path(data_root, "synth01", "whitenoise"), img_shape=SMALL["img_shape"])


def make(bundle, tmp_path, reporter=None, model=None, **overrides):
    cfg = config.resolve({**SMALL, "n_epochs": 1, "lr": 0.01, "early_stopping": 0, "alpha_steps": 4,
                          **overrides})
    seed_everything(cfg["seed"])
    if model is not None:
        model = model(bundle.n_cells, cfg["img_shape"])
    else:
        model = build_model(cfg, bundle.n_cells)
        prepare_model(model, cfg, bundle)
    return Trainer(model, bundle, cfg, tmp_path / "run", torch.device("cpu"), reporter=reporter)


PRUNE = {"prune": True, "prune_intvl": 1, "prune_tolerance": 1.0}


# ---- semantic loss ----------------------------------------------------------------------------------------------
def brute_semantic(p):
    total = 0.0
    for row in p.tolist():
        exactly_one = 0.0
        for i, pi in enumerate(row):
            term = pi
            for j, pj in enumerate(row):
                if j != i:
                    term *= 1 - pj
            exactly_one += term
        total -= math.log(exactly_one)
    return total


def test_semantic_loss_matches_a_brute_force_sum():
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 2), (3, 5), (4, 9)]:
        p = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.98 + 0.01
        assert semantic_loss(p).item() == pytest.approx(brute_semantic(p), rel=1e-10)


def test_semantic_loss_is_zero_for_one_hot_maps_and_larger_for_uniform_ones():
    one_hot = torch.eye(4)[[0, 2, 3]]
    uniform = torch.full((3, 4), 0.25)
    assert semantic_loss(one_hot).item() == pytest.approx(0.0, abs=1e-5)
    assert semantic_loss(uniform).item() == pytest.approx(-3 * math.log(4 * 0.25 * 0.75 ** 3), rel=1e-5)
    assert semantic_loss(uniform) > semantic_loss(one_hot) + 1
    assert semantic_loss(uniform.view(3, 2, 2)).item() == pytest.approx(semantic_loss(uniform).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_semantic_loss_gradients_are_finite_when_an_entry_reaches_one(dtype):
    p = torch.tensor([[1.0, 0.0, 0.0], [1 - 1e-9, 1e-9, 0.0], [0.5, 0.5, 0.0]], dtype=dtype, requires_grad=True)
    loss = semantic_loss(p)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(p.grad).all()
    logits = torch.tensor([[30.0, 0.0, 0.0, -5.0]], dtype=dtype, requires_grad=True)  # softmax entry ~1
    semantic_loss(logits.softmax(dim=1)).backward()
    assert torch.isfinite(logits.grad).all()


# ---- retinotopic loop --------------------------------------------------------------------------------------------
def test_retinotopic_loop_without_weights_is_train_loop(bundle, tmp_path):
    plain = make(bundle, tmp_path / "a", model=TinyOneHot)
    retino = make(bundle, tmp_path / "b", model=TinyOneHot, train_loop="retinotopic_loop", semantic_scale=0.0)
    a, b = plain.loops["train_loop"](1), retino.loops["retinotopic_loop"](1)
    assert a["train_loss"] == b["train_loss"]
    assert set(b) == {"train_loss", "semantic_loss", "onehot_l1"}
    for (k, x), (_, y) in zip(plain.model.state_dict().items(), retino.model.state_dict().items()):
        assert torch.equal(x, y), k


def test_retinotopic_loop_adds_and_reports_the_onehot_terms(bundle, tmp_path):
    rep = ListReporter()
    t = make(bundle, tmp_path, rep, model=TinyOneHot, train_loop="retinotopic_loop", semantic_scale=1.0,
             semantic_l1=0.1)
    # the semantic term alone sends gradient to the one-hot weights (a random map is not a stationary point)
    _, term = t._onehot_penalties()["semantic_loss"]
    (grad,) = torch.autograd.grad(term, t.model.weight)
    assert grad.abs().sum() > 0
    t.fit()
    metrics = rep.epochs[0][1]
    assert math.isfinite(metrics["semantic_loss"]) and metrics["semantic_loss"] > 0
    assert metrics["onehot_l1"] > 0
    plain = make(bundle, tmp_path / "plain", model=TinyOneHot, train_loop="retinotopic_loop")
    plain.fit()
    assert not torch.equal(plain.model.weight, t.model.weight)  # the terms changed the training


def test_retinotopic_loop_needs_a_onehot_readout(bundle, tmp_path):
    with pytest.raises(UserError, match=r"train_loop retinotopic_loop needs a model with a one-hot read-out "
                                        r"\(RetinotopicModel\); model_type is BNCNN"):
        make(bundle, tmp_path, train_loop="retinotopic_loop")


def test_retinotopic_model_trains_with_the_retinotopic_loop(bundle, tmp_path):
    if "RetinotopicModel" not in models.available():
        pytest.skip("RetinotopicModel is not registered")
    rep = ListReporter()
    make(bundle, tmp_path, rep, model_type="RetinotopicModel", train_loop="retinotopic_loop",
         semantic_scale=0.1, semantic_l1=0.01, rand_onehot=True).fit()
    metrics = rep.epochs[0][1]
    for key in ("train_loss", "semantic_loss", "onehot_l1", "val_pearson"):
        assert math.isfinite(metrics[key]), key


# ---- pruning -------------------------------------------------------------------------------------------------------
def test_importance_of_a_silenced_channel_is_zero(bundle):
    cfg = config.resolve(SMALL)
    seed_everything(0)
    model = build_model(cfg, bundle.n_cells)
    with torch.no_grad():
        model.conv1.weight[1] = 0
        model.conv1.bias[1] = 0
    x, _ = bundle.train.get(torch.arange(64))
    for abssum in (False, True):
        importance = channel_importance(model.train(), model.conv1, x, alpha_steps=4, abssum=abssum, batch_size=32)
        assert importance.shape == (4,) and importance[1] == 0
        assert (importance[[0, 2, 3]] > 0).all()
    assert model.training  # mode restored


def test_integrated_gradients_follow_the_input_path_from_a_zero_stimulus(bundle):
    """The original's attribution (a Riemann sum along the stimulus path from 0): summed over a layer's units it
    approaches F(x) - F(0), the model's outputs summed over cells, as alpha_steps grows (completeness)."""
    cfg = config.resolve({**SMALL, "noise": 0.0})
    seed_everything(0)
    model = build_model(cfg, bundle.n_cells).double().eval()
    x = bundle.train.get(torch.arange(16))[0].double()
    with torch.no_grad():
        gain = (model(x) - model(torch.zeros_like(x))).sum(1)  # (B,)
    errors = []
    for steps in (5, 50, 500):
        total = integrated_gradients(model, model.conv2, x, steps, batch_size=8).flatten(1).sum(1)
        errors.append((total - gain).abs().max().item() / gain.abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors
    # at the first layer's output too
    total = integrated_gradients(model, model.conv1, x, 500, batch_size=16).flatten(1).sum(1)
    assert torch.allclose(total, gain, rtol=0.01, atol=0.01 * gain.abs().max().item())


def test_pruned_channel_and_its_adam_moments_stay_zero(bundle, tmp_path):
    t = make(bundle, tmp_path, **PRUNE)
    t.pruner.start(0, 0.0)
    assert t.pruner.begin(1, t._importance_inputs)
    c = t.pruner.pending["channel"]
    t.train_loop(1)  # many Adam steps with the channel's gradient nonzero
    conv = t.model.conv1
    assert torch.count_nonzero(conv.weight[c]) == 0 and conv.bias[c] == 0
    for p in (conv.weight, conv.bias):
        state = t.optimizer.state[p]
        assert torch.count_nonzero(state["exp_avg"][c]) == 0 and torch.count_nonzero(state["exp_avg_sq"][c]) == 0
    others = [k for k in range(4) if k != c]
    assert torch.count_nonzero(conv.weight[others]) > 0
    assert t.pruner.zeroed() == {"conv1": [c], "conv2": []}


def test_pruning_a_stack_silences_the_stack_output_channel(bundle, tmp_path):
    if "LinearStackedBNCNN" not in models.available():
        pytest.skip("LinearStackedBNCNN is not registered")
    t = make(bundle, tmp_path, model_type="LinearStackedBNCNN", **PRUNE)
    t.pruner.start(0, 0.0)
    t.pruner.begin(1, t._importance_inputs)
    c = t.pruner.pending["channel"]
    t.train_loop(1)
    maps = {}
    stack = t.model.conv_layers()["conv1"]
    handle = stack.register_forward_hook(lambda module, args, out: maps.update(out=out))
    t.predict(bundle.val)
    handle.remove()
    assert torch.count_nonzero(maps["out"][:, c]) == 0 and torch.count_nonzero(maps["out"]) > 0


def test_revert_restores_the_exact_copy_and_moves_to_the_next_layer(bundle, tmp_path):
    t = make(bundle, tmp_path, **{**PRUNE, "prune_tolerance": 0.0})
    t.train_loop(0)  # so that there is Adam state to compare too
    t.pruner.start(0, 0.9)  # a baseline the pruned model will not reach
    model_before, optim_before = copy.deepcopy(t.model.state_dict()), copy.deepcopy(t.optimizer.state_dict())
    t.pruner.begin(1, t._importance_inputs)
    t.train_loop(1)
    event = t.pruner.end_epoch(1, 0.5)
    assert event["reverted"] and event["layer"] == "conv1"
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    for p, state in t.optimizer.state_dict()["state"].items():
        for key, v in state.items():
            assert torch.equal(v, optim_before["state"][p][key]), (p, key)
    assert t.pruner.current_layer() == "conv2" and t.pruner.zeroed() == {"conv1": [], "conv2": []}
    assert t.pruner.current_r == 0.9


def test_a_drop_reverts_the_layer_and_the_next_layer_is_pruned_to_one_channel(bundle, tmp_path):
    rep = ListReporter()
    t = make(bundle, tmp_path, rep, **PRUNE)
    real_score = t.score_outputs

    def score(out, windows):  # simulate a collapse of validation r while a conv1 channel is being tried
        loss, r = real_score(out, windows)
        pending = t.pruner.pending
        if windows is bundle.val and pending is not None and pending["layer"] == "conv1":
            r = r - 3.0
        return loss, r

    t.score_outputs = score
    result = t.fit()
    assert result.epochs_run == 1 + 1 + 3  # normal epoch, the reverted try, three conv2 prunings
    assert [m["pruned_conv1"] for _, m in rep.epochs] == [0, 0, 0, 0, 0]
    assert [m["pruned_conv2"] for _, m in rep.epochs] == [0, 0, 1, 2, 3]
    report = json.loads((tmp_path / "run" / "pruning.json").read_text())
    assert len(report["reverted"]) == 1 and report["reverted"][0]["layer"] == "conv1"
    assert report["pruned"]["conv1"] == [] and len(report["pruned"]["conv2"]) == 3
    assert torch.count_nonzero(t.model.conv1.weight.flatten(1).abs().sum(1)) == 4


def test_large_tolerance_prunes_every_layer_to_one_channel(bundle, tmp_path):
    rep = ListReporter()
    t = make(bundle, tmp_path, rep, **PRUNE)
    result = t.fit()
    assert result.epochs_run == 1 + 3 + 3 and not result.stopped_early
    assert [e for e, _ in rep.epochs] == list(range(1, 8))
    last = rep.epochs[-1][1]
    assert last["pruned_conv1"] == 3 and last["pruned_conv2"] == 3
    state = checkpoint.load(tmp_path / "run" / "epoch_0007.pt")
    assert {k: len(v) for k, v in state["pruned"].items()} == {"conv1": 3, "conv2": 3}
    for name, conv in t.model.conv_layers().items():
        chans = state["pruned"][name]
        assert torch.count_nonzero(conv.weight[chans]) == 0 and torch.count_nonzero(conv.bias[chans]) == 0
    assert ("pruning.json", "pruning.json") in rep.checkpoints
    report = json.loads((tmp_path / "run" / "pruning.json").read_text())
    assert report["pruned"] == state["pruned"] and report["reverted"] == []
    assert all("baseline_val_pearson" in e and "after_val_pearson" in e for e in report["prunings"])


def test_resume_in_the_middle_of_pruning_continues_exactly(bundle, tmp_path):
    overrides = {**PRUNE, "prune_intvl": 2, "prune_layers": ["conv2"], "save_every_epoch": True}
    straight = make(bundle, tmp_path / "a", **overrides)
    straight.fit()  # epoch 1 normal, then three conv2 prunings of two epochs each: 7 epochs
    state = checkpoint.load(tmp_path / "a" / "run" / "epoch_0004.pt")
    assert state["pruning"]["pending"] is not None  # epoch 4 is inside the second pruning's interval
    resumed = make(bundle, tmp_path / "b", **overrides)
    rep = ListReporter()
    resumed.reporter = rep
    resumed.fit(resume=state)
    assert [e for e, _ in rep.epochs] == [5, 6, 7]
    assert resumed.pruner.zeroed() == straight.pruner.zeroed()
    assert resumed.pruner.events == straight.pruner.events
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_unknown_prune_layer_lists_the_layers(bundle, tmp_path):
    with pytest.raises(ConfigError, match="prune_layers names 'conv9'.*layers are conv1, conv2"):
        make(bundle, tmp_path, prune=True, prune_layers=["conv9"])
    with pytest.raises(ConfigError, match="model_type LN has none"):
        make(bundle, tmp_path, prune=True, model_type="LN")


def test_no_pruning_metrics_without_prune(bundle, tmp_path):
    rep = ListReporter()
    make(bundle, tmp_path, rep).fit()
    assert not any(k.startswith("pruned_") for k in rep.epochs[0][1])
    assert checkpoint.load(tmp_path / "run" / "epoch_0001.pt")["pruned"] == {}
    assert not (tmp_path / "run" / "pruning.json").exists()
