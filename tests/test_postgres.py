"""The tracking server of k8s/mlflow/ on a real PostgreSQL (a throwaway cluster made with initdb on localhost):
the Deployment's initContainer and server (basic auth, its users in the same database), then the backup CronJob's
script (pg_dump) and the restore Job's script (pg_restore), taken from the manifests, with the server stopped and
started again around the restore as docs/run-on-kubernetes.md says. Skipped where PostgreSQL's programs are
missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_auth import (
    ADMIN,
    ADMIN_PASSWORD,
    SECRETS,
    _status,
    as_user,
    container_env,
    start_manifest_server,
    stop_manifest_server,
)

from conftest import ROOT, _free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
psycopg2 = pytest.importorskip("psycopg2", reason="the server's PostgreSQL driver (psycopg2-binary, test extra)")
if not (shutil.which("initdb") and shutil.which("pg_ctl") and shutil.which("pg_dump") and shutil.which("pg_restore")):
    pytest.skip("PostgreSQL's initdb, pg_ctl, pg_dump and pg_restore are not on PATH", allow_module_level=True)

DB_PASSWORD = "0123456789abcdef0123456789abcdef"  # hex, as the Secret's


def _as_postgres(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """PostgreSQL's server programs refuse to run as root: run them as the postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def postgres():
    folder = Path(tempfile.mkdtemp(prefix="retina-pg-"))
    folder.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    pwfile = folder / "pw"
    pwfile.write_text(DB_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    port = _free_port()
    made = _as_postgres(["initdb", "-D", str(folder / "data"), "-U", "mlflow", f"--pwfile={pwfile}",
                         "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions"])
    assert made.returncode == 0, made.stderr[-2000:]
    started = _as_postgres(["pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w", "-o",
                            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"])
    assert started.returncode == 0, started.stderr[-2000:] + (folder / "server.log").read_text()[-2000:]
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="mlflow", PGPASSWORD=DB_PASSWORD)
    created = subprocess.run(["createdb", "mlflow"], env=env, capture_output=True, text=True, timeout=60)
    try:
        assert created.returncode == 0, created.stderr
        yield {"port": port, "folder": folder, "env": env}
    finally:
        _as_postgres(["pg_ctl", "-D", str(folder / "data"), "-m", "fast", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


def _container(path: str, kind: str) -> dict:
    doc = next(d for d in yaml.safe_load_all((ROOT / path).read_text()) if d and d["kind"] == kind)
    spec = doc["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else doc["spec"]
    return spec["template"]["spec"]["containers"][0]


def _script_env(container: dict, pg: dict, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as the Secret gives it, pointed at the local PostgreSQL."""
    secrets = {"mlflow-db": {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": DB_PASSWORD, "POSTGRES_DB": "mlflow"}}
    env = {**os.environ, **container_env(container, secrets, {}), **(extra or {})}
    assert env["PGHOST"] == "postgres"  # the Service; here the local server
    env.update(PGHOST="127.0.0.1", PGPORT=str(pg["port"]))
    return env


def _run_script(container: dict, env: dict[str, str], backups: Path) -> subprocess.CompletedProcess:
    assert container["command"][:2] == ["sh", "-ec"]
    script = container["command"][2].replace("/backups", str(backups))
    return subprocess.run(["sh", "-ec", script], env=env, capture_output=True, text=True, timeout=300)


def _count(pg: dict, table: str) -> int:
    with psycopg2.connect(host="127.0.0.1", port=pg["port"], user="mlflow", password=DB_PASSWORD,
                          dbname="mlflow") as conn, conn.cursor() as cur:
        cur.execute(f"select count(*) from {table}")
        return cur.fetchone()[0]


@pytest.mark.slow
def test_server_on_postgresql_then_backup_and_restore(postgres, tmp_path):
    folder = tmp_path / "server"
    (folder / "auth").mkdir(parents=True)
    secrets = {**SECRETS, "mlflow-db": {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": DB_PASSWORD,
                                        "POSTGRES_DB": "mlflow"}}
    local = {"MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth" / "basic_auth.ini"),
             "MLFLOW_ARTIFACTS_DESTINATION": str(folder / "artifacts"), "HOME": str(folder)}

    def store(uri: str) -> str:  # the manifest's URI, its in-cluster host replaced by the local server
        assert uri == f"postgresql+psycopg2://mlflow:{DB_PASSWORD}@postgres:5432/mlflow"
        return uri.replace("@postgres:5432/", f"@127.0.0.1:{postgres['port']}/")

    proc, uri, _ = start_manifest_server(folder, secrets, local, store)
    try:
        assert _status(f"{uri}/api/2.0/mlflow/experiments/search") == 401
        client = MlflowClient(uri)

        def log() -> str:
            exp = client.create_experiment("pg_backup")
            run = client.create_run(exp, run_name="before-backup")
            client.log_metric(run.info.run_id, "best_val_pearson", 0.5)
            client.set_terminated(run.info.run_id)
            return run.info.run_id

        run_id = as_user(ADMIN, ADMIN_PASSWORD, log)
        # the tracking store's tables and the auth app's (users, permissions) share the database
        assert _count(postgres, "runs") == 1 and _count(postgres, "users") == 1
    finally:
        stop_manifest_server(proc)

    backups = tmp_path / "backups"
    backups.mkdir()
    dump = _container("k8s/mlflow/postgres-backup.yaml", "CronJob")
    env = _script_env(dump, postgres, {"KEEP": "2"})
    for i in range(3):
        if i:
            time.sleep(1.1)  # the dumps are named by the second
        done = _run_script(dump, env, backups)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "wrote " in done.stdout
    files = sorted(p.name for p in backups.iterdir())
    assert len(files) == 2 and all(f.startswith("mlflow-") and f.endswith(".dump") for f in files), files  # KEEP

    # the database loses its runs; the restore Job's script brings back the newest dump
    with psycopg2.connect(host="127.0.0.1", port=postgres["port"], user="mlflow", password=DB_PASSWORD,
                          dbname="mlflow") as conn, conn.cursor() as cur:
        cur.execute("truncate runs cascade")
    assert _count(postgres, "runs") == 0
    restore = _container("k8s/mlflow/postgres-restore.yaml", "Job")
    done = _run_script(restore, _script_env(restore, postgres), backups)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"restored {backups / files[-1]}" in done.stdout
    assert _count(postgres, "runs") == 1 and _count(postgres, "users") == 1

    # the server starts again on the restored database (its initContainer first), users and runs as they were
    proc, uri, _ = start_manifest_server(folder, secrets, local, store)
    try:
        run = as_user(ADMIN, ADMIN_PASSWORD, lambda: MlflowClient(uri).get_run(run_id))
        assert run.info.run_name == "before-backup" and run.data.metrics["best_val_pearson"] == 0.5
    finally:
        stop_manifest_server(proc)


WORKER = """
import sys, json
from trainer.launch import adaptive
p = adaptive.plan(sys.argv[1], sys.argv[2], "tpe", 3)
study = adaptive.open_study(p, sys.argv[3])
trial = study.ask()
study.sampler = adaptive.make_sampler(p, trial.number)
values = adaptive.sample(trial, p)
study.tell(trial, 0.5)
print(json.dumps(values))
"""


def test_workers_starting_together_share_one_study_in_postgresql(postgres, tmp_path):
    """An adaptive search's study in PostgreSQL (as on a cluster): three workers open it at the same moment on a new
    database (its tables made once), from a URL without a driver, and each takes its own trial."""
    made = subprocess.run(["createdb", "optuna"], env=postgres["env"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    (tmp_path / "hp.json").write_text(json.dumps({"exp_name": "pg_study", "n_epochs": 3}))
    (tmp_path / "hr.json").write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    url = f"postgresql://mlflow:{DB_PASSWORD}@127.0.0.1:{postgres['port']}/optuna"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "hp.json"), str(tmp_path / "hr.json"),
                                 url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    outs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], "\n---\n".join(err[-2000:] for _, err in outs)
    import optuna

    from trainer.launch import adaptive
    from trainer.tracking import driver_url

    p = adaptive.plan(tmp_path / "hp.json", tmp_path / "hr.json", "tpe", 3)
    study = optuna.load_study(study_name=p.study_name, storage=driver_url(url))
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
    assert len({t.params["lr"] for t in study.trials}) == 3  # per-trial seeds: the workers drew different values
    assert sorted(json.loads(out)["lr"] for out, _ in outs) == sorted(t.params["lr"] for t in study.trials)


def test_the_setup_lock_serialises_processes_on_one_database_and_a_bad_password_is_one_line(postgres, tmp_path):
    """The advisory lock that serialises table set-up: a second holder waits until the first lets go (two sessions
    of one database, as two pods); a URL that cannot connect takes no lock, and the study's own error is one line
    that names the storage without its password."""
    import threading

    from trainer.errors import UserError
    from trainer.launch import adaptive
    from trainer.tracking import _store_setup_lock

    url = f"postgresql://mlflow:{DB_PASSWORD}@127.0.0.1:{postgres['port']}/mlflow"
    events: list[str] = []

    def other() -> None:
        with _store_setup_lock(url):
            events.append("other")

    with _store_setup_lock(url):
        waiting = threading.Thread(target=other)
        waiting.start()
        waiting.join(3)
        assert waiting.is_alive()  # blocked on the lock this session holds
        events.append("first")
    waiting.join(60)
    assert events == ["first", "other"]

    bad = f"postgresql://mlflow:wrong@127.0.0.1:{postgres['port']}/mlflow"
    with _store_setup_lock(bad):  # no lock, no error here
        events.append("unlocked")
    (tmp_path / "hp.json").write_text(json.dumps({"exp_name": "pg_bad", "n_epochs": 1}))
    (tmp_path / "hr.json").write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    p = adaptive.plan(tmp_path / "hp.json", tmp_path / "hr.json", "tpe", 2)
    with pytest.raises(UserError) as err:
        adaptive.open_study(p, bad)
    message = str(err.value)
    assert "cannot open the study storage postgresql+psycopg2://mlflow:***@127.0.0.1" in message
    assert "wrong" not in message and "\n" not in message
