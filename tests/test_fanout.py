"""The Indexed Job's pod command (`run-index`) run for real as separate processes against a real MLflow server:
fan-out two at a time, SIGKILL and restart (resume from the MLflow checkpoint), SIGTERM (KILLED with a
checkpoint), and a second pass that skips everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import SMALL, invoke, wait_until
from trainer.search import expand

pytestmark = pytest.mark.e2e


def make_search(folder: Path, exp_name: str, hp_extra: dict, ranges: dict) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    hp = folder / "hyperparams.json"
    hr = folder / "hyperranges.json"
    hp.write_text(json.dumps({"exp_name": exp_name, **SMALL, "save_root": "runs", **hp_extra}))
    hr.write_text(json.dumps(ranges))
    return hp, hr


@dataclass
class Job:
    """What the rendered manifests tell a pod: its command, environment, config files and parallelism."""

    command: list[str]
    env: dict[str, str]
    parallelism: int
    completions: int
    parent: str


def render(folder: Path, hp: Path, hr: Path, uri: str, data_root: Path, extra: tuple[str, ...] = ()) -> Job:
    """`retina-trainer k8s render` against the real server (it creates the parent run), then read the YAML the way
    the cluster would: the ConfigMap's files become /config, the Job's container gives command and env."""
    res = invoke(["k8s", "render", str(hp), str(hr), "--image", "img:1", "--tracking-uri", uri, "--parallelism",
                  "2", *extra], folder)
    assert res.returncode == 0, res.stderr[-3000:]
    docs = list(yaml.safe_load_all(res.stdout))
    config_dir = folder / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for name, text in cm["data"].items():
            (config_dir / name).write_text(text)
    job = next(d for d in docs if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["RETINA_DATA_ROOT"] = str(data_root)  # the read-only data volume, mounted here at the data root
    command = [str(config_dir / Path(a).name) if a.startswith("/config/") else a for a in container["command"]]
    return Job(command, env, job["spec"]["parallelism"], job["spec"]["completions"], env["RETINA_PARENT_RUN_ID"])


def pod_in_process(index: int, job: Job, workdir: Path):
    """One pod of the Job run in this process (conftest.invoke), for pods whose process is not what is tested."""
    workdir.mkdir(parents=True, exist_ok=True)
    return invoke(job.command[1:], workdir, env={**job.env, "JOB_COMPLETION_INDEX": str(index), "HOME": str(workdir)})


def pod(index: int, job: Job, workdir: Path) -> subprocess.Popen:
    """One pod of the Job: a fresh working directory (its emptyDir), the rendered environment and command."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(job.env, JOB_COMPLETION_INDEX=str(index), HOME=str(workdir))
    cmd = [sys.executable, "-m", "trainer", *job.command[1:]]  # the image's `retina-trainer`, from this checkout
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(client: MlflowClient, exp_name: str) -> dict[int, list]:
    exp = client.get_experiment_by_name(exp_name)
    out: dict[int, list] = {}
    for r in client.search_runs([exp.experiment_id], "tags.role = 'run'", max_results=1000):
        out.setdefault(int(r.data.tags["run_index"]), []).append(r)
    return out


def wait_for_epochs(client: MlflowClient, exp_name: str, index: int, n: int, proc: subprocess.Popen) -> str:
    def logged():
        exp = client.get_experiment_by_name(exp_name)
        runs = client.search_runs([exp.experiment_id], f"tags.run_index = '{index}'") if exp else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) >= n:
            return runs[0].info.run_id
        return None

    return wait_until(logged, f"run {index} to log {n} epochs", proc)


@pytest.mark.slow
def test_fan_out_two_at_a_time_then_second_pass_skips(tmp_path, data_root, mlflow_server):
    hp, hr = make_search(tmp_path, "fanout", {"n_epochs": 2}, {"lr": [0.01, 0.003, 0.001], "chans": [[4, 4], [2, 4]]})
    search = expand(hp, hr)
    assert len(search.runs) == 6
    job = render(tmp_path, hp, hr, mlflow_server, data_root)
    assert (job.completions, job.parallelism) == (6, 2)
    parent = job.parent
    for first in range(0, 6, job.parallelism):
        procs = [pod(i, job, tmp_path / f"pod{i}") for i in range(first, first + job.parallelism)]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    client = MlflowClient(mlflow_server)
    runs = children(client, "fanout")
    assert sorted(runs) == list(range(6)) and all(len(v) == 1 for v in runs.values())
    for i, (r,) in runs.items():
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.tags["config_id"] == search.runs[i].config_id  # index i is run i of `expand`
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_pearson")] == [1, 2]
        assert "latest.pt" in {Path(f.path).name for f in client.list_artifacts(r.info.run_id, "checkpoints")}
    # the pod that finished the last run closed the search's parent run
    assert client.get_run(parent).info.status == "FINISHED"
    # a second full pass skips all six
    for i in range(6):
        p = pod_in_process(i, job, tmp_path / f"again{i}")
        assert p.returncode == 0 and "already FINISHED" in p.stderr, p.stderr[-2000:]
    assert all(len(v) == 1 for v in children(client, "fanout").values())


