"""Tests for LinearStackedBNCNN (and its stacked convs and positive batch norm), VaryModel and RetinotopicModel."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from trainer import config
from trainer.data.recording import load_data
from trainer.data.synth import write_synthetic
from trainer.errors import ConfigError
from trainer.models import build_model
from trainer.models.retinotopic import OneHotReadout, RetinotopicModel
from trainer.models.stacked import (
    LinearStackedBNCNN,
    LinearStackedConv2d,
    PositiveBatchNorm,
    PositiveBatchNorm1d,
    PositiveBatchNorm2d,
    PositiveFlatBatchNorm,
)
from trainer.models.vary import VaryModel

SMALL = {"img_shape": (10, 20, 20), "chans": [4, 4], "ksizes": [5, 5, 5]}
X = (6, 10, 20, 20)  # a batch of SMALL inputs


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- LinearStackedConv2d ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, n_convs", [(15, 7), (11, 5), (5, 2), (3, 1)])
def test_stack_has_k_minus_1_over_2_convs_of_3x3(k, n_convs):
    stack = LinearStackedConv2d(2, 6, k)
    convs = [m for m in stack.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_convs
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [c.in_channels for c in convs] == [2] + [6] * (n_convs - 1)  # intermediate maps have out channels
    assert all(c.out_channels == 6 for c in convs)
    assert [c.bias is not None for c in convs] == [False] * (n_convs - 1) + [True]  # only the last has a bias


def test_stack_is_linear_without_bias():
    torch.manual_seed(0)
    stack = LinearStackedConv2d(3, 4, 7, bias=False)
    assert not any(isinstance(m, (nn.ReLU, nn.Tanh, nn.Softplus, nn.ELU, nn.Sigmoid, nn.GELU, nn.LeakyReLU))
                   for m in stack.modules())
    x, y = torch.randn(2, 3, 12, 12), torch.randn(2, 3, 12, 12)
    a, b = 1.7, -0.6
    assert torch.allclose(stack(a * x + b * y), a * stack(x) + b * stack(y), atol=1e-5)
    assert torch.allclose(stack(-x), -stack(x), atol=1e-6)  # a rectifying stack would fail this


@pytest.mark.parametrize("k", [15, 11, 5])
def test_stack_has_the_receptive_field_of_one_k_by_k_conv(k):
    stack = LinearStackedConv2d(2, 3, k)
    x = torch.randn(1, 2, 25, 25, requires_grad=True)
    out = stack(x)
    assert out.shape == nn.Conv2d(2, 3, k)(x).shape
    out[0, :, 4, 6].sum().backward()  # output pixel (4, 6) sees input rows 4..4+k-1 and cols 6..6+k-1
    seen = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(25, 25, dtype=torch.bool)
    expected[4:4 + k, 6:6 + k] = True
    assert torch.equal(seen, expected)


@pytest.mark.parametrize("k, bias", [(7, True), (11, True), (5, False), (3, True)])
def test_collapse_gives_the_same_outputs_in_eval_mode(k, bias):
    torch.manual_seed(1)
    stack = LinearStackedConv2d(3, 5, k, bias=bias, drop_p=0.4)
    for conv in stack.convs:
        nn.init.normal_(conv.weight, std=0.3)
        if conv.bias is not None:
            nn.init.normal_(conv.bias)
    stack.eval()
    single = stack.collapse()
    assert isinstance(single, nn.Conv2d) and single.kernel_size == (k, k)
    assert (single.bias is not None) == bias
    x = torch.randn(4, 3, 2 * k, 2 * k + 3)
    expected = stack(x)
    scale = expected.abs().max()
    assert torch.allclose(single(x) / scale, expected / scale, atol=1e-5)


def test_dropout_between_stacked_convs():
    stack = LinearStackedConv2d(3, 4, 7, drop_p=0.5)
    drops = [m for m in stack.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.5
    x = torch.randn(2, 3, 10, 10)
    stack.train()
    assert not torch.allclose(stack(x), stack(x))
    stack.eval()
    assert torch.equal(stack(x), stack(x))
    assert not any(isinstance(m, nn.Dropout) for m in LinearStackedConv2d(3, 4, 7, drop_p=0.0).modules())
    with pytest.raises(ConfigError, match="drop_p"):
        LinearStackedConv2d(3, 4, 7, drop_p=1.0)


@pytest.mark.parametrize("k", [4, 14, 1, 2])
def test_stack_rejects_even_or_too_small_kernels(k):
    with pytest.raises(ConfigError, match="odd kernel sizes >= 3"):
        LinearStackedConv2d(3, 4, k)


def test_zeroing_last_conv_channel_silences_stack_channel():
    torch.manual_seed(2)
    stack = LinearStackedConv2d(3, 4, 7)
    assert stack.weight is stack.convs[-1].weight and stack.bias is stack.convs[-1].bias
    with torch.no_grad():
        stack.weight[2].zero_()
        stack.bias[2].zero_()
    out = stack(torch.randn(3, 3, 12, 12))
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    assert (out[:, [0, 1, 3]] != 0).any()


# --- positive batch norm ------------------------------------------------------------------------------------------

def test_positive_batch_norm_uses_abs_of_scale():
    torch.manual_seed(3)
    pos, ref = PositiveBatchNorm1d(5, momentum=0.1), nn.BatchNorm1d(5, momentum=0.1)
    with torch.no_grad():
        pos.weight.copy_(torch.tensor([-2.0, 1.0, -0.5, 3.0, -1.0]))
        pos.bias.copy_(torch.arange(5.0))
        ref.weight.copy_(pos.weight.abs())
        ref.bias.copy_(pos.bias)
    x = torch.randn(32, 5) * 3 + 1
    assert torch.allclose(pos(x), ref(x), atol=1e-6)  # train mode: batch statistics
    assert torch.allclose(pos.running_mean, ref.running_mean) and torch.allclose(pos.running_var, ref.running_var)
    assert pos.num_batches_tracked == 1
    pos.eval()
    ref.eval()
    assert torch.allclose(pos(x), ref(x), atol=1e-6)  # eval mode: running statistics
    assert (pos.weight < 0).any()  # the raw weight may be negative; only its use is constrained


def test_positive_batch_norm_keeps_sign_with_negative_weight():
    bn = PositiveBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.fill_(-4.0)
    x = torch.randn(8, 3, 5, 5)
    out = bn(x)
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    assert ((out * centred) >= 0).all()  # a negative scale would flip every sign


def test_positive_flat_batch_norm_has_one_affine_per_unit_and_location():
    bn = PositiveFlatBatchNorm((4, 6, 7))
    assert isinstance(bn, PositiveBatchNorm) and bn.weight.shape == (4 * 6 * 7,)
    assert bn(torch.randn(5, 4, 6, 7)).shape == (5, 4, 6, 7)


# --- LinearStackedBNCNN -------------------------------------------------------------------------------------------

def test_linear_stacked_bncnn_layout():
    model = LinearStackedBNCNN(n_units=3, drop_p=0.2, **SMALL)
    layers = model.conv_layers()
    assert list(layers) == ["conv1", "conv2"]
    assert layers["conv1"] is model.conv1 and isinstance(model.conv2, LinearStackedConv2d)
    assert len(model.conv1.convs) == 2 and len(model.conv2.convs) == 2  # 5x5 = two 3x3
    assert model.feature_shapes == [(4, 16, 16), (4, 12, 12)]
    bns = batch_norms(model)
    assert len(bns) == 3 and all(isinstance(bn, PositiveBatchNorm) for bn in bns)
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, nn.Dropout))
    out = model(torch.randn(*X))
    assert out.shape == (6, 3) and (out > 0).all()
    model.eval()
    assert model(torch.randn(*X)).shape == (6, 3)


def test_linear_stacked_bncnn_default_stacks_and_errors():
    model = LinearStackedBNCNN(n_units=2)
    assert (len(model.conv1.convs), len(model.conv2.convs)) == (7, 5)
    assert model.feature_shapes == [(8, 36, 36), (8, 26, 26)]  # same maps as BNCNN: 50 -> 36 -> 26
    with pytest.raises(ConfigError, match=r"ksizes \[14, 11\] has \[14\]"):
        LinearStackedBNCNN(ksizes=[14, 11])
    with pytest.raises(ConfigError, match="layer 2 \\(conv2\\).*20x20 -> 6x6 -> -4x-4"):
        LinearStackedBNCNN(img_shape=(10, 20, 20), ksizes=[15, 11])


def test_linear_stacked_bncnn_bnorm_d_and_gc_bias():
    per_location = LinearStackedBNCNN(bnorm_d=1, **SMALL)
    per_channel = LinearStackedBNCNN(bnorm_d=2, **SMALL)
    assert [bn.weight.shape for bn in batch_norms(per_location)] == [(4 * 16 * 16,), (4 * 12 * 12,), (5,)]
    assert [bn.weight.shape for bn in batch_norms(per_channel)] == [(4,), (4,), (5,)]
    assert n_params(LinearStackedBNCNN(gc_bias=True, **SMALL)) - n_params(per_location) == 5


# --- VaryModel ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("convgc", [False, True])
def test_vary_model_builds_and_runs(n_layers, convgc):
    model = VaryModel(n_units=3, n_layers=n_layers, convgc=convgc, **SMALL)
    assert len(model.hidden) == n_layers - 1
    assert list(model.conv_layers()) == [f"conv{i + 1}" for i in range(n_layers - 1)]
    out = model(torch.randn(*X))
    assert out.shape == (6, 3) and (out > 0).all()
    if convgc:
        assert model.gc_shape == (3, 20 - 4 * n_layers, 20 - 4 * n_layers)
        assert model.gc_conv.in_channels == (10 if n_layers == 1 else 4)
        assert not hasattr(model, "readout")
    else:
        assert not hasattr(model, "gc_conv") and not hasattr(model, "positions")


def test_vary_model_one_layer_is_the_gc_layer_on_the_input():
    model = VaryModel(n_units=2, n_layers=1, bnorm=False, softplus=False, img_shape=(3, 4, 5), chans=[], ksizes=[])
    assert list(model.children())[1:] == [model.readout, model.bn_out, model.out_act]
    x = torch.randn(4, 3, 4, 5)
    assert torch.allclose(model(x), model.readout(x.flatten(1)))


def test_vary_model_layer_count_errors():
    with pytest.raises(ConfigError, match="n_layers must be >= 1"):
        VaryModel(n_layers=0, **SMALL)
    with pytest.raises(ConfigError, match=r"n_layers 4 has 3 hidden layers but chans \[4, 4\] has 2"):
        VaryModel(n_layers=4, img_shape=(10, 30, 30), chans=[4, 4], ksizes=[3, 3, 3, 3])
    with pytest.raises(ConfigError, match=r"n_layers 3 needs 3 ksizes .*ganglion-cell conv.* has 2"):
        VaryModel(n_layers=3, convgc=True, img_shape=(10, 20, 20), chans=[4, 4], ksizes=[5, 5])
    with pytest.raises(ConfigError, match=r"n_layers 3 needs 2 ksizes"):
        VaryModel(n_layers=3, img_shape=(10, 20, 20), chans=[4, 4], ksizes=[5])
    VaryModel(n_layers=3, img_shape=(10, 20, 20), chans=[4, 4], ksizes=[5, 5])  # a linear GC layer needs no ksize


def test_vary_model_names_the_layer_that_does_not_fit():
    with pytest.raises(ConfigError) as err:
        VaryModel(n_layers=3, convgc=True, img_shape=(10, 20, 20), chans=[4, 4], ksizes=[5, 5, 15])
    message = str(err.value)
    assert "layer 3 (ganglion-cell conv) (ksize 15) does not fit its 12x12 input" in message
    assert "20x20 -> 16x16 -> 12x12 -> -2x-2" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"layer 2 \(conv2\) \(ksize 19\) does not fit its 16x16 input"):
        VaryModel(n_layers=3, img_shape=(10, 20, 20), chans=[4, 4], ksizes=[5, 19, 3])


def test_convgc_reads_each_cell_at_its_own_position():
    torch.manual_seed(4)
    model = VaryModel(n_units=4, n_layers=2, convgc=True, bnorm=False, softplus=False, **SMALL).eval()
    h, w = model.gc_shape[1:]
    assert model.positions.dtype == torch.int64
    assert model.positions.tolist() == [[(h - 1) // 2, (w - 1) // 2]] * 4  # start at the map centre
    chosen = torch.tensor([[0, 0], [3, 11], [11, 2], [7, 7]])
    model.positions.copy_(chosen)
    x = torch.randn(5, 10, 20, 20)
    maps = model.gc_map(x)
    out = model(x)
    for cell, (r, c) in enumerate(chosen.tolist()):
        assert torch.allclose(out[:, cell], maps[:, cell, r, c].exp())  # softplus off: exp at evaluation
    assert not torch.allclose(out[:, 1], maps[:, 1, 0, 0].exp())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic recording (20x20 checkers, 8 cells), its loaded data and the true cell centres."""
    path = write_synthetic(tmp_path_factory.mktemp("data"), n_cells=8, size=20, train_frames=9000,
                           test_frames=200, n_repeats=2, history=10, seed=0)
    with h5py.File(path, "r") as f:
        centres = np.asarray(f["ground_truth"].attrs["position"])  # (n_cells, 2) (row, col) in checkers
    return load_data(path, img_shape=(10, 20, 20)), centres


