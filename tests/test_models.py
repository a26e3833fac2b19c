"""Tests for the model registry, BNCNN, LN and the shared layers."""

import pytest
import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.models import MODELS, available, build_model, register
from trainer.models.bncnn import BNCNN, LN
from trainer.models.layers import ACTIVATIONS, GaussianNoise, activation, conv_out_size

SMALL = {"img_shape": (10, 20, 20), "chans": [4, 4], "ksizes": [5, 5, 5]}


def config(**overrides) -> dict:
    """A full, already-validated hyperparameter dict as the config layer would hand it over."""
    cfg = {
        "model_type": "BNCNN", "img_shape": [40, 50, 50], "chans": [8, 8], "ksizes": [15, 11, 11],
        "bnorm": True, "bnorm_d": 1, "bias": True, "gc_bias": False, "softplus": True, "noise": 0.05,
        "bn_moment": 0.01, "activ_fxn": "ReLU", "convgc": False, "drop_p": 0.0,
        "lr": 1e-3, "batch_size": 512,  # unrelated keys the models must ignore
    }
    cfg.update(overrides)
    return cfg


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --- layers -------------------------------------------------------------------------------------------------------

def test_conv_out_size():
    assert conv_out_size(50, 15) == 36
    assert conv_out_size(36, 11) == 26
    assert conv_out_size(10, 3, stride=2, padding=1) == 5
    assert conv_out_size(5, 7) <= 0


def test_activation_lookup():
    assert isinstance(activation("ReLU"), nn.ReLU)
    assert isinstance(activation("Tanh"), nn.Tanh)
    assert set(ACTIVATIONS) >= {"ReLU", "Tanh", "Softplus", "ELU", "LeakyReLU", "Sigmoid", "GELU"}
    with pytest.raises(ConfigError, match="activ_fxn 'Relu'.*ReLU, Tanh"):
        activation("Relu")
    with pytest.raises(ConfigError):
        activation("Module")  # a torch.nn attribute, but not an activation


def test_gaussian_noise_modes():
    x = torch.zeros(1000)
    noise = GaussianNoise(0.5)
    noise.train()
    y = noise(x)
    assert not torch.equal(y, x)
    assert 0.4 < y.std().item() < 0.6
    noise.eval()
    assert torch.equal(noise(x), x)
    zero = GaussianNoise(0.0).train()
    assert torch.equal(zero(x), x)


# --- BNCNN --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bnorm_d, expected", [(1, 138_362), (2, 106_842)])
def test_bncnn_param_count(bnorm_d, expected):
    model = build_model(config(bnorm_d=bnorm_d), n_units=5)
    assert n_params(model) == expected


def test_bncnn_feature_map_sizes():
    model = BNCNN(n_units=5)
    assert model.feature_shapes == [(8, 36, 36), (8, 26, 26)]
    seen = {}
    for name, conv in model.conv_layers().items():
        conv.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, tuple(out.shape[1:])))
    model.eval()
    assert model(torch.randn(2, 40, 50, 50)).shape == (2, 5)
    assert seen == {"conv1": (8, 36, 36), "conv2": (8, 26, 26)}


def test_bncnn_conv_layers_are_the_named_submodules():
    model = BNCNN(**SMALL)
    layers = model.conv_layers()
    assert list(layers) == ["conv1", "conv2"]
    assert layers["conv1"] is model.conv1 and layers["conv2"] is model.conv2
    assert all(isinstance(c, nn.Conv2d) for c in layers.values())


def test_bncnn_small_output_shape_and_positive():
    model = BNCNN(n_units=3, **SMALL)
    out = model(torch.randn(6, 10, 20, 20))  # train mode: batch stats, noise on
    assert out.shape == (6, 3)
    assert (out > 0).all()
    model.eval()
    out = model(torch.randn(6, 10, 20, 20))
    assert out.shape == (6, 3)
    assert (out > 0).all()


def test_softplus_false_allows_negative_outputs():
    torch.manual_seed(0)
    model = BNCNN(n_units=3, softplus=False, **SMALL)
    out = model(torch.randn(16, 10, 20, 20))  # train-mode output BN is zero-mean per unit, so some are negative
    assert (out < 0).any()
    assert not any(isinstance(m, nn.Softplus) for m in model.modules())


def test_gc_bias_adds_n_units_params():
    without = BNCNN(n_units=7, gc_bias=False, **SMALL)
    with_bias = BNCNN(n_units=7, gc_bias=True, **SMALL)
    assert n_params(with_bias) - n_params(without) == 7
    assert without.readout.bias is None and with_bias.readout.bias.shape == (7,)


def test_bias_false_removes_conv_biases():
    model = BNCNN(bias=False, **SMALL)
    assert model.conv1.bias is None and model.conv2.bias is None
    assert n_params(BNCNN(bias=True, **SMALL)) - n_params(model) == 4 + 4


def test_bnorm_false_removes_every_batch_norm():
    assert len(batch_norms(BNCNN(**SMALL))) == 3
    model = BNCNN(bnorm=False, **SMALL)
    assert batch_norms(model) == []
    assert model(torch.randn(2, 10, 20, 20)).shape == (2, 5)


