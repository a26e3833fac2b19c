"""Adaptive search (`search --strategy random|tpe --trials N --prune ...`, trainer/launch/adaptive.py): the range
form of hyperranges.json, its refusal by the grid, sampling, what counts as a trial, pruning marks, resuming a
study, and worker processes sharing one study with one of them killed mid-trial."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import SMALL, LineReader, invoke
from trainer import config
from trainer.errors import ConfigError
from trainer.launch import adaptive

HP = {**SMALL, "n_epochs": 3, "save_root": "runs", "seed": 3}


def write(folder: Path, exp_name: str, ranges: dict, **extra) -> tuple[str, str]:
    (folder / "hp.json").write_text(json.dumps({"exp_name": exp_name, **HP, **extra}))
    (folder / "hr.json").write_text(json.dumps(ranges))
    return str(folder / "hp.json"), str(folder / "hr.json")


def cli(args, cwd, tracking_uri, **popen):
    """The CLI in this process (conftest.invoke); with `popen` arguments, a real process (to be killed)."""
    if not popen:
        return invoke(args, cwd, tracking_uri, unset=("RETINA_",))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RETINA_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_TRACKING_URI=tracking_uri)
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, text=True, **popen)


# ---- the range form -------------------------------------------------------------------------------------------


def test_ranges_are_read_for_sampled_strategies_and_checked():
    loaded = config.parse_hyperranges({"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                       "batch_size": {"low": 32, "high": 128, "step": 32},
                                       "chans": [[4, 4], [8, 4]]}, "hr.json", ranges_ok=True)
    assert loaded.values["lr"] == config.Range(1e-4, 1e-2, log=True)
    assert loaded.values["batch_size"] == config.Range(32, 128, step=32, integer=True)
    assert loaded.values["chans"] == [[4, 4], [8, 4]]
    bad = {
        "low must be below high": {"lr": {"low": 0.1, "high": 0.01}},
        "a log range needs low > 0": {"l2": {"low": 0.0, "high": 0.1, "log": True}},
        "log or step, not both": {"lr": {"low": 0.01, "high": 0.1, "log": True, "step": 0.01}},
        "step must be a positive integer": {"batch_size": {"low": 32, "high": 128, "step": 0.5}},
        "is not a number": {"model_type": {"low": 1, "high": 2}},
        "a range is": {"lr": {"low": 0.01, "top": 0.1}},
        "must be": {"n_epochs": {"low": 0, "high": 5}},  # the schema's own range check, on each end
    }
    for words, raw in bad.items():
        with pytest.raises(ConfigError, match=words) as e:
            config.parse_hyperranges(raw, "hr.json", ranges_ok=True)
        assert "hr.json" in str(e.value)


def test_the_grid_refuses_a_range_in_one_line(tmp_path):
    hp, hr = write(tmp_path, "g", {"lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    from trainer.search import expand

    with pytest.raises(ConfigError, match="only the sampled strategies take.*--strategy random or tpe") as e:
        expand(hp, hr)
    assert "'lr'" in str(e.value) and "\n" not in str(e.value)


def test_sampled_strategy_options_are_checked_before_anything_runs(tmp_path):
    hp, hr = write(tmp_path, "opts", {"lr": [0.01, 0.001]})
    cases = [
        (["--trials", "3"], "apply to the sampled strategies"),
        (["--strategy", "tpe"], "needs --trials N"),
        (["--strategy", "tpe", "--trials", "3", "--pack", "2"], "--pack applies to --strategy grid only"),
    ]
    for extra, words in cases:
        res = cli(["search", hp, hr, "--no-progress", *extra], tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
        assert res.returncode == 2, res.stderr
        assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    hp2, _ = write(tmp_path, "opts", {"lr": [0.01]}, n_repeats=2)
    with pytest.raises(ConfigError, match="n_repeats 2 applies to --strategy grid"):
        adaptive.plan(hp2, hr, "tpe", 3)
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "optuna.db").exists()  # nothing was created


def test_the_study_identity_leaves_out_the_trial_count_only(tmp_path):
    hp, hr = write(tmp_path, "ident", {"lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    a = adaptive.plan(hp, hr, "tpe", 5, "asha")
    assert adaptive.plan(hp, hr, "tpe", 50, "asha").search_id == a.search_id  # more trials extend the same study
    others = [adaptive.plan(hp, hr, "random", 5, "asha"), adaptive.plan(hp, hr, "tpe", 5, "median"),
              adaptive.plan(hp, hr, "tpe", 5, "asha", sampler_seed=99)]
    assert len({a.search_id, *(o.search_id for o in others)}) == 4
    assert a.study_name == f"ident-{a.search_id}"


def test_samples_stay_in_their_ranges_and_list_choices_come_back_as_lists(tmp_path):
    hp, hr = write(tmp_path, "samp", {"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                      "batch_size": {"low": 32, "high": 128, "step": 32},
                                      "chans": [[4, 4], [8, 4]], "noise": [0.0, 0.1]})
    p = adaptive.plan(hp, hr, "random", 20)
    study = optuna.create_study(direction="maximize", sampler=adaptive.make_sampler(p))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        v = adaptive.sample(trial, p)
        assert 1e-4 <= v["lr"] <= 1e-2 and v["batch_size"] in (32, 64, 96, 128)
        assert v["chans"] in ([4, 4], [8, 4]) and v["noise"] in (0.0, 0.1)
        spec = adaptive.trial_spec(p, trial.number, v)
        assert spec.config["chans"] == v["chans"] and spec.config["exp_name"] == "samp"
        seen.add(json.dumps(v["chans"]))
        study.tell(trial, 0.5)
    assert len(seen) == 2


def test_what_counts_against_the_trial_budget():
    from optuna.trial import TrialState, create_trial

    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    study = optuna.create_study(direction="maximize")

    def add(state, value=None, **attrs):
        study.add_trial(create_trial(state=state, value=value, params={"lr": 1e-3}, distributions=dist,
                                     user_attrs=attrs, intermediate_values={1: 0.1} if state == TrialState.PRUNED
                                     else None))

    add(TrialState.COMPLETE, 0.4)
    add(TrialState.PRUNED)
    add(TrialState.WAITING)  # a retry: counts in place of the interrupted one
    add(TrialState.FAIL, outcome="interrupted")
    add(TrialState.FAIL, outcome="rejected: kernel does not fit")
    add(TrialState.FAIL, outcome="busy")
    add(TrialState.FAIL, outcome="failed")  # the run itself failed (diverged): it was trained
    assert adaptive.counted(study) == 4
    assert adaptive.counted(study, before=3) == 3


def _running_trial(study, owner, epochs=(1,)):
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    trial.set_user_attr("owner", owner)
    for e in epochs:
        trial.report(0.1 * e, e)
    return trial


def test_an_interrupted_trial_is_enqueued_again_with_its_values_and_epochs():
    study = optuna.create_study(direction="maximize")
    trial = _running_trial(study, "me", epochs=(1, 2))
    adaptive._interrupted(study, trial)
    [failed, retry] = study.get_trials()
    assert failed.state.name == "FAIL" and failed.user_attrs["outcome"] == "interrupted"
    assert retry.state.name == "WAITING" and retry.params == failed.params
    assert retry.intermediate_values == {1: 0.1, 2: 0.2}
    assert retry.system_attrs["failed_trial"] == failed.number
    assert adaptive.counted(study) == 1  # the retry counts in place of the interrupted trial


def test_reclaim_takes_back_trials_of_dead_processes_of_this_host_only(tmp_path):
    import socket

    from trainer.tracking import _OWNER

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 's.db'}")
    gone = _running_trial(study, f"{host}:{dead.pid}:1")
    elsewhere = _running_trial(study, "another-host:1:1")  # left to its heartbeat
    mine = _running_trial(study, _OWNER)
    said = []
    adaptive.reclaim(study, said.append)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[gone.number] == "FAIL" and states[elsewhere.number] == states[mine.number] == "RUNNING"
    [retry] = [t for t in study.get_trials() if t.state.name == "WAITING"]
    assert retry.params == study.get_trials()[gone.number].params and retry.intermediate_values == {1: 0.1}
    assert said == [f"trial {gone.number}: its process is gone; it resumes as a new trial with the same values"]
    adaptive.reclaim(study, said.append)  # a second look changes nothing
    assert len(study.get_trials()) == 4 and len(said) == 1


# ---- end to end: real runs, a real MLflow server, a shared SQLite study -------------------------------------------


def children(client, exp_name):
    exp = client.get_experiment_by_name(exp_name)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    return ([r for r in runs if r.data.tags.get("role") == "search"],
            [r for r in runs if r.data.tags.get("role") == "run"])


@pytest.mark.slow
def test_a_pruned_trial_is_finished_and_marked_and_a_rejected_one_is_not_counted(tmp_path, data_root, mlflow_server):
    # ksizes [13, 3, 3] does not fit 12x12 frames: those samples are rejected, not counted
    ranges = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "ksizes": [[5, 3, 3], [13, 3, 3]]}
    hp, hr = write(tmp_path, "ad_prune", ranges)
    p = adaptive.plan(hp, hr, "tpe", 5, "asha")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # three earlier trials that scored r 0.99 at every epoch: ASHA stops any new trial after its first epoch
    study = adaptive.open_study(p, storage)
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=0.99, params={"lr": 5e-3, "ksizes": "[5, 3, 3]"},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
                           "ksizes": optuna.distributions.CategoricalDistribution(["[5, 3, 3]", "[13, 3, 3]"])},
            intermediate_values={1: 0.99, 2: 0.99, 3: 0.99},
            system_attrs={"completed_rung_0": 0.99, "completed_rung_1": 0.99}))  # what ASHA records per rung
    res = cli(["search", hp, hr, "--data-root", str(data_root), "--no-progress", "--no-plots", "--strategy", "tpe",
               "--trials", "5", "--prune", "asha", "--study-storage", storage], tmp_path, mlflow_server)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name=p.study_name, storage=storage)
    states = [t.state.name for t in study.trials]
    rejected = [t for t in study.trials if t.user_attrs.get("outcome", "").startswith("rejected")]
    assert states.count("PRUNED") == 2 and states.count("COMPLETE") == 3  # 3 given + 2 trained = --trials 5
    assert all(t.params["ksizes"] == "[13, 3, 3]" for t in rejected)
    assert ("rejected, not counted" in res.stderr) == bool(rejected)
    client = MlflowClient(mlflow_server)
    parents, runs = children(client, "ad_prune")
    assert len(parents) == 1 and len(runs) == 2
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["pruned"].startswith("pruned after epoch 1 of 3")
        assert r.data.metrics["pruned_epoch"] == 1 and r.data.metrics["epochs_run"] == 1
        assert r.data.params["ksizes"] == "[5, 3, 3]"
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")}
        assert "checkpoints/best.pt" in arts  # the best checkpoint so far is kept
        assert "eval_test_pearson_mean" in r.data.metrics  # and evaluated
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_pruned"] == 2 and parent.data.metrics["epochs_trained"] == 2
    assert parent.data.tags["optuna_study"].startswith(p.study_name)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "study/trials.json", str(tmp_path)))
                       .read_text())
    column = table["columns"].index("state")
    assert sorted(row[column] for row in table["data"]) == sorted(states)


@pytest.mark.slow
def test_workers_share_a_study_a_killed_workers_trial_resumes_and_a_rerun_extends_it(tmp_path, data_root,
                                                                                     mlflow_server):
    ranges = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "noise": [0.0, 0.05]}
    hp, hr = write(tmp_path, "ad_workers", ranges, n_epochs=6)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["search", hp, hr, "--data-root", str(data_root), "--no-progress", "--no-plots", "--strategy", "random",
            "--trials", "4", "--study-storage", storage]
    victim = cli(args, tmp_path, mlflow_server, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    lines = LineReader(victim.stderr).wait_for("epoch 2/6")  # mid-trial, with checkpoints of epochs 1 and 2
    killed_run = re.search(r"MLflow run ([0-9a-f]{32})", "".join(lines)).group(1)
    victim.send_signal(signal.SIGKILL)  # no chance to clean up: its trial stays RUNNING
    victim.wait(timeout=30)
    p = adaptive.plan(hp, hr, "random", 4)
    study = optuna.load_study(study_name=p.study_name, storage=storage)
    [lost] = [t for t in study.trials if t.state.name == "RUNNING"]
    survivor = cli(args, tmp_path, mlflow_server)
    assert survivor.returncode == 0, survivor.stderr[-3000:]
    assert f"trial {lost.number}: its process is gone" in survivor.stderr
    assert "resuming after epoch 2" in survivor.stderr  # from its checkpoint, in the same MLflow run
    study = optuna.load_study(study_name=p.study_name, storage=storage)
    assert adaptive.counted(study) == 4
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4 + ["FAIL"]
    client = MlflowClient(mlflow_server)
    parents, runs = children(client, "ad_workers")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["config_id"] for r in runs}) == 4  # nothing trained twice
    [retry] = [t for t in study.trials if t.state.name == "COMPLETE" and t.params == lost.params]
    assert retry.user_attrs["mlflow_run_id"] == killed_run  # resumed in the killed worker's MLflow run
    history = client.get_metric_history(killed_run, "val_pearson")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # each epoch logged once
    assert retry.intermediate_values.keys() == {1, 2, 3, 4, 5, 6}
    # the same command again trains nothing; with --trials 5 it trains exactly one more
    again = cli(args, tmp_path, mlflow_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(4 counted already)" in again.stderr and not re.search(r"^trial \d+:", again.stderr, flags=re.M)
    assert len(children(client, "ad_workers")[1]) == 4
    more = cli([a for a in args[:-3] if a != "--no-plots"] + ["5", "--study-storage", storage], tmp_path,
               mlflow_server)
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(children(client, "ad_workers")[1]) == 5
    plots = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= plots
    best = max(r.data.metrics["best_val_pearson"] for r in children(client, "ad_workers")[1])
    study = optuna.load_study(study_name=p.study_name, storage=storage)
    assert math.isclose(study.best_value, best, rel_tol=1e-9)


# ---- Kubernetes: worker pods of one study ------------------------------------------------------------------------


def _render_study(tmp_path, *extra, exp_name="ad_k8s"):
    import yaml
    from click.testing import CliRunner

    from trainer.cli import main

    hp, hr = write(tmp_path, exp_name, {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, n_epochs=2)
    res = CliRunner().invoke(main, ["k8s", "render", hp, hr, "--image", "registry.example/retina-trainer:1",
                                    "--tracking-uri", "http://mlflow.retina.svc:5000", "--strategy", "tpe",
                                    "--trials", "3", "--prune", "asha", *extra])
    return res, (list(yaml.safe_load_all(res.stdout)) if res.exit_code == 0 else None)


def test_k8s_render_of_a_sampled_strategy_is_a_job_of_workers_sharing_the_study(tmp_path):
    from test_k8s import env_of, validate_all

    refused, _ = _render_study(tmp_path, "--parent-run-id", "p1")
    assert refused.exit_code == 2 and "--study-storage-secret" in refused.output
    packed, _ = _render_study(tmp_path, "--parent-run-id", "p1", "--study-storage-secret", "optuna-db", "--pack", "2")
    assert packed.exit_code == 2 and "--pack applies to --strategy grid only" in packed.output
    res, docs = _render_study(tmp_path, "--parent-run-id", "p1", "--study-storage-secret", "optuna-db",
                              "--workers", "3", "--gpus", "1")
    assert res.exit_code == 0, res.output
    validate_all(docs, "sampled strategy")
    config_map, job = docs
    assert "expanded.json" not in config_map["data"] and "hyperranges.json" in config_map["data"]
    assert job["spec"]["completions"] == 3 and job["spec"]["parallelism"] == 3
    [container] = job["spec"]["template"]["spec"]["containers"]
    p = adaptive.plan(tmp_path / "hp.json", tmp_path / "hr.json", "tpe", 3, "asha")
    assert container["command"] == ["retina-trainer", "search", "/config/hyperparams.json",
                                    "/config/hyperranges.json", "--strategy", "tpe", "--trials", "3", "--prune",
                                    "asha", "--sampler-seed", str(p.sampler_seed), "--no-progress"]
    env = env_of(job)
    assert env["RETINA_STUDY_STORAGE"] == "from:secret/optuna-db/url"
    assert env["RETINA_PARENT_RUN_ID"] == "p1"
    # the failure rules of the grid's Job hold for workers: exit 2 fails the index, a disruption is not counted
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailIndex" and rules[0]["onExitCodes"]["values"] == [2]


@pytest.mark.slow
def test_rendered_worker_pods_share_the_study_and_the_last_one_closes_the_parent(tmp_path, data_root,
                                                                                 mlflow_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    res, docs = _render_study(tmp_path, "--local-tracking-uri", mlflow_server, "--study-storage-secret", "optuna-db",
                              "--workers", "2", "--no-plots")
    assert res.exit_code == 0, res.output
    config_map, job = docs
    folder = tmp_path / "config"
    folder.mkdir()
    for key, text in config_map["data"].items():
        (folder / key).write_text(text)
    [container] = job["spec"]["template"]["spec"]["containers"]
    command = [a.replace("/config", str(folder)) for a in container["command"]]
    parent = job["metadata"]["annotations"]["retina-trainer/parent-run-id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RETINA_"))}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, RETINA_PARENT_RUN_ID=parent, RETINA_DATA_ROOT=str(data_root),
               RETINA_STUDY_STORAGE=f"sqlite:///{tmp_path / 'study.db'}", MLFLOW_DISABLE_TELEMETRY="true")
    pods = []
    for i in range(2):
        work = tmp_path / f"pod{i}"
        work.mkdir()
        pods.append(subprocess.Popen([sys.executable, "-m", "trainer", *command[1:]], cwd=work, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in pods]
    assert [p.returncode for p in pods] == [0, 0], "\n---\n".join(o[1][-2000:] for o in outs)
    client = MlflowClient(mlflow_server)
    parents, runs = children(client, "ad_k8s")
    assert [r.info.run_id for r in parents] == [parent]
    assert len(runs) == 3 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.metrics["trials_complete"] + \
        client.get_run(parent).data.metrics["trials_pruned"] == 3


def _pod_command(docs, tmp_path):
    """The worker pod's command, its ConfigMap written to a local folder."""
    config_map, job = docs
    folder = tmp_path / "config"
    folder.mkdir(exist_ok=True)
    for key, text in config_map["data"].items():
        (folder / key).write_text(text)
    [container] = job["spec"]["template"]["spec"]["containers"]
    return [a.replace("/config", str(folder)) for a in container["command"]][1:]


