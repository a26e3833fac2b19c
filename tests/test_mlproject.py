"""The MLflow Projects: the root MLproject (run end to end with `mlflow run` against a real server) and the
container project in mlflow_project/ (its commands as MLflow templates them)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.projects import _project_spec

from conftest import ROOT, SMALL

VENV_BIN = Path(sys.executable).parent


def fake_trainer(folder: Path) -> dict[str, str]:
    """An environment whose `retina-trainer` only prints its arguments, one per line."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    script = bin_dir / "retina-trainer"
    script.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "ARG:$a"; done\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def argv_of(command: str, cwd: Path, env: dict[str, str]) -> list[str]:
    """Run an entry point's command the way MLflow's local backend does (bash -c in the project folder)."""
    out = subprocess.run(["bash", "-c", command], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG:")]


GRID = ["--strategy", "grid", "--prune", "none", "--no-progress"]


@pytest.mark.parametrize("params, expected_tail", [
    ({}, ["--pack", "1", *GRID]),
    ({"hyperranges": "HR"}, ["HR", "--pack", "1", *GRID]),
    ({"data_root": "/my data"}, ["--data-root", "/my data", "--pack", "1", *GRID]),
    ({"hyperranges": "HR", "data_root": "/d", "pack": "8"}, ["HR", "--data-root", "/d", "--pack", "8", *GRID]),
    ({"hyperranges": "HR", "strategy": "tpe", "trials": "60", "prune": "asha"},
     ["HR", "--trials", "60", "--pack", "1", "--strategy", "tpe", "--prune", "asha", "--no-progress"]),
])
def test_root_project_passes_optional_parameters_only_when_given(tmp_path, params, expected_tail):
    (tmp_path / "hp.json").write_text("{}")
    params = {"hyperparams": str(tmp_path / "hp.json"),
              **{k: str(tmp_path / v) if v == "HR" else v for k, v in params.items()}}
    entry = _project_spec.load_project(str(ROOT)).get_entry_point("main")
    command = entry.compute_command(params, str(tmp_path))
    expected = ["search", str(tmp_path / "hp.json"),
                *[str(tmp_path / "HR") if a == "HR" else a for a in expected_tail]]
    assert argv_of(command, ROOT, fake_trainer(tmp_path)) == expected


def test_root_project_requires_hyperparams_and_declares_its_environment():
    project = _project_spec.load_project(str(ROOT))
    assert project.name == "retina-trainer"
    params = project.get_entry_point("main").parameters
    assert params["hyperparams"].default is None  # required
    assert params["hyperranges"].default == "" and params["data_root"].default == ""
    assert params["pack"].default == "1"
    assert project.env_type == "python_env" and Path(project.env_config_path).name == "python_env.yaml"


def test_container_project_commands_fit_the_image_entrypoint_and_the_kubernetes_backend():
    project = _project_spec.load_project(str(ROOT / "mlflow_project"))
    assert project.docker_env["image"].startswith("retina-trainer:")
    # docker_env: MLflow appends the command after the image, so it is the entrypoint's (retina-trainer's) arguments
    main = shlex.split(project.get_entry_point("main").compute_command({}, None))
    assert main[:1] == ["search"] and "/search/hyperparams.json" in main and "/search/hyperranges.json" in main
    assert main[main.index("--pack") + 1] == "1"
    single = shlex.split(project.get_entry_point("single").compute_command({}, None))
    assert single[:2] == ["search", "/search/hyperparams.json"] and "/search/hyperranges.json" not in single
    # the Kubernetes backend replaces the entrypoint with the command
    kube = shlex.split(project.get_entry_point("kubernetes").compute_command({}, None))
    assert kube[:2] == ["retina-trainer", "search"] and "/config/hyperparams.json" in kube
    # volumes are host-shell expanded, and fail clearly when their variable is unset
    volumes = " ".join(f"-v {v}" for v in project.docker_env["volumes"])
    env = {k: v for k, v in os.environ.items() if k not in ("RETINA_SEARCH_DIR", "RETINA_DATA_ROOT")}
    out = subprocess.run(["bash", "-c", f"echo {volumes}"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "RETINA_SEARCH_DIR" in out.stderr
    env.update(RETINA_SEARCH_DIR="/s", RETINA_DATA_ROOT="/d")
    out = subprocess.run(["bash", "-c", f"echo {volumes}"], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["-v", "/s:/search:ro", "-v", "/d:/data:ro"]
    config = json.loads((ROOT / "mlflow_project" / "kubernetes_config.json").read_text())
    assert {"repository-uri", "kube-job-template-path"} <= set(config)
    assert (ROOT / config["kube-job-template-path"]).is_file()  # relative to the repository root


@pytest.mark.e2e
def test_mlflow_run_makes_the_project_run_the_parent_of_the_search(tmp_path, data_root, mlflow_server):
    from mlflow.tracking import MlflowClient

    hp = {"exp_name": "mlproject", **SMALL, "n_epochs": 1, "save_root": str(tmp_path / "runs")}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "hr.json").write_text(json.dumps({"lr": [0.01, 0.003]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    cmd = [str(VENV_BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name", "mlproject",
           "-P", f"hyperparams={tmp_path / 'hp.json'}", "-P", f"hyperranges={tmp_path / 'hr.json'}",
           "-P", f"data_root={data_root}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mlproject")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    projects = [r for r in runs if r.data.tags.get("mlflow.source.type") == "PROJECT"]
    assert len(projects) == 1
    parent = projects[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["role"] == "search"
    assert parent.data.tags["mlflow.project.entryPoint"] == "main"
    # the project's params as MLflow logged them, never re-logged by the trainer
    assert set(parent.data.params) == {"hyperparams", "hyperranges", "data_root", "pack", "strategy", "trials", "prune"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert sorted(c.data.params["lr"] for c in children) == ["0.003", "0.01"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["role"] == "run"
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train_loss")] == [1]


@pytest.mark.e2e
@pytest.mark.slow
def test_mlflow_run_from_elsewhere_writes_nothing_into_the_project_and_a_rerun_says_it_is_done(tmp_path, data_root):
    """`mlflow run <project>` runs the command in the project folder; the search works where it was called: the
    embedded store and run folders land there. A rerun trains nothing, leaves the search's parent as it was and
    notes on its own run where the runs are."""
    from mlflow.tracking import MlflowClient

    before = sorted(p.name for p in ROOT.iterdir())
    (tmp_path / "hp.json").write_text(json.dumps({"exp_name": "elsewhere", **SMALL, "n_epochs": 1,
                                                  "save_root": "runs"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    cmd = [str(VENV_BIN / "mlflow"), "run", str(ROOT), "--env-manager", "local", "--experiment-name", "elsewhere",
           "-P", f"hyperparams={tmp_path / 'hp.json'}", "-P", f"data_root={data_root}"]
    for _ in range(2):
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "every run is FINISHED already; nothing to train" in out.stderr
    assert sorted(p.name for p in ROOT.iterdir()) == before  # no mlflow.db, no runs/ in the project
    assert (tmp_path / "mlflow.db").is_file() and list((tmp_path / "runs" / "elsewhere").glob("*/best.pt"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("elsewhere").experiment_id])
    projects = sorted((r for r in runs if r.data.tags.get("mlflow.source.type") == "PROJECT"),
                      key=lambda r: r.info.start_time)
    assert len(projects) == 2 and len([r for r in runs if r.data.tags.get("role") == "run"]) == 1
    assert "Nothing trained" in projects[1].data.tags["mlflow.note.content"]
    assert "mlflow.note.content" not in projects[0].data.tags