def test_index_out_of_range_is_a_user_error(tmp_path, data_root, mlflow_server):
    hp, hr = make_search(tmp_path, "fanout_range", {"n_epochs": 1}, {"lr": [0.01, 0.003]})
    job = render(tmp_path, hp, hr, mlflow_server, data_root)
    p = pod_in_process(7, job, tmp_path / "pod")
    assert p.returncode == 2
    assert "run index 7 is out of range: the search has 2 runs (0..1)" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_sigkill_then_restart_resumes_every_epoch_once(tmp_path, data_root, mlflow_server):
    hp, hr = make_search(tmp_path, "fanout_kill", {"n_epochs": 12, "early_stopping": 0}, {"lr": [0.01]})
    job = render(tmp_path, hp, hr, mlflow_server, data_root)
    client = MlflowClient(mlflow_server)
    proc = pod(0, job, tmp_path / "pod-a")
    run_id = wait_for_epochs(client, "fanout_kill", 0, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert client.get_run(run_id).info.status == "RUNNING"  # a killed pod cannot say anything
    # the retry is a new pod: a fresh working directory, so the checkpoint comes from MLflow
    again = pod(0, job, tmp_path / "pod-b")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "resuming after epoch" in err
    runs = children(client, "fanout_kill")[0]
    assert [r.info.run_id for r in runs] == [run_id]  # the same MLflow run
    assert runs[0].info.status == "FINISHED"
    for key in ("train_loss", "val_pearson", "test_pearson"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, 13)), key


@pytest.mark.slow
def test_sigterm_ends_killed_with_a_checkpoint_and_resumes(tmp_path, data_root, mlflow_server):
    hp, hr = make_search(tmp_path, "fanout_term", {"n_epochs": 12, "early_stopping": 0}, {"lr": [0.01]})
    job = render(tmp_path, hp, hr, mlflow_server, data_root)
    client = MlflowClient(mlflow_server)
    proc = pod(0, job, tmp_path / "pod-a")
    run_id = wait_for_epochs(client, "fanout_term", 0, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "latest.pt" in {Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")}
    logged = len(client.get_metric_history(run_id, "train_loss"))
    assert 2 <= logged < 12
    again = pod(0, job, tmp_path / "pod-b")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(1, 13))


@pytest.mark.slow
def test_packed_fan_out_trains_each_pack_in_one_pod(tmp_path, data_root, mlflow_server):
    hp, hr = make_search(tmp_path, "fanout_pack", {"n_epochs": 2, "n_repeats": 2}, {"lr": [0.01, 0.003, 0.001]})
    search = expand(hp, hr)
    job = render(tmp_path, hp, hr, mlflow_server, data_root, ("--pack", "4"))
    assert (job.completions, job.parallelism) == (2, 2)  # 6 runs: packs of 4 and 2
    assert job.command[-2:] == ["--pack", "4"]
    procs = [pod(i, job, tmp_path / f"pod{i}") for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert out.count(": FINISHED") == 2  # the second pod reports its two runs
    client = MlflowClient(mlflow_server)
    runs = children(client, "fanout_pack")
    assert sorted(runs) == list(range(6)) and all(len(v) == 1 for v in runs.values())
    names = [search.runs[i].name for i in range(6)]
    for i, (r,) in runs.items():
        assert r.info.status == "FINISHED" and r.data.tags["config_id"] == search.runs[i].config_id
        assert r.data.tags["pack"] == ", ".join(names[:4] if i < 4 else names[4:])
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_pearson")] == [1, 2]
    assert client.get_run(job.parent).info.status == "FINISHED"
    again = pod_in_process(0, job, tmp_path / "again0")
    assert again.returncode == 0 and again.stderr.count("already FINISHED") == 4, again.stderr[-2000:]
    bad = pod_in_process(2, job, tmp_path / "bad")
    assert bad.returncode == 2
    assert "pack index 2 is out of range: the search has 2 packs of at most 4 runs" in bad.stderr