def test_bnorm_d_changes_batch_norm_shapes():
    per_location = BNCNN(bnorm_d=1, **SMALL)  # maps 20 -> 16 -> 12
    per_channel = BNCNN(bnorm_d=2, **SMALL)
    assert [bn.weight.shape for bn in batch_norms(per_location)] == [(4 * 16 * 16,), (4 * 12 * 12,), (5,)]
    assert [bn.weight.shape for bn in batch_norms(per_channel)] == [(4,), (4,), (5,)]
    assert isinstance(per_channel.bn1, nn.BatchNorm2d)
    with pytest.raises(ConfigError, match="bnorm_d"):
        BNCNN(bnorm_d=3, **SMALL)


def test_bn_moment_is_momentum_of_every_batch_norm():
    model = build_model(config(bn_moment=0.3, **SMALL), n_units=2)
    bns = batch_norms(model)
    assert len(bns) == 3 and all(bn.momentum == 0.3 for bn in bns)


def test_noise_train_random_eval_deterministic():
    torch.manual_seed(0)
    model = BNCNN(noise=0.5, **SMALL)
    x = torch.randn(8, 10, 20, 20)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_noise_zero_is_deterministic_in_train_mode():
    model = BNCNN(noise=0.0, **SMALL).train()  # batch norm uses batch statistics, which are deterministic
    x = torch.randn(8, 10, 20, 20)
    assert torch.equal(model(x), model(x))


def test_noise_value_reaches_both_noise_layers():
    model = build_model(config(noise=0.2, **SMALL), n_units=2)
    assert [m.std for m in model.modules() if isinstance(m, GaussianNoise)] == [0.2, 0.2]


def test_activ_fxn_changes_activation():
    model = build_model(config(activ_fxn="Tanh", **SMALL), n_units=2)
    assert isinstance(model.act1, nn.Tanh) and isinstance(model.act2, nn.Tanh)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    with pytest.raises(ConfigError, match="activ_fxn"):
        build_model(config(activ_fxn="Swish", **SMALL), n_units=2)


def test_kernels_too_large_error_message():
    with pytest.raises(ConfigError) as err:
        build_model(config(img_shape=[10, 20, 20], ksizes=[15, 11, 11]), n_units=2)
    message = str(err.value)
    assert "img_shape" in message and "ksizes" in message
    assert "6x6" in message and "-4x-4" in message  # the resulting sizes 20 -> 6 -> -4
    assert "\n" not in message


def test_too_few_layers_is_config_error():
    with pytest.raises(ConfigError, match="chans"):
        BNCNN(chans=[8], ksizes=[15, 11])
    with pytest.raises(ConfigError, match="ksizes"):
        BNCNN(chans=[8, 8], ksizes=[15])


def test_every_bncnn_parameter_gets_a_gradient_that_lowers_the_loss():
    """Every parameter is on the loss's path (a nonzero gradient), and a small step against the gradient lowers
    the loss (float64, eval mode: no noise draw, fixed batch-norm statistics)."""
    torch.manual_seed(0)
    model = BNCNN(n_units=3, **SMALL).double().eval()
    x, y = torch.randn(8, 10, 20, 20, dtype=torch.float64), torch.rand(8, 3, dtype=torch.float64)
    loss = nn.functional.poisson_nll_loss(model(x), y, log_input=False)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-4 * p.grad
        after = nn.functional.poisson_nll_loss(model(x), y, log_input=False)
    assert after < loss


# --- LN -----------------------------------------------------------------------------------------------------------

def test_ln_param_count_and_output():
    h, height, width, n = 10, 20, 20, 4
    model = build_model(config(model_type="LN", img_shape=[h, height, width]), n_units=n)
    assert isinstance(model, LN)
    assert n_params(model) == height * width * h * n + n
    out = model(torch.randn(3, h, height, width))
    assert out.shape == (3, n) and (out > 0).all()


def test_ln_softplus_false_ends_in_elu_as_the_original():
    model = LN(n_units=2, img_shape=(2, 3, 3), softplus=False)
    x = torch.randn(5, 2, 3, 3)
    linear = model.readout(x.flatten(1))
    assert (linear < 0).any()  # the ELU's negative branch is exercised
    assert torch.allclose(model(x), nn.functional.elu(linear))


def test_ln_drops_stimulus_pixels_with_drop_p_in_training_only():
    model = LN(n_units=2, img_shape=(2, 3, 3), drop_p=0.5)
    x = torch.randn(5, 2, 3, 3)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    assert not torch.allclose(model.train()(x), model.train()(x))
    assert torch.equal(model.eval()(x), model.eval()(x))


# --- registry -----------------------------------------------------------------------------------------------------

def test_registry_lists_models():
    assert available()[:2] == ["BNCNN", "LN"]
    assert MODELS["BNCNN"] is BNCNN and MODELS["LN"] is LN


def test_build_model_uses_model_type():
    assert isinstance(build_model(config(model_type="BNCNN", **SMALL), n_units=2), BNCNN)
    assert isinstance(build_model(config(model_type="LN", **SMALL), n_units=2), LN)


def test_unknown_model_type():
    with pytest.raises(ConfigError, match=r"unknown model_type 'CNN' \(in hyperparams\): available: BNCNN, LN"):
        build_model(config(model_type="CNN"), n_units=2)


def test_register_rejects_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register("BNCNN")(type("Other", (), {}))
    assert MODELS["BNCNN"] is BNCNN
