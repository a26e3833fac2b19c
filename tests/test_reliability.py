"""Nothing a user or a fault does leaves a traceback, a run in a wrong state, or an epoch trained twice
(docs/reliability.md names the test behind each promise)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import PATIENCE_S, SMALL, start_mlflow_server, stop_mlflow_server, wait_until
from trainer.cli import main
from trainer.data.synth import write_synthetic

BASE = {"exp_name": "rel", **SMALL, "n_epochs": 1, "save_root": "runs"}


def recording(root: Path, change: Callable[[h5py.File], None] | None = None) -> Path:
    path = write_synthetic(root, "synth01", "whitenoise", n_cells=3, size=12, train_frames=1500, test_frames=300,
                           n_repeats=3, history=10, seed=0)
    if change is not None:
        with h5py.File(path, "r+") as f:
            change(f)
    return path


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        data = fn(f[name][()].astype(np.float64))
        del f[name]
        f[name] = data
    return change


def _nan(a: np.ndarray) -> np.ndarray:
    a[..., 5] = np.nan
    return a


def _inf(a: np.ndarray) -> np.ndarray:
    a[..., 7] = np.inf
    return a


def _repeats_shape(f: h5py.File) -> None:
    data = f["test/repeats/cell01"][()]
    del f["test/repeats/cell01"]
    f["test/repeats/cell01"] = data[:, :-5]


def _text(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# (id, hyperparams (dict, or raw bytes of the file), hyperranges (dict or None), change to the recording, message)
CASES = [
    ("not utf-8", b'{"lr": "\xff"}', None, None, "not UTF-8 text"),
    ("5000-digit integer", b'{"seed": 1' + b"0" * 5000 + b"}", None, None, "more digits than can be read"),
    ("100000 nested brackets", b"[" * 100_000 + b"]" * 100_000, None, None, "nested too deeply"),
    ("lr of 401 digits", b'{"lr": 1' + b"0" * 400 + b"}", None, None, "lr must be a finite number"),
    ("duplicate key", b'{"lr": 0.1, "lr": 0.2}', None, None, "key 'lr' appears twice"),
    ("seed 2^64", {"seed": 2**64}, None, None, "seed must be an integer below 2^63"),
    ("exp_name of 300 characters", {"exp_name": "x" * 300}, None, None, "exp_name must be at most 120 bytes"),
    ("exp_name with NUL", {"exp_name": "a\u0000b"}, None, None, "exp_name must not contain control characters"),
    ("run name over 250 bytes", {"exp_name": "x" * 120}, {"chans": [[4] * 80, [2] * 80]}, None,
     "more than a folder name may be"),
    ("unknown key", {"semantic_scael": 1.0}, None, None, "did you mean 'semantic_scale'"),
    ("original feature", {"cross_val": True}, None, None, "asks for cross-validation folds"),
    ("save_root is a file", {"save_root": "afile"}, None, None, "save_root: cannot write run folders"),
    ("save_root under /proc", {"save_root": "/proc/retina-trainer"}, None, None,
     "save_root: cannot write run folders"),
    ("retinotopic_loop with BNCNN", {"train_loop": "retinotopic_loop"}, None, None, "needs a model with a one-hot"),
    ("prune_layers names a missing layer", {"prune": True, "prune_layers": ["conv9"]}, None, None,
     "prune_layers names 'conv9'"),
    ("batch_size above the training samples", {"batch_size": 5000}, None, None, "larger than the"),
    ("NaN rates", {}, None, _set("train/response/firing_rate_10ms", _nan), "NaN/inf values"),
    ("inf rates", {}, None, _set("test/response/firing_rate_10ms", _inf), "NaN/inf values"),
    ("absurd rates", {}, None, _set("train/response/firing_rate_10ms", lambda a: a * 1e200),
     "which no neuron fires"),
    ("NaN stimulus", {}, None, _set("train/stimulus", _nan), "NaN"),
    ("inf test stimulus", {}, None, _set("test/stimulus", _inf), "inf"),
    ("constant stimulus", {}, None, _set("train/stimulus", lambda a: a * 0 + 3), "constant"),
    ("NaN repeats", {}, None, _set("test/repeats/cell01", _nan), "NaN/inf"),
    ("repeats of the wrong shape", {}, None, _repeats_shape, "repeats"),
    ("cells out of range", {"cells": [0, 9]}, None, None, "out of range"),
    ("missing recording", {"dataset": "nope"}, None, None, "recording not found"),
    ("kernels that do not fit", {"ksizes": [9, 9, 3]}, None, None, "kernels do not fit the input"),
]


@pytest.mark.parametrize("hp, hr, change, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, hp, hr, change, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    recording(tmp_path / "data", change)
    (tmp_path / "afile").write_text("a file, not a folder")
    hp_path = _text(tmp_path / "hp.json", hp if isinstance(hp, bytes) else json.dumps({**BASE, **hp}))
    args = ["search", str(hp_path), "--data-root", str(tmp_path / "data"), "--no-progress"]
    if hr is not None:
        args.insert(2, str(_text(tmp_path / "hr.json", json.dumps(hr))))
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    # nothing created: no MLflow store, no run folders
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- divergence ----------------------------------------------------------------------------------------------

def test_an_exploding_finite_loss_ends_the_run_failed(tmp_path, monkeypatch):
    """lr 1e10: the loss stays finite while every prediction goes constant; the run is FAILED with the reason."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    recording(tmp_path / "data")
    _text(tmp_path / "hp.json", json.dumps({**BASE, "lr": 1e10, "n_epochs": 3}))
    res = CliRunner().invoke(main, ["search", "hp.json", "--data-root", "data", "--no-progress", "--no-plots"])
    assert res.exit_code == 1, res.output
    assert "FAILED: every cell's validation predictions are constant" in res.output or \
        "FAILED: training loss became" in res.output or "non-finite" in res.output, res.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rel").experiment_id])
    child = [r for r in runs if r.data.tags.get("role") == "run"][0]
    assert child.info.status == "FAILED" and "lower lr" in child.data.tags["error"]


