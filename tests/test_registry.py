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
    # one again (its run is registered already: nothing new; a worse new run keeping the alias is
    # tests/test_registry_rules.py)
    def register(target):
        res = cli(["register", target, "--name", "retina-model"], tmp_path, mlflow_server)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    assert "alias champion -> version 1" in register(bad)
    assert "alias champion -> version 2 (was version 1)" in register(good)
    assert "is already version 1 of retina-model; nothing registered" in register(bad)  # a no-op, said so
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_registered_model_is_an_mlflow_model_that_mlflow_serves(tmp_path, data_root, mlflow_server):
    """Registered from a packed search: mlflow.pyfunc and mlflow.pytorch load it, and `mlflow models serve` answers
    an HTTP request with the rates `retina-trainer predict` writes."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow
    import mlflow.pytorch

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "hp.json").write_text(json.dumps({"exp_name": "served", **SMALL, "n_epochs": 1}))
    (folder / "hr.json").write_text(json.dumps({"lr": [0.01, 0.005]}))
    res = cli(["search", "hp.json", "hr.json", "--data-root", str(data_root), "--no-progress", "--no-plots",
               "--pack", "2"], folder, mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    reg = cli(["register", "served", "--name", "served-model"], tmp_path, mlflow_server)
    assert reg.returncode == 0 and "registered served-model version 1" in reg.stdout, reg.stderr[-2000:]
    rec = data_root / "synth01" / "whitenoise.h5"
    assert cli(["predict", "models:/served-model@champion", str(rec), "pred.h5"], tmp_path,
               mlflow_server).returncode == 0
    with h5py.File(tmp_path / "pred.h5") as f, h5py.File(rec) as r:
        expected = f["test/firing_rate"][()].T
        stimulus = r["test/stimulus"][()].astype(np.float32)

    mlflow.set_tracking_uri(mlflow_server)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/served-model@champion")
        assert np.allclose(pyfunc.predict(stimulus), expected, rtol=1e-5, atol=1e-6)
        assert type(mlflow.pytorch.load_model("models:/served-model@champion")).__name__ == "RatePredictor"
    finally:
        mlflow.set_tracking_uri(None)

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                               "models:/served-model@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                               str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.communicate()[1][-3000:]
                time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": stimulus.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            served = np.asarray(json.loads(answer.read())["predictions"])
        assert served.shape == expected.shape and np.allclose(served, expected, rtol=1e-5, atol=1e-6)
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.parametrize("model_type, extra", [("BNCNN", {}), ("LN", {}), ("LinearStackedBNCNN", {}),
                                               ("VaryModel", {"convgc": True}), ("RetinotopicModel", {})])
def test_every_model_type_logs_an_mlflow_model_that_predicts_as_retina_trainer(tmp_path, data_root, model_type,
                                                                               extra, monkeypatch):
    import mlflow

    from trainer.tracking import MODEL_ID

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hp.json").write_text(json.dumps({"exp_name": "types", **SMALL, "n_epochs": 1,
                                                  "model_type": model_type, **extra}))
    from click.testing import CliRunner

    from trainer.cli import main

    res = CliRunner().invoke(main, ["search", "hp.json", "--data-root", str(data_root), "--no-progress",
                                    "--no-plots"])
    assert res.exit_code == 0, res.output
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        run = client.search_runs([client.get_experiment_by_name("types").experiment_id], "tags.role = 'run'")[0]
        pyfunc = mlflow.pyfunc.load_model(f"models:/{run.data.tags[MODEL_ID]}")
        ours = load_model(f"runs:/{run.info.run_id}")
    finally:
        mlflow.set_tracking_uri(None)
    with h5py.File(data_root / "synth01" / "whitenoise.h5") as r:
        stimulus = r["test/stimulus"][()].astype(np.float32)
    assert np.allclose(pyfunc.predict(stimulus), ours.predict(stimulus), rtol=1e-5, atol=1e-6)


def test_each_run_says_what_data_code_and_machine_made_it(tmp_path, data_root, monkeypatch):
    """Provenance: the recording as the run's dataset input (with the file's digest), tags for the code and the
    machine, system metrics, the experiment opened as model training; evaluate warns on another file."""
    import shutil

    from click.testing import CliRunner

    from trainer.cli import main
    from trainer.data.recording import recording_digest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # a sample every 0.2 s: in a warm process the run takes about a second, and a sample is logged only when its
    # interval is over before the run ends
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("RETINA_IMAGE", "registry.example.com/retina-trainer:0.2.0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hp.json").write_text(json.dumps({"exp_name": "prov", **SMALL, "n_epochs": 3}))
    res = CliRunner().invoke(main, ["search", "hp.json", "--data-root", str(data_root), "--no-progress",
                                    "--no-plots"])
    assert res.exit_code == 0, res.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prov")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([exp.experiment_id], "tags.role = 'run'")[0]
    rec = data_root / "synth01" / "whitenoise.h5"
    (di,) = run.inputs.dataset_inputs
    assert di.dataset.name == "synth01/whitenoise" and di.dataset.digest == recording_digest(rec)
    assert json.loads(di.dataset.source)["uri"] == str(rec.resolve())
    tags = run.data.tags
    for key in ("retina_trainer.version", "torch.version", "cuda.version", "host", "device", "image"):
        assert tags[key], key
    assert tags["device"] == "cpu" and tags["image"].endswith(":0.2.0")
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert "epoch 3/3 train_loss" in res.output  # one line per epoch without a terminal
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/per_cell_table.json",
                                                      str(tmp_path))).read_text())
    assert table["columns"][0] == "cell" and len(table["data"]) == 3

    # evaluate scores the recorded file by default; another file with other contents is named in a warning
    ev = CliRunner().invoke(main, ["evaluate", f"runs:/{run.info.run_id}"])
    assert ev.exit_code == 0 and "warning" not in ev.output and str(rec.resolve()) in ev.output
    other = tmp_path / "other" / "synth01"
    other.mkdir(parents=True)
    shutil.copy(rec, other / "whitenoise.h5")
    with h5py.File(other / "whitenoise.h5", "a") as f:
        f.attrs["changed"] = 1
    ev = CliRunner().invoke(main, ["evaluate", f"runs:/{run.info.run_id}", "--data-root", str(tmp_path / "other")])
    assert ev.exit_code == 0
    assert [ln for ln in ev.output.splitlines() if ln.startswith("warning:") and "is not the file" in ln]