def test_prepare_finds_receptive_field_peaks(synthetic):
    data, centres = synthetic
    model = VaryModel(n_units=8, n_layers=2, convgc=True, **SMALL)  # maps 20 -> 16 -> 12: offset 4
    assert model.rf_offset() == (4, 4)
    rng_before = torch.get_rng_state()
    model.prepare(data)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no draws from the global RNG
    found = model.positions.numpy() + np.array(model.rf_offset())  # back to input coordinates
    error = np.abs(found - centres).max(axis=1)
    assert (error <= 2).sum() >= 7, f"positions {found.tolist()} vs truth {centres.round(1).tolist()}"
    assert len({tuple(p) for p in model.positions.tolist()}) >= 6  # cells are not all at one position


def test_prepare_clamps_into_the_map_and_is_a_no_op_without_convgc(synthetic):
    data, centres = synthetic
    model = VaryModel(n_units=8, n_layers=3, convgc=True, img_shape=(10, 20, 20), chans=[4, 4], ksizes=[7, 7, 5])
    assert model.gc_shape[1:] == (4, 4)  # 20 -> 14 -> 8 -> 4: offset 8
    model.prepare(data)
    expected = np.clip(np.round(centres) - 8, 0, 3)
    assert (np.abs(model.positions.numpy() - expected).max(axis=1) <= 1).sum() >= 6
    linear = VaryModel(n_units=8, n_layers=2, **SMALL)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    linear.prepare(data)
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())