# ---- a dead tracking server ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.e2e
def test_a_dead_tracking_server_stops_the_search_in_bounded_time_and_a_rerun_resumes(tmp_path):
    from mlflow.tracking import MlflowClient

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc, uri = start_mlflow_server(server_dir)
    port = int(uri.rsplit(":", 1)[1])
    try:
        recording(tmp_path / "data")
        _text(tmp_path / "hp.json", json.dumps({**BASE, "exp_name": "dead", "n_epochs": 12}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
        cmd = [sys.executable, "-m", "trainer", "search", "hp.json", "--data-root", "data", "--no-progress",
               "--no-plots"]
        search = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        client = MlflowClient(uri)

        def two_epochs():
            exp = client.get_experiment_by_name("dead")
            runs = client.search_runs([exp.experiment_id], "tags.role = 'run'") if exp else []
            return runs and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) >= 2

        wait_until(two_epochs, "two epochs logged", search, every=0.5)
        stop_mlflow_server(proc, signal.SIGKILL)  # the server dies
        # it gives up within seconds; MLflow's own retries (7, backoff factor 2) would take minutes per call
        _, err = search.communicate(timeout=PATIENCE_S)
        assert search.returncode == 3, err[-3000:]
        assert "Traceback" not in err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "unreachable" in errors[0] and "resume" in errors[0], err[-2000:]
        folder = tmp_path / "runs" / "dead"
        assert list(folder.glob("*/epoch_*.pt")), "the local checkpoint is kept"
        # the server comes back (same store): the rerun resumes the same run and logs every epoch once
        proc, uri = start_mlflow_server(server_dir, port)
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming after epoch" in again.stderr
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("dead").experiment_id], "tags.role = 'run'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 13))
    finally:
        stop_mlflow_server(proc, signal.SIGKILL)


