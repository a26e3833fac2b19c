"""Evaluation at the end of every run, the model registry's champion, loading and prediction: through the CLI
against a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_e2e import cli, runs_of

from conftest import SMALL
from trainer.inference import load_model

pytestmark = pytest.mark.e2e


def search(folder: Path, exp_name: str, data_root: Path, uri: str, **hp) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hp.json").write_text(json.dumps({"exp_name": exp_name, **SMALL, "n_epochs": 2, **hp}))
    (folder / "hr.json").write_text(json.dumps({"seed": [1, 2]}))
    res = cli(["search", "hp.json", "hr.json", "--data-root", str(data_root), "--no-progress"], folder, uri)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_evaluate_register_load_predict(tmp_path, data_root, mlflow_server):
    client = MlflowClient(mlflow_server)
    good, bad = "reg_good", "reg_bad"
    search(tmp_path / "good", good, data_root, mlflow_server, lr=0.01)
    search(tmp_path / "bad", bad, data_root, mlflow_server, lr=1e-7, noise=0.0)

    # every run was evaluated on its best checkpoint: scores, the per-cell table and plots
    parents, children = runs_of(client, good)
    for c in children:
        m = c.data.metrics
        for key in ("eval_test_pearson_mean", "eval_truth_pearson_mean", "eval_reliability_loo_mean",
                    "eval_feve_mean", "eval_cc_norm_mean"):
            assert key in m and np.isfinite(m[key]), key
        assert -1 <= m["eval_test_pearson_mean"] <= 1
        names = {Path(f.path).name for f in client.list_artifacts(c.info.run_id, "plots")}
        assert {"predictions.png", "filters.png", "curves.png"} <= names
        table = client.download_artifacts(c.info.run_id, "eval/per_cell.csv", str(tmp_path))
        rows = Path(table).read_text().strip().splitlines()
        assert rows[0].startswith("cell,test_pearson") and len(rows) == 1 + 3 + 1  # header, 3 cells, mean
    assert "search_best_val_pearson.png" in {
        Path(f.path).name for f in client.list_artifacts(parents[0].info.run_id, "plots")}

    # register: the worse search first (becomes champion), then the better one (takes the alias), then the worse
    # one again (a new version, the alias stays)
    def register(target):
        res = cli(["register", target, "--name", "retina-model"], tmp_path, mlflow_server)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    assert "alias champion -> version 1" in register(bad)
    assert "alias champion -> version 2 (was version 1)" in register(good)
    assert "alias champion stays on version 2" in register(bad)
    champ = client.get_model_version_by_alias("retina-model", "champion")
    assert champ.version == "2"
    best_good = max(children, key=lambda r: r.data.metrics["best_val_pearson"])
    assert champ.run_id == best_good.info.run_id
    for tag in ("dataset", "stim_type", "cells", "model_type", "run_id", "metric.best_val_pearson"):
        assert tag in champ.tags
    assert champ.tags["dataset"] == "synth01"

    # load the champion: the same weights as the run's best checkpoint, ready to predict
    import os

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        loaded = load_model("models:/retina-model@champion")
        by_run = load_model(f"runs:/{best_good.info.run_id}")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    for (k, a), (_, b) in zip(loaded.model.state_dict().items(), by_run.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.cell_ids == [0, 1, 2] and loaded.config["img_shape"] == SMALL["img_shape"]

    # predict writes the rates of every group; evaluate prints the per-cell scores
    rec = data_root / "synth01" / "whitenoise.h5"
    res = cli(["predict", "models:/retina-model@champion", str(rec), "pred.h5"], tmp_path, mlflow_server)
    assert res.returncode == 0, res.stderr[-2000:]
    with h5py.File(tmp_path / "pred.h5") as f, h5py.File(rec) as r:
        h = SMALL["img_shape"][0]
        assert f["test/firing_rate"].shape == (3, r["test/stimulus"].shape[0] - h)
        assert np.array_equal(f["test/time"][()], r["test/time"][h:])
        pred = f["test/firing_rate"][()].T
    # the written rates are the loaded model's predictions
    assert np.allclose(pred, loaded.predict(h5py.File(rec)["test/stimulus"][()]), atol=1e-5)
    again = cli(["predict", "models:/retina-model@champion", str(rec), "pred.h5"], tmp_path, mlflow_server)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    res = cli(["evaluate", best_good.info.run_id, "--data-root", str(data_root)], tmp_path, mlflow_server)
    assert res.returncode == 0, res.stderr[-2000:]
    mean_row = [ln for ln in res.stdout.splitlines() if ln.startswith("mean,")][0]
    assert float(mean_row.split(",")[1]) == pytest.approx(best_good.data.metrics["eval_test_pearson_mean"],
                                                          abs=1e-4)


def test_register_unknown_target_is_one_line(tmp_path, mlflow_server):
    res = cli(["register", "no_such_experiment"], tmp_path, mlflow_server)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no experiment, search id or parent run 'no_such_experiment'" in res.stderr