def test_positions_are_saved_with_the_model():
    model = VaryModel(n_units=3, n_layers=2, convgc=True, **SMALL)
    model.positions.copy_(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    state = model.state_dict()
    assert "positions" in state and "hidden.0.conv.weight" in state and "gc_conv.weight" in state
    fresh = VaryModel(n_units=3, n_layers=2, convgc=True, **SMALL)
    fresh.load_state_dict(state)
    assert fresh.positions.tolist() == [[1, 2], [3, 4], [5, 6]]


def test_vary_model_stackconvs_switches_hidden_convs_to_stacks():
    plain = VaryModel(n_layers=3, **SMALL)
    stacked = VaryModel(n_layers=3, stackconvs=True, drop_p=0.3, **SMALL)
    assert all(type(c) is nn.Conv2d for c in plain.conv_layers().values())
    assert all(isinstance(c, LinearStackedConv2d) and len(c.convs) == 2 for c in stacked.conv_layers().values())
    assert all(m.p == 0.3 for m in stacked.modules() if isinstance(m, nn.Dropout))
    assert stacked(torch.randn(*X)).shape == (6, 5)
    with pytest.raises(ConfigError, match="stackconvs.*odd kernel sizes"):
        VaryModel(n_layers=3, stackconvs=True, img_shape=(10, 20, 20), chans=[4, 4], ksizes=[4, 5, 5])
    VaryModel(n_layers=2, stackconvs=True, convgc=True, img_shape=(10, 20, 20), chans=[4], ksizes=[5, 4])


def test_vary_model_bnorm_d_bnorm_and_gc_bias():
    per_location = VaryModel(n_layers=3, bnorm_d=1, **SMALL)
    per_channel = VaryModel(n_layers=3, bnorm_d=2, **SMALL)
    assert [bn.weight.shape for bn in batch_norms(per_location)] == [(4 * 16 * 16,), (4 * 12 * 12,), (5,)]
    assert [bn.weight.shape for bn in batch_norms(per_channel)] == [(4,), (4,), (5,)]
    assert all(isinstance(bn, PositiveBatchNorm) for bn in batch_norms(per_channel)[:2])
    assert batch_norms(VaryModel(n_layers=3, bnorm=False, **SMALL)) == []
    assert per_location.readout.bias is None
    assert VaryModel(n_layers=3, gc_bias=True, **SMALL).readout.bias.shape == (5,)
    assert VaryModel(n_layers=3, convgc=True, **SMALL).gc_conv.bias is None
    assert VaryModel(n_layers=3, convgc=True, gc_bias=True, **SMALL).gc_conv.bias.shape == (5,)


# --- RetinotopicModel ---------------------------------------------------------------------------------------------

def test_retinotopic_output_and_layout():
    model = RetinotopicModel(n_units=3, **SMALL)  # n_layers 3: two hidden layers, maps 20 -> 16 -> 12 -> 8
    assert model.gc_shape == (3, 8, 8)
    assert model.onehot_weights().shape == (3, 64) and model.onehot_probs().shape == (3, 64)
    assert list(model.conv_layers()) == ["conv1", "conv2"]
    out = model(torch.randn(*X))
    assert out.shape == (6, 3) and (out > 0).all()
    one = RetinotopicModel(n_units=2, n_layers=1, **SMALL)
    assert len(one.hidden) == 0 and one.gc_conv.in_channels == 10 and one.gc_shape == (2, 16, 16)
    with pytest.raises(ConfigError, match="needs 3 ksizes"):
        RetinotopicModel(img_shape=(10, 20, 20), chans=[4, 4], ksizes=[5, 5])
    with pytest.raises(ConfigError, match=r"layer 3 \(per-cell conv\)"):
        RetinotopicModel(img_shape=(10, 20, 20), chans=[4, 4], ksizes=[5, 5, 13])


def test_retinotopic_output_is_the_expectation_under_the_read_out_distribution():
    torch.manual_seed(5)
    model = RetinotopicModel(n_units=3, bnorm=False, rand_onehot=True, **SMALL).eval()
    x = torch.randn(4, 10, 20, 20)
    maps = model.gc_map(x).flatten(2)  # (B, n_units, H*W)
    assert torch.allclose(model(x), (maps * model.onehot_probs()).sum(2), atol=1e-6)


@pytest.mark.parametrize("rand_onehot", [False, True])
def test_onehot_probs_are_distributions(rand_onehot):
    readout = OneHotReadout(4, (5, 6), rand_init=rand_onehot)
    with torch.no_grad():
        readout.weight[0, :10] *= -1  # negative raw weights still give a distribution
        readout.weight[1].zero_()
        readout.weight[1, 7] = -0.3
    probs = readout.probs()
    assert probs.shape == (4, 30) and (probs >= 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(4))
    assert probs[1, 7] == 1.0  # a single position gets all the mass


@pytest.mark.parametrize("rand_onehot", [False, True])
def test_gradients_reach_onehot_weights_from_the_first_step(rand_onehot):
    torch.manual_seed(6)
    model = RetinotopicModel(n_units=3, rand_onehot=rand_onehot, **SMALL)
    loss = nn.functional.poisson_nll_loss(model(torch.randn(*X)), torch.rand(6, 3), log_input=False)
    loss.backward()
    grad = model.onehot_weights().grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=1) > 0).all()  # every cell's weights get a gradient


