"""The authenticated tracking server of k8s/mlflow/mlflow-server.yaml, run here for real: the initContainer's
script (auth configuration from the environment, `mlflow db upgrade`) and the server's own arguments
(`mlflow server --app-name basic-auth ...`) from the manifest, with the Secrets' values given as the pods get them.
Then a search, `k8s render`, a pod (`run-index` with the credentials `render --tracking-secret` gives it) and
`k8s finish` with credentials, and without them."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import PATIENCE_S, ROOT, SMALL, _free_port, stop_mlflow_server, wait_healthy
from trainer.cli import main

pytestmark = pytest.mark.e2e
pytest.importorskip("flask_wtf", reason="the server's auth app needs mlflow[auth] (part of the test extra)")

MANIFEST = ROOT / "k8s" / "mlflow" / "mlflow-server.yaml"
ADMIN, ADMIN_PASSWORD = "admin", "a" * 8 + "-admin-Secret-42"
ALICE, ALICE_PASSWORD = "alice", "alice-Secret-pw-42"
BOB, BOB_PASSWORD = "bob", "bob-Secret-pw-4242"


def deployment() -> dict:
    return next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Deployment")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(container: dict, secrets: dict[str, dict[str, str]], fields: dict[str, str]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: values (with $(VAR) of earlier ones), Secret keys, and
    downward-API fields."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = _expand(e["value"], env)
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=b'{"max_results": 1}', headers={"Content-Type": "application/json"})
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


SECRETS = {"mlflow-db": {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "x", "POSTGRES_DB": "mlflow"},
           "mlflow-auth": {"admin-username": ADMIN, "admin-password": ADMIN_PASSWORD,
                           "flask-secret-key": "0123456789abcdef" * 4}}


def start_manifest_server(folder: Path, secrets: dict, local: dict[str, str],
                          store_uri: Callable[[str], str] = lambda uri: uri) -> tuple[subprocess.Popen, str, dict]:
    """The manifest's tracking server on localhost: its initContainer script, then its `mlflow server` arguments
    (host, port and workers changed for a test). `local` overrides environment values (paths in the pod);
    `store_uri` rewrites the backend store URI the manifest builds (its host `postgres` is the in-cluster name)."""
    spec = deployment()["spec"]["template"]["spec"]
    init, server = spec["initContainers"][0], spec["containers"][0]
    fields = {"metadata.namespace": "retina"}
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"  # the image's `mlflow`
    init_env = {**base, **container_env(init, secrets, fields), **local}
    init_env["MLFLOW_BACKEND_STORE_URI"] = store_uri(init_env["MLFLOW_BACKEND_STORE_URI"])
    assert init["command"][:2] == ["sh", "-ec"]
    for _ in range(2):  # the initContainer runs on every start of the pod: it must be repeatable
        done = subprocess.run(init["command"], env=init_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    port = _free_port()
    args = []
    for a in server["args"]:
        a = _expand(a, container_env(server, secrets, fields))
        a = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}"}.get(a, a)
        args.append("--workers=1" if a.startswith("--workers=") else a)
    env = {**base, **container_env(server, secrets, fields), **local}
    env["MLFLOW_BACKEND_STORE_URI"] = store_uri(env["MLFLOW_BACKEND_STORE_URI"])
    log = open(folder / "server.log", "a")
    proc = subprocess.Popen([*server["command"], *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    wait_healthy(proc, uri, folder / "server.log", 180)
    return proc, uri, env


stop_manifest_server = stop_mlflow_server


def as_user(user: str, password: str, fn: Callable[[], Any]) -> Any:
    """`fn()` with MLFLOW_TRACKING_USERNAME/PASSWORD set in this process, then restored."""
    with mock.patch.dict(os.environ, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password):
        return fn()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The manifest's tracking server on localhost, its backend store a SQLite file instead of PostgreSQL
    (tests/test_postgres.py runs it on PostgreSQL)."""
    folder = tmp_path_factory.mktemp("auth-server")
    (folder / "auth").mkdir()
    local = {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder / 'mlflow.db'}",
             "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth" / "basic_auth.ini"),
             "MLFLOW_ARTIFACTS_DESTINATION": str(folder / "artifacts"), "HOME": str(folder)}
    proc, uri, env = start_manifest_server(folder, SECRETS, local)
    # the admin (from the Secret) makes two users, as docs/run-on-kubernetes.md does
    from mlflow.server.auth.client import AuthServiceClient

    def users() -> None:
        admin = AuthServiceClient(uri)
        admin.create_user(ALICE, ALICE_PASSWORD)
        admin.create_user(BOB, BOB_PASSWORD)

    as_user(ADMIN, ADMIN_PASSWORD, users)
    yield {"uri": uri, "folder": folder, "env": env}
    stop_manifest_server(proc)


