"""The hyperparameter schema: defaults, types, ranges, unknown and legacy keys."""

import json

import pytest

from trainer import config
from trainer.errors import ConfigError


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_every_seed_readme_key_is_in_the_schema(seed_readme_keys):
    assert seed_readme_keys, "could not read the keys of the seed README"
    missing = [k for k in seed_readme_keys if k not in config.BY_NAME]
    assert missing == []


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    loaded = config.load_hyperparams(write(tmp_path, "hp.json", {"lr": 0.1, "chans": [4, 2]}))
    cfg = config.resolve(loaded.values)
    assert cfg["lr"] == 0.1 and cfg["chans"] == [4, 2]
    assert cfg["batch_size"] == config.BY_NAME["batch_size"].default
    assert list(cfg) == [p.name for p in config.SCHEMA]


def test_int_is_accepted_for_float_and_becomes_float(tmp_path):
    loaded = config.load_hyperparams(write(tmp_path, "hp.json", {"lr": 1}))
    assert loaded.values["lr"] == 1.0 and isinstance(loaded.values["lr"], float)


@pytest.mark.parametrize("key,value,message", [
    ("semantic_scael", 1.0, r"unknown hyperparameter 'semantic_scael'; did you mean 'semantic_scale'\?"),
    ("lr", "0.01", r"hp.json: key 'lr': lr must be a number, got \"0.01\""),
    ("batch_size", 2.5, r"batch_size must be an integer"),
    ("bnorm", 1, r"bnorm must be true or false"),
    ("chans", 8, r"chans must be a list of integers"),
    ("bnorm_d", 3, r"bnorm_d must be 1 or 2, got 3"),
    ("n_layers", 0, r"n_layers must be >= 1"),
    ("lr", -0.1, r"lr must be > 0"),
    ("img_shape", [40, 50], r"img_shape must have 3 entries"),
    ("lossfxn", "L1Loss", r"lossfxn \"L1Loss\" is not one of: PoissonNLLLoss, MSELoss"),
    ("model_type", "NoSuchModel", r"model_type \"NoSuchModel\" is not one of: BNCNN"),
    ("cells", [0, 0], r"cells lists a cell twice"),
    ("cells", "some", r"cells must be \"all\" or a list of integers"),
    ("exp_name", "a/b", r"exp_name must not contain '/'"),
    ("drop_p", 1.0, r"drop_p must be in \[0, 1\)"),
])
def test_bad_values_name_key_file_and_expectation(tmp_path, key, value, message):
    path = write(tmp_path, "hp.json", {key: value})
    with pytest.raises(ConfigError, match=message):
        config.load_hyperparams(path)


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "hp.json", '{\n  "lr": 0.1,\n}')
    with pytest.raises(ConfigError, match=r"hp.json:3:1: invalid JSON"):
        config.load_hyperparams(path)