@pytest.mark.slow
def test_k8s_status_and_finish_of_a_study_whose_worker_died_then_one_that_completed(tmp_path, data_root,
                                                                                   mlflow_server, monkeypatch):
    from click.testing import CliRunner

    from trainer.cli import main

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("RETINA_STUDY_STORAGE", raising=False)
    res, docs = _render_study(tmp_path, "--local-tracking-uri", mlflow_server, "--study-storage-secret", "optuna-db",
                              "--workers", "1", "--no-plots", exp_name="ad_k8s_lost")  # its own parent run
    assert res.exit_code == 0, res.output
    parent = docs[1]["metadata"]["annotations"]["retina-trainer/parent-run-id"]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RETINA_"))}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, RETINA_PARENT_RUN_ID=parent, RETINA_DATA_ROOT=str(data_root),
               RETINA_STUDY_STORAGE=storage, MLFLOW_DISABLE_TELEMETRY="true")
    command = [sys.executable, "-m", "trainer", *_pod_command(docs, tmp_path)]
    (tmp_path / "pod0").mkdir()
    worker = subprocess.Popen(command, cwd=tmp_path / "pod0", env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    LineReader(worker.stderr).wait_for("trial 2: ")  # trials 0 and 1 ended; the last one begins
    worker.send_signal(signal.SIGKILL)  # the pod is gone for good (the Job's retries spent)
    worker.wait(timeout=30)

    def k8s(*args):
        return CliRunner().invoke(main, ["k8s", *args, str(tmp_path / "hp.json"), str(tmp_path / "hr.json"),
                                         "--tracking-uri", mlflow_server, "--strategy", "tpe", "--trials", "3",
                                         "--prune", "asha"])

    unnamed = k8s("status")
    assert unnamed.exit_code == 2 and "--strategy tpe needs --study-storage URL" in unnamed.output
    status = k8s("status", "--study-storage", storage)
    assert status.exit_code == 0, status.output
    rows = {int(line.split()[0]): line.split() for line in status.output.splitlines()
            if len(line.split()) > 4 and line.split()[0].isdigit() and line.split()[1].isupper()}
    assert sorted(rows) == [0, 1, 2]
    assert {rows[0][1], rows[1][1]} <= {"COMPLETE", "PRUNED"} and rows[2][1] == "LOST", status.output
    assert "trial 2: RUNNING in the study but its worker is gone" in status.output
    assert "1 of 3 trials not done yet" in status.output
    assert f"parent run {parent} is RUNNING" in status.output
    client = MlflowClient(mlflow_server)
    assert client.get_run(parent).info.status == "RUNNING"  # status changed nothing

    closed = k8s("finish", "--study-storage", storage, "--no-plots")
    assert closed.exit_code == 1, closed.output
    assert "2 of 3 trials of search" in closed.output and "start a worker again" in closed.output
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["trials_done"] == "2/3"
    assert run.data.metrics["trials_complete"] + run.data.metrics["trials_pruned"] == 2
    summary = Path(client.download_artifacts(parent, "summary/search_summary.txt", str(tmp_path))).read_text()
    assert "FAILED (retina-trainer k8s finish" in summary and "LOST" in summary
    study = optuna.load_study(study_name=adaptive.plan(tmp_path / "hp.json", tmp_path / "hr.json", "tpe", 3,
                                                       "asha").study_name, storage=storage)
    assert [t.state.name for t in study.trials].count("RUNNING") == 1  # the study is left as it was

    # a worker started again takes the lost trial back, resumes it and closes the parent; finish then agrees
    (tmp_path / "pod1").mkdir()
    again = subprocess.run(command, cwd=tmp_path / "pod1", env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 2: its process is gone" in again.stderr
    assert client.get_run(parent).info.status == "FINISHED", again.stderr
    done = k8s("finish", "--study-storage", storage, "--no-plots")
    assert done.exit_code == 0, done.output
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["trials_done"] == "3/3"


def test_k8s_status_options_of_a_study_are_checked_before_any_server_is_asked(tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main

    hp, hr = write(tmp_path, "ad_opts", {"lr": {"low": 1e-3, "high": 1e-2, "log": True}})
    unreachable = ["--tracking-uri", "http://127.0.0.1:9"]

    def k8s(*args):
        return CliRunner().invoke(main, ["k8s", "status", hp, hr, *unreachable, *args])

    grid = k8s("--study-storage", f"sqlite:///{tmp_path / 'x.db'}", "--trials", "3")
    assert grid.exit_code == 2 and "--trials, --study-storage apply to the sampled strategies" in grid.output
    count = k8s("--strategy", "tpe", "--study-storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert count.exit_code == 2 and "--strategy tpe needs --trials N" in count.output
    from trainer.errors import UserError

    with pytest.raises(UserError, match="no study storage at"):  # status makes no empty database
        adaptive.open_study(adaptive.plan(hp, hr, "tpe", 3), f"sqlite:///{tmp_path / 'none.db'}", create=False)
    assert not (tmp_path / "none.db").exists()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    adaptive.open_study(adaptive.plan(hp, hr, "tpe", 3), storage)  # made by a worker
    with pytest.raises(UserError, match="no study ad_opts-s[0-9a-f]+ in sqlite.*--sampler-seed"):  # another seed
        adaptive.open_study(adaptive.plan(hp, hr, "tpe", 3, sampler_seed=99), storage, create=False)
