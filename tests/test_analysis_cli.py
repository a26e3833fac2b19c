"""End to end: every run of a search does its analyses and logs them; `retina-trainer analyze` takes every form of
MODEL; bad input is one line with exit 2 and writes nothing; a failing analysis leaves the run FINISHED."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from test_e2e import cli, runs_of

from conftest import SMALL
from trainer.data.synth import write_synthetic

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def searched(tmp_path_factory, mlflow_server):
    """A search of a BNCNN and the LN on a synthetic recording with interneurons beside it, analyses on."""
    folder = tmp_path_factory.mktemp("analysis_e2e")
    data = folder / "data"
    write_synthetic(data, "synth01", "whitenoise", n_cells=3, size=12, train_frames=3000, test_frames=600,
                    n_repeats=4, history=10, seed=0, interneurons=400)
    hp = {"exp_name": "an_e2e", **SMALL, "n_epochs": 2, "save_root": "runs"}
    (folder / "hp.json").write_text(json.dumps(hp))
    (folder / "hr.json").write_text(json.dumps({"model_type": ["BNCNN", "LN"]}))
    res = cli(["search", "hp.json", "hr.json", "--data-root", str(data), "--no-progress", "--analysis"], folder,
              mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    _, children = runs_of(client, "an_e2e")
    by_type = {c.data.params["model_type"]: c for c in children}
    return {"folder": folder, "data": data, "runs": by_type, "client": client, "stderr": res.stderr}


def artifacts(client, run_id, path):
    return {Path(f.path).name for f in client.list_artifacts(run_id, path)}


@pytest.mark.slow
def test_each_run_logs_its_analyses_and_register_ranks_by_one(searched, mlflow_server):
    client, runs = searched["client"], searched["runs"]
    cnn, ln = runs["BNCNN"], runs["LN"]
    assert cnn.info.status == ln.info.status == "FINISHED"
    m = cnn.data.metrics
    for key in ("analysis_rf_truth_r_mean", "analysis_rf_truth_label_right", "analysis_intr_r_mean",
                "analysis_intr_control_r_mean", "analysis_intr_bipolars_r_mean", "analysis_step_response_on_off_index",
                "analysis_osr_ratio", "analysis_attr_conv1_top_fraction", "analysis_seconds"):
        assert key in m, key
    assert artifacts(client, cnn.info.run_id, "analysis") == {
        "receptive_fields.h5", "phenomena.json", "interneurons.csv", "interneurons_control.csv", "attribution.json",
        "analysis.json"}
    plots = artifacts(client, cnn.info.run_id, "plots/analysis")
    assert {"receptive_fields.png", "step_response.png", "interneurons.png"} <= plots and "oms.png" not in plots
    assert "oms" in cnn.data.tags["analysis_skipped"]  # 12x12 frames are too small for its disk
    # LN: receptive fields and phenomena; what needs hidden layers is skipped with the reason, not an error
    assert "analysis_rf_on_fraction" in ln.data.metrics and "analysis_intr_r_mean" not in ln.data.metrics
    assert "interneurons: LN has no hidden layers" in ln.data.tags["analysis_skipped"]
    assert "analysis_error" not in cnn.data.tags and "analysis_error" not in ln.data.tags
    # register ranks by an analysis metric: the LN run has none, so the BNCNN run is the best
    res = cli(["register", "an_e2e", "--metric", "analysis_intr_r_mean", "--name", "an_e2e"], searched["folder"],
              mlflow_server)
    assert res.returncode == 0, res.stderr
    assert cnn.info.run_id in res.stdout and "alias champion -> version 1" in res.stdout


@pytest.mark.slow
def test_analyze_takes_every_model_form_and_logs_to_the_run(searched, mlflow_server):
    folder, client, cnn = searched["folder"], searched["client"], searched["runs"]["BNCNN"]
    rid = cnn.info.run_id
    before = len(client.get_metric_history(rid, "analysis_rf_on_fraction"))
    register = cli(["register", "an_e2e", "--metric", "analysis_intr_r_mean", "--name", "an_e2e_forms"], folder,
                   mlflow_server)
    assert register.returncode == 0, register.stderr
    res = cli(["analyze", "models:/an_e2e_forms@champion", "--only", "receptive_fields", "--out", "o1"], folder,
              mlflow_server)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (folder / "o1").iterdir()) == ["analysis.json", "receptive_fields.h5",
                                                                 "receptive_fields.png"]
    assert f"logged to MLflow run {rid}" in res.stdout
    assert len(client.get_metric_history(rid, "analysis_rf_on_fraction")) == before + 1  # logged again
    res = cli(["analyze", f"runs:/{rid}", "--only", "oms,osr"], folder, mlflow_server)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "note: oms skipped" in res.stderr and "analysis_osr_ratio" in res.stdout
    res = cli(["analyze", rid, "--only", "attribution"], folder, mlflow_server)
    assert res.returncode == 0 and "analysis_attr_conv2_top_fraction" in res.stdout, res.stderr[-2000:]
    best = next((folder / "runs" / "an_e2e").glob("*BNCNN*/best.pt"))
    res = cli(["analyze", str(best), "--only", "receptive_fields,interneurons", "--data-root",
               str(searched["data"])], folder)
    assert res.returncode == 0, res.stderr[-2000:]
    with (best.parent / "analysis" / "interneurons.csv").open() as f:
        header = f.readline().strip()
    assert header == "file,stim,cell,layer,channel,row,col,r"
    with h5py.File(best.parent / "analysis" / "receptive_fields.h5") as f:
        assert f["cells/sta"].shape == (3, *SMALL["img_shape"])


@pytest.mark.slow
def test_analysis_errors_are_one_line_exit_2_and_write_nothing(searched, mlflow_server):
    folder = searched["folder"]
    ln = next((folder / "runs" / "an_e2e").glob("*LN*/best.pt"))
    cnn = next((folder / "runs" / "an_e2e").glob("*BNCNN*/best.pt"))
    bad = folder / "bad_layout.h5"
    with h5py.File(bad, "w") as f:
        f["flashes/stimuli"] = np.zeros((100, 12, 12), np.float32)
    big = folder / "big.h5"
    with h5py.File(big, "w") as f:
        f["boxes/stimuli"] = np.zeros((100, 20, 20), np.float32)
        f["boxes/detrended_membrane_potential"] = np.zeros((2, 100))
    cases = [
        (["analyze", str(ln), "--only", "interneurons", "--out", "e1"], "e1", "LN has no hidden layers"),
        (["analyze", str(cnn), "--interneurons", str(bad), "--out", "e2"], "e2", "no group 'boxes'"),
        (["analyze", str(cnn), "--interneurons", str(big), "--out", "e3"], "e3", "larger than the model's input"),
        (["analyze", str(cnn), "--only", "receptive_fields,osrr", "--out", "e4"], "e4", "did you mean 'osr'"),
        (["analyze", str(cnn), "--recording", "missing.h5", "--out", "e5"], "e5", "recording not found"),
        (["analyze", str(cnn), "--recording", str(searched["data"] / "synth01" / "interneurons" / "bipolars.h5"),
          "--out", "e6"], "e6", "frames"),
    ]
    for args, out, message in cases:
        res = cli(args, folder)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        lines = res.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr
        assert not (folder / out).exists() or not any((folder / out).iterdir()), out
        assert not list(folder.glob(".analysis.*")), "a temporary folder was left behind"
    ok = cli(["analyze", str(cnn), "--only", "receptive_fields", "--out", "e7"], folder)
    assert ok.returncode == 0, ok.stderr[-2000:]
    again = cli(["analyze", str(cnn), "--only", "receptive_fields", "--out", "e7"], folder)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.slow
def test_a_run_whose_analysis_fails_ends_finished_with_the_failure_tagged(tmp_path, data_root, mlflow_server):
    bad = tmp_path / "intr.h5"
    with h5py.File(bad, "w") as f:
        f["lines/stimuli"] = np.zeros((100, 12, 12), np.float32)
    hp = {"exp_name": "an_fail", **SMALL, "n_epochs": 1, "save_root": "runs", "analysis_interneurons": str(bad)}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    res = cli(["search", "hp.json", "--data-root", str(data_root), "--no-progress", "--analysis"], tmp_path,
              mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "its analysis failed" in res.stderr and "ends FINISHED" in res.stderr
    _, (run,) = runs_of(MlflowClient(mlflow_server), "an_fail")
    assert run.info.status == "FINISHED"
    assert "no group 'boxes'" in run.data.tags["analysis_error"]
    assert "best_val_pearson" in run.data.metrics and "eval_test_pearson_mean" in run.data.metrics