def test_top_level_must_be_an_object(tmp_path):
    with pytest.raises(ConfigError, match="expected a JSON object"):
        config.load_hyperparams(write(tmp_path, "hp.json", "[1, 2]"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="hyperparams file not found"):
        config.load_hyperparams(tmp_path / "nope.json")


def test_original_configs_load_mapping_and_warning_once(tmp_path):
    original = {"exp_name": "old", "datapath": "/data/retina", "save_root": "out", "seed": 3,
                "activ_fxn": "Tanh", "finalstack": False, "retinotopic": False, "cross_val": False,
                "zscorey": False, "scheduler": "MultiStepLR", "scheduler_milestones": [5],
                "scheduler_scale": 0.1, "scheduler_patience": 2, "scheduler_thresh": 0.01}
    loaded = config.load_hyperparams(write(tmp_path, "hp.json", original))
    assert loaded.values["data_root"] == "/data/retina"
    assert loaded.values["activ_fxn"] == "Tanh" and loaded.values["save_root"] == "out"
    assert loaded.values["train_loop"] == "train_loop"  # retinotopic false chose the plain loop
    assert len(loaded.warnings) == 1
    assert "cross_val, finalstack, zscorey" in loaded.warnings[0]


def test_alias_and_its_target_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'datapath' and 'data_root' both set data_root"):
        config.load_hyperparams(write(tmp_path, "hp.json", {"datapath": "a", "data_root": "b"}))


def test_ranges_list_valued_key_needs_list_of_lists(tmp_path):
    path = write(tmp_path, "hr.json", {"chans": [8, 16]})
    with pytest.raises(ConfigError, match=r"takes a list per run, so give a list of lists"):
        config.load_hyperranges(path)
    ok = config.load_hyperranges(write(tmp_path, "hr2.json", {"chans": [[8, 8], [16, 8]]}))
    assert ok.values["chans"] == [[8, 8], [16, 8]]


def test_ranges_values_are_type_checked_and_lists(tmp_path):
    with pytest.raises(ConfigError, match="non-empty list of values"):
        config.load_hyperranges(write(tmp_path, "hr.json", {"lr": 0.1}))
    with pytest.raises(ConfigError, match="lr must be a number"):
        config.load_hyperranges(write(tmp_path, "hr.json", {"lr": [0.1, "x"]}))
    with pytest.raises(ConfigError, match="n_repeats cannot be searched"):
        config.load_hyperranges(write(tmp_path, "hr.json", {"n_repeats": [1, 2]}))


def test_cells_ranges(tmp_path):
    ok = config.load_hyperranges(write(tmp_path, "hr.json", {"cells": ["all", [0, 2]]}))
    assert ok.values["cells"] == ["all", [0, 2]]
    with pytest.raises(ConfigError, match="cells"):
        config.load_hyperranges(write(tmp_path, "hr.json", {"cells": [0, 1]}))


def test_cross_key_checks():
    cfg = config.resolve({"scheduler": "MultiStepLR", "scheduler_milestones": []})
    with pytest.raises(ConfigError, match="needs scheduler_milestones"):
        config.check_run(cfg, "run 0")
    with pytest.raises(ConfigError, match="log_poisson only applies"):
        config.check_run(config.resolve({"lossfxn": "MSELoss", "log_poisson": True}), "run 0")


def test_registries_match_the_schema_choices(data_root, tmp_path):
    import torch

    from conftest import SMALL
    from trainer import models
    from trainer.data.recording import load_data, recording_path
    from trainer.training.trainer import Trainer

    assert tuple(models.available()) == config.MODEL_TYPES
    cfg = config.resolve(SMALL)
    bundle = load_data(recording_path(data_root, "synth01", "whitenoise"), img_shape=SMALL["img_shape"])
    trainer = Trainer(models.build_model(cfg, bundle.n_cells), bundle, cfg, tmp_path, torch.device("cpu"))
    assert tuple(trainer.loops) == config.TRAIN_LOOPS


@pytest.mark.parametrize("typed, meant", [("learning_rate", "lr"), ("epochs", "n_epochs"), ("batchsize", "batch_size"),
                                          ("weight_decay", "l2"), ("lr_rate", "lr"), ("Dropout", "drop_p")])
def test_common_spellings_point_at_the_right_key(tmp_path, typed, meant):
    with pytest.raises(ConfigError, match=rf"unknown hyperparameter '{typed}'; did you mean '{meant}'\?"):
        config.load_hyperparams(write(tmp_path, "hp.json", {typed: 1}))
    assert meant in config.BY_NAME


def test_a_poisson_search_without_log_poisson_is_warned_once_and_trains_rates(tmp_path):
    """The original built PoissonNLLLoss() when a config omitted log_poisson (hyperparams_template.json,
    chan_search_hyperparams.json): torch's log_input=True. Ours is false (a bug fixed by default), said in one line
    that names the file and both fixes; a config that sets it, searches it or trains another loss hears nothing."""
    from trainer.search import expand

    def warned(params: dict, ranges: dict | None = None) -> list[str]:
        (tmp_path / "hp.json").write_text(json.dumps({"exp_name": "x", **params}))
        rp = None
        if ranges is not None:
            rp = tmp_path / "hr.json"
            rp.write_text(json.dumps(ranges))
        s = expand(tmp_path / "hp.json", rp)
        assert all(not r.config["log_poisson"] for r in s.runs if "log_poisson" not in params | (ranges or {}))
        return [w for w in s.warnings if "log_poisson" in w]

    (line,) = warned({})
    assert str(tmp_path / "hp.json") in line and "log_input=True" in line and '"log_poisson": false' in line
    assert "\n" not in line
    assert warned({"lossfxn": "PoissonNLLLoss", "lr": 0.01}, {"lr": [0.1, 0.01]}) == [line]
    assert warned({"log_poisson": False}) == []
    assert warned({}, {"log_poisson": [True, False]}) == []
    assert warned({"lossfxn": "MSELoss"}) == []
    assert len(warned({"lossfxn": "MSELoss"}, {"lossfxn": ["MSELoss", "PoissonNLLLoss"]})) == 1