def test_rand_onehot_changes_the_init():
    constant = RetinotopicModel(n_units=3, **SMALL).onehot_weights()
    assert torch.equal(constant, torch.full((3, 64), 1 / 64))
    random = RetinotopicModel(n_units=3, rand_onehot=True, **SMALL).onehot_weights()
    assert (random >= 0).all() and (random < 1).all()
    assert random.std() > 0.1 and not torch.allclose(random[0], random[1])


# --- registry -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("LinearStackedBNCNN", LinearStackedBNCNN), ("VaryModel", VaryModel),
                                       ("RetinotopicModel", RetinotopicModel)])
def test_registry_builds_the_new_models_from_the_schema(name, cls):
    cfg = config.resolve({"model_type": name, "img_shape": [10, 20, 20], "chans": [4, 4], "ksizes": [5, 5, 5],
                          "drop_p": 0.1, "stackconvs": True, "convgc": True, "rand_onehot": True, "n_layers": 3})
    model = build_model(cfg, n_units=4)
    assert type(model) is cls
    assert model(torch.randn(2, 10, 20, 20)).shape == (2, 4)
    assert set(model.conv_layers()) == {"conv1", "conv2"}
    assert any(isinstance(m, nn.Dropout) and m.p == 0.1 for m in model.modules())


def test_default_schema_builds_every_new_model():
    for name in ("LinearStackedBNCNN", "VaryModel", "RetinotopicModel"):
        model = build_model(config.resolve({"model_type": name}), n_units=2)
        assert model.img_shape == (40, 50, 50)