@pytest.mark.e2e
def test_run_index_with_an_unknown_parent_fails_before_training(tmp_path, mlflow_server):
    recording(tmp_path / "data")
    _text(tmp_path / "hp.json", json.dumps({**BASE, "exp_name": "noparent"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true")
    res = subprocess.run([sys.executable, "-m", "trainer", "run-index", "hp.json", "--index", "0",
                          "--parent-run-id", "doesnotexist0000", "--data-root", "data"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "parent run 'doesnotexist0000' not found" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not (tmp_path / "runs" / "noparent").exists()


def test_an_unwritable_store_folder_is_one_line_before_anything(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recording(tmp_path / "data")
    hp = _text(tmp_path / "hp.json", json.dumps({**BASE, "save_root": str(tmp_path / "runs")}))
    monkeypatch.chdir("/proc")  # the embedded store would be /proc/mlflow.db
    res = CliRunner().invoke(main, ["search", str(hp), "--data-root", str(tmp_path / "data"), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("error:")] == [ln for ln in res.output.splitlines()
                                                                               if ln.strip()]
    assert "cannot be written" in res.output and not (tmp_path / "runs").exists()


# ---- interrupted endings: nothing logged twice, nothing stuck -------------------------------------------------

def _search(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "trainer", "search", "hp.json", "--data-root", "data",
                           "--no-progress", "--no-plots", *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _child(cwd: Path, exp: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id], "tags.role = 'run'")
    assert len(runs) == 1
    return client, runs[0]


SUMMARY = ("best_val_pearson", "best_epoch", "test_pearson_at_best", "test_pearson_last", "epochs_run",
           "stopped_early",
           "eval_test_pearson_mean")


@pytest.mark.e2e
def test_a_run_interrupted_while_ending_finishes_on_the_rerun_logging_each_metric_once(tmp_path):
    """Killed after its summary and evaluation were logged (simulated by marking the FINISHED run KILLED, as a
    kill there leaves it) and with its best.pt cut short: the rerun says so in one line, scores the latest epoch
    and ends FINISHED with every summary and evaluation metric logged once."""
    recording(tmp_path / "data")
    _text(tmp_path / "hp.json", json.dumps({**BASE, "exp_name": "ending", "n_epochs": 2}))
    assert _search(tmp_path).returncode == 0
    client, run = _child(tmp_path, "ending")
    client.set_terminated(run.info.run_id, "KILLED")
    best = next((tmp_path / "runs" / "ending").glob("*/best.pt"))
    best.write_bytes(best.read_bytes()[:100])
    again = _search(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    assert [ln for ln in again.stderr.splitlines() if "best.pt is unreadable" in ln], again.stderr[-2000:]
    client, run = _child(tmp_path, "ending")
    assert run.info.status == "FINISHED" and run.data.tags["eval_checkpoint"].startswith("latest epoch")
    for key in SUMMARY:
        history = client.get_metric_history(run.info.run_id, key)
        assert len(history) == 1, (key, history)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2]


@pytest.mark.e2e
def test_unreadable_checkpoints_are_named_and_the_run_starts_over(tmp_path):
    """Both copies of an interrupted run's latest checkpoint cut short: one line says so, the old run is FAILED
    with that reason, and a new run trains from epoch 0."""
    recording(tmp_path / "data")
    _text(tmp_path / "hp.json", json.dumps({**BASE, "exp_name": "cut", "n_epochs": 2}))
    assert _search(tmp_path).returncode == 0
    client, run = _child(tmp_path, "cut")
    client.set_terminated(run.info.run_id, "KILLED")
    for f in [*(tmp_path / "runs" / "cut").glob("*/epoch_*.pt"), *tmp_path.rglob("latest.pt")]:
        f.write_bytes(f.read_bytes()[:100])
    again = _search(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [ln for ln in again.stderr.splitlines() if "is unreadable" in ln]
    assert len(lines) == 1 and "local checkpoint" in lines[0] and "MLflow artifact" in lines[0], again.stderr[-2000:]
    assert "starts again from epoch 0" in lines[0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cut").experiment_id], "tags.role = 'run'")
    status = sorted((r.info.status, r.data.tags.get("error", "")) for r in runs)
    assert [s for s, _ in status] == ["FAILED", "FINISHED"] and "unreadable" in status[0][1]


# ---- two processes on one search -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.e2e
def test_two_processes_on_one_search_never_train_one_run_twice(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    recording(tmp_path / "data")
    _text(tmp_path / "hp.json", json.dumps({**BASE, "exp_name": "twice", "n_epochs": 6}))
    _text(tmp_path / "hr.json", json.dumps({"lr": [0.01, 0.005, 0.002]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "trainer", "search", "hp.json", "hr.json", "--data-root", "data", "--no-progress",
           "--no-plots"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(mlflow_server)
    try:

        def run0_leased():
            exp = client.get_experiment_by_name("twice")
            runs = client.search_runs([exp.experiment_id], "tags.role = 'run'") if exp else []
            return runs and runs[0].data.tags.get("lease")

        wait_until(run0_leased, "the first process to hold run 0's lease", first)
        # paused while it holds the lease (which lasts minutes), so that run 0 is still in its hands however long
        # the second process takes to start on a slow machine: a CI machine once saw run 0 end first
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, (err[-2000:], second.stderr[-2000:])
    assert "run 0 twice_000_lr0.01: another process trains it" in second.stderr, second.stderr
    for i in (1, 2):  # trained by the second process while the first was paused; the first skips them
        assert re.search(rf"^run {i} twice_00{i}_\S+: already FINISHED", err, re.M), err
    runs = client.search_runs([client.get_experiment_by_name("twice").experiment_id], "tags.role = 'run'")
    assert sorted(r.data.tags["run_index"] for r in runs) == ["0", "1", "2"]  # one MLflow run per run
    for r in runs:
        assert r.info.status == "FINISHED"
        for key in ("train_loss", "val_pearson", "best_val_pearson"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)  # no (key, step) logged twice
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss")) == list(range(1, 7))


REOPENER = """
import json, pathlib, sys, time
from trainer.tracking import Tracker
tracker = Tracker(sys.argv[1])
barrier = pathlib.Path(sys.argv[2])
(barrier / f"ready.{sys.argv[3]}").touch()  # imported and connected
while not (barrier / "go").exists():
    time.sleep(0.01)
start = float((barrier / "go").read_text())
for k, run_id in enumerate(sys.argv[4:]):
    time.sleep(max(0.0, start + 2.0 * k - time.time()))  # both processes at the same moment, run after run
    began = time.time()
    got = tracker.reopen_child(run_id)
    print(json.dumps([run_id, not isinstance(got, str), began, time.time()]), flush=True)
"""


@pytest.mark.e2e
def test_two_processes_reopening_one_interrupted_run_at_the_same_moment_resume_it_once(tmp_path, mlflow_server):
    """Two processes that find the same KILLED run at the same instant: exactly one takes its lease and reopens it,
    the other is told another process trains it (a tag alone is last-writer-wins: both used to resume it, and a
    claim tag read back still let both through once in CI)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("reopen_race")
    ids = []
    for i in range(5):
        run = client.create_run(exp, run_name=f"killed{i}", tags={"role": "run"})
        client.set_terminated(run.info.run_id, "KILLED")
        ids.append(run.info.run_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", REOPENER, "reopen_race", str(barrier), str(n), *ids], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    try:
        for n, p in enumerate(procs):  # both have imported mlflow, however long that takes
            wait_until(lambda n=n: (barrier / f"ready.{n}").exists(), f"reopener {n} to start", p)
    finally:
        (barrier / "go").write_text(str(time.time() + 1.0))
    outs = [p.communicate(timeout=PATIENCE_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(err[-2000:] for _, err in outs)
    won: dict[str, int] = {}
    calls: dict[str, list[tuple[float, float]]] = {}
    for out, _ in outs:
        for line in out.splitlines():
            run_id, took, began, ended = json.loads(line)
            won[run_id] = won.get(run_id, 0) + took
            calls.setdefault(run_id, []).append((began, ended))
    assert won == {run_id: 1 for run_id in ids}  # each run reopened by exactly one of the two
    # the race happened: for some run the two calls overlapped in time (each call reads, writes and reads back)
    overlapped = [r for r, ((a0, a1), (b0, b1)) in calls.items() if a0 < b1 and b0 < a1]
    assert overlapped, calls
    for run_id in ids:
        run = client.get_run(run_id)
        owner = json.loads(run.data.tags["lease"])["owner"]
        assert run.info.status == "RUNNING" and owner
        resumed = [json.loads(v)["owner"] for k, v in run.data.params.items() if k.startswith("resumed.")]
        assert resumed == [owner]  # one reopening recorded, by the lease's holder


class _OneRun:
    """An MLflow store holding one interrupted run, as the server keeps it: tags last-writer-wins, a param once per
    key (another value is refused). `stale` is what a read returns instead of the truth (a rival's writes unseen)."""

    def __init__(self, tags: dict[str, str], params: dict[str, str], stale: dict[str, str] | None = None):
        self.tags, self.params, self.stale, self.writes = tags, params, stale, []

    def get_run(self, run_id):
        from types import SimpleNamespace

        tags = dict(self.tags if self.stale is None else self.stale)
        return SimpleNamespace(info=SimpleNamespace(status="KILLED", end_time=1000),
                               data=SimpleNamespace(tags=tags, params=dict(self.params)))

    def set_tag(self, run_id, key, value):
        self.writes.append(("tag", key))
        self.tags[key] = value

    def log_param(self, run_id, key, value):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        if self.params.get(key, value) != value:
            raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
        self.writes.append(("param", key))
        self.params[key] = value

    def update_run(self, run_id, status):
        self.writes.append(("status", status))


def _reopen(store: _OneRun):
    from trainer import tracking

    tracker = object.__new__(tracking.Tracker)
    tracker.client, tracker.heartbeat = store, tracking.Heartbeat(store)
    return tracker.reopen_child("r1")


def test_reopening_an_interrupted_run_is_won_once_by_a_param_the_store_keeps_one_value_of():
    """Two readers of one interruption: the first logs its `resumed.<hash>` param and takes the lease; a rival
    that read the same state (the winner's lease not yet visible to it, as a read racing the winner's writes
    returns it) is refused the param and yields to the winner; when the winner died before its lease, the rival
    takes the next attempt. Without the param (tags alone) both took the lease."""
    from trainer import tracking

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = _OneRun({"lease": ""}, {})
        assert not isinstance(_reopen(store), str)
        (key,) = store.params
        assert key.startswith("resumed.") and json.loads(store.params[key])["owner"] == tracking._OWNER
        assert store.writes == [("param", key), ("tag", "lease"), ("status", "RUNNING")]

        rival = f"{tracking.socket.gethostname()}:{sleeper.pid}:0"  # a live process of this host
        won = {key: json.dumps({"owner": rival, "at": time.time()})}
        late = _OneRun({"lease": lease_of(rival)}, dict(won), stale={"lease": ""})  # its lease unseen
        got = _reopen(late)
        assert isinstance(got, str) and f":{sleeper.pid}," in got and late.writes == []

        seen_lease = _OneRun({"lease": lease_of(rival)}, {})  # its lease seen, though the status still says KILLED
        got = _reopen(seen_lease)
        assert isinstance(got, str) and f":{sleeper.pid}," in got and seen_lease.writes == []
    finally:
        sleeper.kill()
        sleeper.wait()
    dead = _OneRun({"lease": ""}, dict(won))  # the same winner, now gone before it wrote its lease
    assert not isinstance(_reopen(dead), str)
    assert len(dead.params) == 2 and dead.writes[1:] == [("tag", "lease"), ("status", "RUNNING")]


def lease_of(owner: str) -> str:
    return json.dumps({"owner": owner, "until": time.time() + 100})


# ---- files the user names ----------------------------------------------------------------------------------------

def test_predict_never_writes_through_a_link_and_cleans_up_on_failure(tmp_path, monkeypatch):
    from trainer import inference

    other = tmp_path / "precious.txt"
    other.write_text("keep me")
    (tmp_path / "out.h5.tmp").symlink_to(other)  # the old fixed temp name, pointing elsewhere
    rec = recording(tmp_path / "data")

    class Broken:
        history, source, cell_ids = 10, "m", [0, 1, 2]

        def predict(self, frames):
            raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        inference.write_predictions(Broken(), rec, tmp_path / "out.h5")
    assert other.read_text() == "keep me" and not (tmp_path / "out.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.h5.tmp", "precious.txt"]  # no temp left


def test_evaluate_does_not_overwrite_an_earlier_report_without_force(tmp_path):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "per_cell.csv").write_text("earlier")
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 2 and "already holds per_cell.csv" in res.output and "--force" in res.output
    assert (tmp_path / "rep" / "per_cell.csv").read_text() == "earlier"


@pytest.mark.slow
@pytest.mark.e2e
def test_nothing_is_written_to_the_users_home(tmp_path):
    recording(tmp_path / "data")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MPLCONFIGDIR"))}
    env.update(HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
    for plots in ("--plots", "--no-plots"):
        _text(tmp_path / "hp.json", json.dumps({**BASE, "exp_name": f"home{plots}"}))
        res = subprocess.run([sys.executable, "-m", "trainer", "search", "hp.json", "--data-root", "data",
                              "--no-progress", plots], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    assert list(home.rglob("*")) == []


@pytest.mark.slow
@pytest.mark.e2e
def test_two_searches_started_together_on_a_fresh_embedded_store(tmp_path):
    """They raced MLflow's table set-up (a traceback) and each made a parent: now one parent, each run once."""
    from mlflow.tracking import MlflowClient

    recording(tmp_path / "data")
    _text(tmp_path / "hp.json", json.dumps({**BASE, "exp_name": "race", "n_epochs": 2}))
    _text(tmp_path / "hr.json", json.dumps({"lr": [0.01, 0.005]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "trainer", "search", "hp.json", "hr.json", "--data-root", "data", "--no-progress",
           "--no-plots"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    roles = sorted((r.data.tags.get("role"), r.data.tags.get("run_index", "")) for r in runs)
    assert roles == [("run", "0"), ("run", "1"), ("search", "")]
    assert {r.info.status for r in runs} == {"FINISHED"}