def test_the_manifest_runs_the_basic_auth_app_with_secrets_from_secrets_only(auth_server):
    dep = deployment()
    spec = dep["spec"]["template"]["spec"]
    server, init = spec["containers"][0], spec["initContainers"][0]
    assert "--app-name=basic-auth" in server["args"]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for c in (server, init) for e in c["env"]
                   if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                 "POSTGRES_PASSWORD"):
        assert name in from_secret, f"{name} must come from a Secret"
    text = MANIFEST.read_text()
    assert "admin_password" not in text and ADMIN_PASSWORD not in text
    assert "mlflow db upgrade" in init["command"][-1]
    # the configuration the initContainer wrote: readable by its owner only, the database from the environment
    ini = Path(auth_server["env"]["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert f"database_uri = {auth_server['env']['MLFLOW_BACKEND_STORE_URI']}" in ini.read_text()
    assert "default_permission = READ" in ini.read_text()
    assert "auth_cache_ttl_seconds = 60" in ini.read_text()  # else every request hashes the password (PBKDF2)
    # `mlflow db upgrade` made the store, and the auth app its tables in the same database
    db = sqlite3.connect(auth_server["folder"] / "mlflow.db")
    tables = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
    assert {"alembic_version", "runs", "experiments", "users", "alembic_version_auth"} <= tables
    # an in-memory volume holds it in the pod
    auth_volume = next(v for v in spec["volumes"] if v["name"] == "auth")
    assert auth_volume["emptyDir"]["medium"] == "Memory"


def test_no_credentials_no_access_but_health_answers(auth_server):
    uri = auth_server["uri"]
    search = f"{uri}/api/2.0/mlflow/experiments/search"
    assert _status(search) == 401
    assert _status(search, (ALICE, "wrong")) == 401
    assert _status(search, (ALICE, ALICE_PASSWORD)) == 200
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:  # the probes need no credentials
        assert r.status == 200


def _search_files(folder: Path, exp_name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hp.json").write_text(json.dumps({"exp_name": exp_name, **SMALL, "n_epochs": 1, "save_root": "runs"}))
    (folder / "hr.json").write_text(json.dumps({"lr": [0.01]}))
    return folder / "hp.json", folder / "hr.json"


def _env(uri: str, user: str | None = None, password: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or "")
    return env


@pytest.mark.slow
def test_a_search_logs_with_credentials_and_fails_fast_in_one_line_without(auth_server, data_root, tmp_path):
    uri = auth_server["uri"]
    hp, hr = _search_files(tmp_path, "auth_search")
    cmd = [sys.executable, "-m", "trainer", "search", str(hp), str(hr), "--data-root", str(data_root),
           "--no-progress", "--no-plots"]
    # refused at once: MLflow's own retries of a 401 would take minutes (the bound fails loudly)
    refused = subprocess.run(cmd, cwd=tmp_path, env=_env(uri), capture_output=True, text=True, timeout=PATIENCE_S)
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "401" in lines[0], refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    client = MlflowClient(uri)
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    try:
        assert client.get_experiment_by_name("auth_search") is None  # nothing was created
        ok = subprocess.run(cmd, cwd=tmp_path, env=_env(uri, ALICE, ALICE_PASSWORD), capture_output=True, text=True,
                            timeout=300)
        assert ok.returncode == 0, ok.stderr[-3000:]
        exp = client.get_experiment_by_name("auth_search")
        runs = client.search_runs([exp.experiment_id])
        assert sorted(r.data.tags["role"] for r in runs) == ["run", "search"]
        assert all(r.info.status == "FINISHED" for r in runs)
        # the server knows who made it: alice may manage the experiment she created (and nobody else may write)
        from mlflow.server.auth.client import AuthServiceClient

        auth = AuthServiceClient(uri)
        assert auth.get_user_permission(ALICE, "experiment", exp.experiment_id).permission == "MANAGE"
        assert auth.get_user_permission(BOB, "experiment", exp.experiment_id).permission == "READ"
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")


def test_a_search_without_credentials_says_which_variables_to_set(auth_server, data_root, tmp_path):
    hp, hr = _search_files(tmp_path, "auth_search_hint")
    cmd = [sys.executable, "-m", "trainer", "search", str(hp), str(hr), "--data-root", str(data_root),
           "--no-progress", "--no-plots"]
    refused = subprocess.run(cmd, cwd=tmp_path, env=_env(auth_server["uri"]), capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2
    assert "MLFLOW_TRACKING_USERNAME" in refused.stderr and "check MLFLOW_TRACKING_URI" not in refused.stderr


@pytest.mark.slow
def test_render_a_pod_and_finish_with_the_credentials_of_a_secret(auth_server, data_root, tmp_path, monkeypatch):
    uri = auth_server["uri"]
    hp, hr = _search_files(tmp_path, "auth_k8s")
    base = ["k8s", "render", str(hp), str(hr), "--image", "i:1", "--tracking-uri", uri,
            "--tracking-secret", "mlflow-alice"]
    for k in list(os.environ):
        if k.startswith("MLFLOW_TRACKING_"):
            monkeypatch.delenv(k)
    # without credentials, with a wrong password: one clear line each, nothing printed for kubectl
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"error: the MLflow tracking server {uri} (from --tracking-uri) asks for "
                                  "credentials (401 not authenticated): set MLFLOW_TRACKING_USERNAME and "
                                  "MLFLOW_TRACKING_PASSWORD to your account on it")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 2 and f"refused the credentials of user '{ALICE}'" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    # alice renders: the parent run is hers, and the pods get her credentials from the Secret
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE_PASSWORD)
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0, res.output
    cm, job = list(yaml.safe_load_all(res.stdout))
    c = job["spec"]["template"]["spec"]["containers"][0]
    secret = {"mlflow-alice": {"username": ALICE, "password": ALICE_PASSWORD}}
    pod_env = container_env(c, secret, {"metadata.name": "auth-k8s-0-abcde", "spec.nodeName": "gpu-node-1"})
    assert pod_env["MLFLOW_TRACKING_USERNAME"] == ALICE and pod_env["MLFLOW_TRACKING_PASSWORD"] == ALICE_PASSWORD
    # bob may read alice's experiment but not write to it: one line, no traceback
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", BOB)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", BOB_PASSWORD)
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 2, res.output
    assert f"does not let user '{BOB}' write to experiment 'auth_k8s' (403 permission denied)" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # the pod, as Kubernetes starts it: the ConfigMap's files at /config, the container's command and environment
    config = tmp_path / "config"
    config.mkdir()
    for name, text in cm["data"].items():
        (config / name).write_text(text)
    command = [str(config / Path(a).name) if a.startswith("/config/") else a for a in c["command"]]
    workdir = tmp_path / "pod0"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(pod_env, JOB_COMPLETION_INDEX="0", HOME=str(workdir), RETINA_DATA_ROOT=str(data_root))
    cmd = [sys.executable, "-m", "trainer", *command[1:]]
    ran = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    # the same pod with a Secret that holds a wrong password: exit 2 (FailIndex: a retry cannot help)
    bad = subprocess.run(cmd, cwd=workdir, env={**env, "MLFLOW_TRACKING_PASSWORD": "wrong"}, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
    # alice closes the search
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE_PASSWORD)
    res = CliRunner().invoke(main, ["k8s", "finish", str(hp), str(hr), "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    client = MlflowClient(uri)
    parent = client.get_run(job["spec"]["template"]["metadata"]["annotations"]["retina-trainer/parent-run-id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["runs_finished"] == "1/1"
    # and without credentials, status cannot even read it
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    res = CliRunner().invoke(main, ["k8s", "status", str(hp), str(hr), "--tracking-uri", uri])
    assert res.exit_code == 2 and "asks for credentials" in res.output, res.output


def _page_snippets() -> list[tuple[str, str]]:
    """(argument line, python body) of the `python - ... <<'EOF'` snippets of docs/run-on-kubernetes.md."""
    text = (ROOT / "docs" / "run-on-kubernetes.md").read_text()
    return re.findall(r"^python - (.*?) <<'EOF'\n(.*?)^EOF$", text, flags=re.S | re.M)


def test_the_pages_user_administration_snippets_work(auth_server, tmp_path):
    uri = auth_server["uri"]
    snippets = _page_snippets()
    create = next(body for args, body in snippets if "create_user" in body)
    grant = next(body for args, body in snippets if "grant_user_permission" in body)

    def python(body: str, args: list[str], user: str, password: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-", *args], input=body, env=_env(uri, user, password),
                              capture_output=True, text=True, timeout=120)

    # the admin creates a user, who can then sign in
    made = python(create, ["carol", "carol-Secret-pw-42"], ADMIN, ADMIN_PASSWORD)
    assert made.returncode == 0 and "created user carol" in made.stdout, made.stderr[-2000:]
    assert _status(f"{uri}/api/2.0/mlflow/experiments/search", ("carol", "carol-Secret-pw-42")) == 200
    # alice's experiment: bob may read it, not write to it, until alice grants him EDIT
    os.environ.update(MLFLOW_TRACKING_USERNAME=ALICE, MLFLOW_TRACKING_PASSWORD=ALICE_PASSWORD)
    try:
        exp_id = MlflowClient(uri).create_experiment("auth_shared")
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    write = ("import os, sys\nfrom mlflow import MlflowClient\n"
             "print(MlflowClient(os.environ['MLFLOW_TRACKING_URI']).create_run(sys.argv[1]).info.run_id)\n")
    assert python(write, [exp_id], BOB, BOB_PASSWORD).returncode != 0
    granted = python(grant, [BOB, "auth_shared"], ALICE, ALICE_PASSWORD)
    assert granted.returncode == 0 and "bob may now write to experiment auth_shared" in granted.stdout, \
        granted.stderr[-2000:]
    assert python(write, [exp_id], BOB, BOB_PASSWORD).returncode == 0
