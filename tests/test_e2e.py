"""End to end through the CLI, against a real MLflow server on localhost (and the embedded store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import SMALL, invoke, wait_until

pytestmark = pytest.mark.e2e


def cli(args, cwd, tracking_uri=None):
    """The CLI in this process (conftest.invoke): the tests here are about what it logs, not about processes."""
    return invoke(args, cwd, tracking_uri)


def write_search(folder: Path, exp_name: str, hp_extra=None, ranges=None):
    hp = {"exp_name": exp_name, **SMALL, "n_epochs": 2, "n_repeats": 2, "save_root": "runs", **(hp_extra or {})}
    hr = ranges if ranges is not None else {"lr": [0.01, 0.003], "chans": [[4, 4], [2, 4]]}
    (folder / "hp.json").write_text(json.dumps(hp))
    (folder / "hr.json").write_text(json.dumps(hr))
    return "hp.json", "hr.json"


def runs_of(client, exp_name):
    exp = client.get_experiment_by_name(exp_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "search"]
    children = [r for r in runs if r.data.tags.get("role") == "run"]
    return parents, children


@pytest.mark.slow
def test_search_logs_parent_children_metrics_checkpoints_and_rerun_skips(tmp_path, data_root, mlflow_server):
    hp, hr = write_search(tmp_path, "e2e_grid")
    first = cli(["search", hp, hr, "--data-root", str(data_root), "--no-progress"], tmp_path, mlflow_server)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "best_val_r" in first.stdout  # the summary table
    client = MlflowClient(mlflow_server)
    parents, children = runs_of(client, "e2e_grid")
    assert len(parents) == 1 and len(children) == 8
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["run_index"]) for c in children) == list(range(8))
    assert len({c.data.tags["config_id"] for c in children}) == 8
    by_index = {int(c.data.tags["run_index"]): c for c in children}
    # index order: lr outermost, chans next, repeats innermost
    assert [by_index[i].data.params["lr"] for i in range(8)] == ["0.01"] * 4 + ["0.003"] * 4
    assert [by_index[i].data.params["chans"] for i in range(4)] == ["[4, 4]", "[4, 4]", "[2, 4]", "[2, 4]"]
    assert by_index[0].data.params["seed"] != by_index[1].data.params["seed"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.params["batch_size"] == "128" and c.data.params["img_shape"] == "[10, 12, 12]"
        for key in ("train_loss", "val_pearson", "test_pearson", "val_loss", "lr"):
            assert [m.step for m in client.get_metric_history(c.info.run_id, key)] == [1, 2], key
        assert "best_val_pearson" in c.data.metrics
        # the headline test r is the best validation epoch's; the original's (its last epoch's) is logged beside it
        test_r = [m.value for m in client.get_metric_history(c.info.run_id, "test_pearson")]
        best = int(c.data.metrics["best_epoch"])
        assert c.data.metrics["test_pearson_last"] == pytest.approx(test_r[-1])
        assert c.data.metrics["test_pearson_at_best"] == pytest.approx(test_r[best - 1])
        ckpts = {Path(f.path).name for f in client.list_artifacts(c.info.run_id, "checkpoints")}
        assert {"latest.pt", "best.pt"} <= ckpts
        assert "hyperparams.json" in {f.path for f in client.list_artifacts(c.info.run_id)}
    # a logged checkpoint is usable: it holds the weights, the config and the normalisation statistics
    import torch

    local = client.download_artifacts(children[0].info.run_id, "checkpoints/best.pt", str(tmp_path))
    state = torch.load(local, weights_only=True)
    assert {"model", "optimizer", "config", "norm", "cell_ids"} <= set(state)
    # the seed's model folders
    assert len(list((tmp_path / "runs" / "e2e_grid").iterdir())) == 8

    # rerun (in the original's form: python -m trainer hp.json hr.json): everything is skipped
    again = cli([hp, hr, "--data-root", str(data_root), "--no-progress"], tmp_path, mlflow_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already FINISHED") == 8
    parents2, children2 = runs_of(client, "e2e_grid")
    assert len(parents2) == 1 and len(children2) == 8


def test_failed_run_is_marked_failed_and_the_search_goes_on(tmp_path, data_root, mlflow_server):
    hp, hr = write_search(tmp_path, "e2e_fail", {"n_repeats": 1, "n_epochs": 1, "lossfxn": "MSELoss",
                                                  "bnorm": False, "softplus": False},
                          {"lr": [1e12, 0.01]})
    res = cli(["search", hp, hr, "--data-root", str(data_root), "--no-progress"], tmp_path, mlflow_server)
    assert res.returncode == 1
    assert "1 of 2 runs did not finish" in res.stderr and "Traceback" not in res.stderr
    _, children = runs_of(MlflowClient(mlflow_server), "e2e_fail")
    status = {int(c.data.tags["run_index"]): c.info.status for c in children}
    assert status == {0: "FAILED", 1: "FINISHED"}


def test_embedded_store_in_working_directory(tmp_path, data_root):
    hp, _ = write_search(tmp_path, "e2e_local", {"n_repeats": 1, "n_epochs": 1})
    res = cli(["search", hp, "--data-root", str(data_root), "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, children = runs_of(client, "e2e_local")
    assert len(parents) == 1 and len(children) == 1 and children[0].info.status == "FINISHED"


@pytest.mark.parametrize("hp,hr,message", [
    ({"lrate": 0.1}, None, "unknown hyperparameter 'lrate'; did you mean 'lr'?"),
    ({"batch_size": "big"}, None, "batch_size must be an integer"),
    ({}, {"chans": [4, 8]}, "give a list of lists"),
    ({"dataset": "nothere"}, None, "recording not found"),
    ({"ksizes": [15, 11, 11]}, None, "kernels do not fit the input"),
    ({"cells": [0, 99]}, None, "cells"),
])
def test_user_errors_are_one_line_non_zero_and_leave_nothing(tmp_path, data_root, hp, hr, message):
    (tmp_path / "hp.json").write_text(json.dumps({**SMALL, **hp}))
    args = ["search", "hp.json"]
    if hr is not None:
        (tmp_path / "hr.json").write_text(json.dumps(hr))
        args.append("hr.json")
    res = cli(args + ["--data-root", str(data_root), "--no-progress"], tmp_path)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("error:")] == res.stderr.strip().splitlines()[-1:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_packed_search_trains_members_alone_in_mlflow_and_a_diverging_one_fails_alone(tmp_path, data_root,
                                                                                          mlflow_server):
    hp, hr = write_search(tmp_path, "e2e_pack", {"n_epochs": 2, "n_repeats": 2, "lossfxn": "MSELoss",
                                                 "bnorm": False},
                          {"lr": [1e12, 0.01, 0.003]})
    res = cli(["search", hp, hr, "--data-root", str(data_root), "--no-progress", "--pack", "4"], tmp_path,
              mlflow_server)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "6 runs to train in 2 packs (largest 4" in res.stderr
    assert "2 of 6 runs did not finish" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("FAILED: training loss became nan in epoch 1") == 2
    client = MlflowClient(mlflow_server)
    parents, children = runs_of(client, "e2e_pack")
    by_index = {int(c.data.tags["run_index"]): c for c in children}
    assert {i: c.info.status for i, c in by_index.items()} == {0: "FAILED", 1: "FAILED", 2: "FINISHED",
                                                               3: "FINISHED", 4: "FINISHED", 5: "FINISHED"}
    assert parents[0].info.status == "FAILED"
    names = [by_index[i].info.run_name for i in range(6)]
    assert by_index[2].data.tags["pack"] == ", ".join(names[:4])
    assert by_index[5].data.tags["pack"] == ", ".join(names[4:])
    for i in range(2, 6):
        c = by_index[i]
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val_pearson")] == [1, 2]
        # runs 0 and 1 diverge in epoch 1 and leave the first pack: its other two train on as a pack of 2
        sizes = [m.value for m in sorted(client.get_metric_history(c.info.run_id, "pack_size"), key=lambda m: m.step)]
        assert sizes == ([4.0, 2.0] if i < 4 else [2.0, 2.0])
        assert c.data.params["lr"] == ("0.01" if i < 4 else "0.003")
        assert {"latest.pt", "best.pt"} <= {Path(f.path).name for f in client.list_artifacts(c.info.run_id,
                                                                                              "checkpoints")}
        assert "per_cell.csv" in {Path(f.path).name for f in client.list_artifacts(c.info.run_id, "eval")}
        assert "filters.png" in {Path(f.path).name for f in client.list_artifacts(c.info.run_id, "plots")}
        assert c.data.metrics["best_val_pearson"] > 0.05
    # the two repeats of lr 0.01 start from their own seeds: different weights, different curves
    v2, v3 = (by_index[i].data.metrics["val_pearson"] for i in (2, 3))
    assert v2 != v3
    # a rerun with packing skips the finished runs and packs only those left (which fail again)
    again = cli(["search", hp, hr, "--data-root", str(data_root), "--no-progress", "--pack", "4"], tmp_path,
                mlflow_server)
    assert again.returncode == 1 and again.stderr.count("already FINISHED") == 4
    assert "2 runs to train in 1 pack (" in again.stderr


@pytest.mark.slow
def test_sigterm_kills_every_member_of_a_pack_and_a_rerun_resumes_each(tmp_path, data_root, mlflow_server):
    import signal

    hp, hr = write_search(tmp_path, "e2e_pack_term", {"n_epochs": 10, "n_repeats": 1, "early_stopping": 0},
                          {"lr": [0.01, 0.005, 0.002]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "trainer", "search", hp, hr, "--data-root", str(data_root), "--no-progress",
           "--pack", "3"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(mlflow_server)

    def two_epochs_each():
        children = runs_of(client, "e2e_pack_term")[1] if client.get_experiment_by_name("e2e_pack_term") else []
        return len(children) == 3 and all(len(client.get_metric_history(c.info.run_id, "train_loss")) >= 2
                                          for c in children)

    wait_until(two_epochs_each, "every pack member to log two epochs", proc, every=0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    _, children = runs_of(client, "e2e_pack_term")
    assert [c.info.status for c in children] == ["KILLED"] * 3
    for c in children:
        assert "latest.pt" in {Path(f.path).name for f in client.list_artifacts(c.info.run_id, "checkpoints")}
    again = cli(["search", hp, hr, "--data-root", str(data_root), "--no-progress", "--pack", "3", "--no-plots"],
                tmp_path, mlflow_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("resuming after epoch") == 3
    _, after = runs_of(client, "e2e_pack_term")
    assert {c.info.run_id for c in after} == {c.info.run_id for c in children}  # the same runs, resumed
    for c in after:
        assert c.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "train_loss")) == list(range(1, 11))
        # --no-plots: the final evaluation's scores and table, no plots
        assert "eval_test_pearson_mean" in client.get_run(c.info.run_id).data.metrics
        assert {Path(f.path).name for f in client.list_artifacts(c.info.run_id)} >= {"eval", "checkpoints"}
        assert not client.list_artifacts(c.info.run_id, "plots")
