"""The original's own configs: every key of every shipped training_scripts/*.json loads, mapped onto ours or named in
one warning, and a lab's hyperparams.json trains with `python -m trainer hyperparams.json hyperranges.json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import config
from trainer.errors import ConfigError

DATA = Path(__file__).parent / "data" / "original_configs.json"
CONFIGS = json.loads(DATA.read_text())["configs"]


def label(entry: dict) -> str:
    return f"{entry['file']}@{entry['commit'][:7]}"


def parse(entry: dict) -> config.Loaded:
    parser = config.parse_hyperparams if entry["kind"] == "hyperparams" else config.parse_hyperranges
    return parser(entry["content"], label(entry))


@pytest.mark.parametrize("entry", CONFIGS, ids=label)
def test_every_shipped_config_loads(entry):
    content = entry["content"]
    model = content.get("model_type")
    if entry["kind"] == "hyperparams" and (model in config.ORIGINAL_ONLY_MODELS or model == ""):
        # a model class we do not provide (or a template's blank): the one error is about model_type, it says
        # so, and every key of the file loads once model_type names one of ours
        with pytest.raises(ConfigError, match="model_type") as err:
            parse(entry)
        assert model == "" or "a model of the original that retina-trainer does not provide" in str(err.value)
        content = {**content, "model_type": "BNCNN"}
        if "datasets" in content:  # the multi-recording models took one cells entry per recording
            content["cells"] = "all"
        entry = {**entry, "content": content}
    loaded = parse(entry)
    known = set(config.BY_NAME) | set(config.ALIASES) | set(config.LEGACY_NOOP)
    assert set(entry["content"]) <= known
    ignored = [k for k in entry["content"] if k in config.LEGACY_NOOP]
    warning = [w for w in loaded.warnings if "ignoring keys of the original" in w]
    assert len(warning) == (1 if ignored else 0)
    for key in ignored:
        assert key in warning[0]


def test_the_originals_keys_mean_what_they_meant_there():
    loaded = config.parse_hyperparams({
        "retinotopic": True, "linear_bias": None, "bnorm_momentum": 0.02, "semantic_loss_scale": 40,
        "n_cv_folds": 5, "prune_intvl": 15, "alpha_steps": 7, "intg_bsize": 300, "zero_bias": False,
        "abssum": True, "seed": None, "scheduler": None, "datapath": "/data", "data_set": "15-11-21b",
        "starting_exp_num": 3, "finalstack": False}, "hp.json")
    v = loaded.values
    assert v["train_loop"] == "retinotopic_loop"  # the flag that chose the loop
    assert v["gc_bias"] is False and v["bn_moment"] == 0.02 and v["semantic_scale"] == 40
    assert v["val_frac"] == pytest.approx(0.2)  # validation was the last 1/n_cv_folds of the samples
    assert (v["prune_intvl"], v["alpha_steps"], v["intg_bsize"], v["zero_bias"], v["abssum"]) == (15, 7, 300, False,
                                                                                                  True)
    assert v["seed"] == 0 and v["scheduler"] == "none" and v["data_root"] == "/data" and v["dataset"] == "15-11-21b"
    assert any("seed null" in w for w in loaded.warnings)
    assert [w for w in loaded.warnings if "ignoring" in w][0].endswith(
        "change nothing here: finalstack, starting_exp_num (docs/differences.md)")


def test_retinotopic_overrides_train_loop_as_in_the_original():
    loaded = config.parse_hyperparams({"train_loop": "retinotopic_loop", "retinotopic": False}, "hp.json")
    assert loaded.values["train_loop"] == "train_loop"
    assert any("overridden by 'retinotopic'" in w for w in loaded.warnings)
    ranges = config.parse_hyperranges({"retinotopic": [True, False]}, "hr.json")
    assert ranges.values["train_loop"] == ["retinotopic_loop", "train_loop"]


@pytest.mark.parametrize("key, value", [("cross_val", True), ("zscorey", True), ("shift_labels", True),
                                        ("startpt", "runs/x/test_epoch_3.pt"), ("reset_sd", True)])
def test_an_original_feature_we_do_not_have_is_refused_not_ignored(key, value):
    with pytest.raises(ConfigError, match=rf"key '{key}' .* asks for .*which retina-trainer does not do; remove "):
        config.parse_hyperparams({key: value}, "hp.json")
    with pytest.raises(ConfigError, match=rf"key '{key}'"):
        config.parse_hyperranges({key: [value]}, "hr.json")


def test_an_original_model_class_gets_a_hint():
    with pytest.raises(ConfigError, match="BNCNN2D is a model of the original .* BNCNN with bnorm_d 2"):
        config.parse_hyperparams({"model_type": "BNCNN2D"}, "hp.json")


@pytest.mark.e2e
def test_a_labs_shipped_config_trains_with_the_originals_command(tmp_path):
    """hyperparams.json and hyperranges.json as shipped (507decb, 901bebe), shrunk to a small synthetic recording
    of the same dataset name: the original's cells, repeats and validation fraction, with one warning line."""
    from mlflow.tracking import MlflowClient

    from trainer.data.synth import write_synthetic

    hp = next(c for c in CONFIGS if c["file"] == "hyperparams.json" and c["commit"].startswith("507decb"))["content"]
    hr = next(c for c in CONFIGS if c["file"] == "hyperranges.json" and c["commit"].startswith("901bebe"))["content"]
    small = {"exp_name": "lab", "img_shape": [10, 16, 16], "ksizes": [5, 5, 3], "batch_size": 256, "n_epochs": 1}
    (tmp_path / "hyperparams.json").write_text(json.dumps({**hp, **small}))
    (tmp_path / "hyperranges.json").write_text(json.dumps(hr))
    # 15-10-07 with 7 recorded cells: "all" must mean the original's 0..4
    write_synthetic(tmp_path / "data", "15-10-07", "naturalscene", n_cells=7, size=16, train_frames=2500,
                    test_frames=400, n_repeats=3, history=10, seed=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(RETINA_DATA_ROOT=str(tmp_path / "data"), MLFLOW_DISABLE_TELEMETRY="true")
    res = subprocess.run([sys.executable, "-m", "trainer", "hyperparams.json", "hyperranges.json", "--no-progress",
                          "--no-plots"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    ignoring = [ln for ln in res.stderr.splitlines() if "ignoring keys of the original" in ln]
    assert len(ignoring) == 1 and "cross_val" in ignoring[0] and "exp_num_offset" in ignoring[0]
    assert "seed null" in res.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lab")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "run"]
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # n_repeats 3
    for r in runs:
        p = r.data.params
        assert json.loads(p["cell_ids"]) == [0, 1, 2, 3, 4] and "original's list for 15-10-07" in p["cells_source"]
        assert float(p["val_frac"]) == pytest.approx(0.1) and p["model_type"] == "VaryModel"
        assert p["convgc"] == "true" and p["stackconvs"] == "true" and p["zero_bias"] == "false"
    assert len({r.data.params["seed"] for r in runs}) == 3  # each repeat its own seed
