"""`retina-trainer k8s status` and `k8s finish` against a real MLflow server, after the Job's pods (`run-index`, run
as separate processes, as in tests/test_fanout.py) trained, failed, or never started."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from test_fanout import make_search, pod, render

from trainer.cli import main
from trainer.search import expand

pytestmark = pytest.mark.e2e


def cli(*args: str, uri: str | None = None):
    """The command in this process (torch and mlflow are imported already), the tracking URI by option."""
    extra = ["--tracking-uri", uri] if uri else []
    return CliRunner().invoke(main, ["k8s", *args, *extra])


def table_rows(output: str) -> dict[int, list[str]]:
    """The summary table's rows by run index (columns as printed)."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit() and len(cells) > 5:
            rows[int(cells[0])] = cells
    return rows


def parent_state(client: MlflowClient, run_id: str) -> tuple[str, dict, list[str]]:
    run = client.get_run(run_id)
    files = sorted(f.path for f in client.list_artifacts(run_id)) + \
        sorted(f.path for d in ("summary", "plots") for f in client.list_artifacts(run_id, d))
    return run.info.status, dict(run.data.tags), files


@pytest.mark.slow
def test_status_then_finish_a_search_with_a_finished_a_diverged_and_a_never_started_run(tmp_path, data_root,
                                                                                          mlflow_server):
    # lr 1e10 diverges: that pod's run ends FAILED (exit 2, its index failed for good); run 2 never starts
    hp, hr = make_search(tmp_path, "finish_mixed", {"n_epochs": 1}, {"lr": [0.01, 1e10, 0.003]})
    search = expand(hp, hr)
    job = render(tmp_path, hp, hr, mlflow_server, data_root)
    client = MlflowClient(mlflow_server)
    results = {}
    for i in (0, 1):
        p = pod(i, job, tmp_path / f"pod{i}")
        out, err = p.communicate(timeout=300)
        results[i] = (p.returncode, err)
    assert results[0][0] == 0, results[0][1][-3000:]
    assert results[1][0] == 2, results[1][1][-3000:]
    assert client.get_run(job.parent).info.status == "RUNNING"  # nobody closes it: the issue

    before = parent_state(client, job.parent)
    status = cli("status", str(hp), str(hr), uri=mlflow_server)
    assert status.exit_code == 0, status.output
    rows = table_rows(status.output)
    assert sorted(rows) == [0, 1, 2]
    assert rows[0][1] == search.runs[0].name and "FINISHED" in rows[0]
    assert "FAILED" in rows[1] and "PENDING" in rows[2]
    assert float(rows[0][3]) > 0  # best_val_r of the finished run
    assert "lower lr" in status.output  # why run 1 failed, from its error tag
    assert f"run 2 {search.runs[2].name}: not started" in status.output
    assert f"1 FINISHED, 1 FAILED, 1 PENDING; parent run {job.parent} is RUNNING" in status.output
    assert parent_state(client, job.parent) == before  # status changes nothing

    done = cli("finish", str(hp), str(hr), uri=mlflow_server)
    assert done.exit_code == 1, done.output  # some runs did not finish
    last = done.output.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 3 runs of search") and "run 1 " in last and "run 2 " in last, last
    assert "not started" in last and "Traceback" not in done.output
    assert table_rows(done.output).keys() == {0, 1, 2}
    state, tags, files = parent_state(client, job.parent)
    assert state == "FAILED"
    assert tags["runs_finished"] == "1/3" and tags["runs_not_finished"] == "1,2"
    assert tags["closed_by"] == "retina-trainer k8s finish"
    assert "summary/search_summary.txt" in files and "plots/search_best_val_pearson.png" in files
    text = Path(client.download_artifacts(job.parent, "summary/search_summary.txt", str(tmp_path))).read_text()
    assert f"parent run {job.parent}: FAILED" in text
    assert all(r.name in text for r in search.runs) and "lower lr" in text

    # the missing index runs after all (a retry, a later apply): finish again moves the counts on
    p = pod(2, job, tmp_path / "pod2")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    again = cli("finish", str(hp), str(hr), uri=mlflow_server)
    assert again.exit_code == 1 and "1 of 3 runs" in again.output, again.output
    state, tags, _ = parent_state(client, job.parent)
    assert state == "FAILED" and tags["runs_finished"] == "2/3" and tags["runs_not_finished"] == "1"


def _fake_kubectl(folder: Path, rc: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "kubectl"
    script.write_text("#!/bin/sh\n"
                      f"printf '%s\\n' \"$@\" > '{folder / 'args.txt'}'\n"
                      + ("echo 'job.batch \"x\" deleted'\necho 'configmap \"x-config\" deleted'\n" if rc == 0 else
                         "echo 'The connection to the server localhost:8080 was refused' >&2\n")
                      + f"exit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.slow
def test_finish_of_a_complete_search_ends_finished_and_deletes_its_objects(tmp_path, data_root, mlflow_server,
                                                                          monkeypatch):
    hp, hr = make_search(tmp_path, "finish_done", {"n_epochs": 1}, {"lr": [0.01, 0.003]})
    search = expand(hp, hr)
    job = render(tmp_path, hp, hr, mlflow_server, data_root)
    for i in range(2):
        p = pod(i, job, tmp_path / f"pod{i}")
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(mlflow_server)
    assert client.get_run(job.parent).info.status == "FINISHED"  # the last pod closed it, without table or plot

    # with cluster access (a kubectl that works): the Job and ConfigMap go, selected by the search's label
    bin_dir = tmp_path / "bin"
    _fake_kubectl(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the URI from the environment this time
    res = cli("finish", str(hp), str(hr), "--delete", "--namespace", "retina")
    assert res.exit_code == 0, res.output
    assert (bin_dir / "args.txt").read_text().split() == [
        "-n", "retina", "delete", "job,configmap", "-l", f"retina-trainer/search-id={search.search_id}",
        "--ignore-not-found"]
    assert 'job.batch "x" deleted' in res.stderr
    assert f"parent run {job.parent} of search {search.search_id} ended FINISHED" in res.stderr
    state, tags, files = parent_state(client, job.parent)
    assert state == "FINISHED" and tags["runs_finished"] == "2/2" and tags["runs_not_finished"] == ""
    assert {"summary/search_summary.txt", "plots/search_best_val_pearson.png"} <= set(files)

    # without cluster access: kubectl fails, and finish says what to run instead
    _fake_kubectl(bin_dir, rc=1)
    res = cli("finish", str(hp), str(hr), "--delete", "--no-plots")
    assert res.exit_code == 0, res.output
    assert "kubectl could not delete them (The connection to the server localhost:8080 was refused)" in res.stderr
    assert f"kubectl delete job,configmap -l retina-trainer/search-id={search.search_id} --ignore-not-found" \
        in res.stderr
    # without kubectl at all
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = cli("finish", str(hp), str(hr), "--delete", "--no-plots", "--namespace", "retina")
    assert res.exit_code == 0, res.output
    assert "no kubectl here" in res.stderr
    assert f"kubectl -n retina delete job,configmap -l retina-trainer/search-id={search.search_id}" in res.stderr


def _lease(owner: str, until: float) -> str:
    return json.dumps({"owner": owner, "until": until})


def test_finish_waits_for_runs_a_pod_still_trains_and_names_lost_ones(tmp_path, data_root, mlflow_server):
    from trainer.tracking import CONFIG_ID, INDEX, PARENT_TAG, ROLE, SEARCH_ID

    hp, hr = make_search(tmp_path, "finish_busy", {"n_epochs": 1}, {"lr": [0.01, 0.003]})
    search = expand(hp, hr)
    job = render(tmp_path, hp, hr, mlflow_server, data_root)
    client = MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name("finish_busy").experiment_id
    # what a pod on another node leaves in MLflow while it trains run 0: a RUNNING child with a live lease
    child = client.create_run(exp_id, run_name=search.runs[0].name, tags={
        PARENT_TAG: job.parent, ROLE: "run", SEARCH_ID: search.search_id, CONFIG_ID: search.runs[0].config_id,
        INDEX: "0", "lease": _lease("node-7:41:1", time.time() + 600)})
    res = cli("status", str(hp), str(hr), uri=mlflow_server)
    assert res.exit_code == 0 and "RUNNING" in table_rows(res.output)[0], res.output
    assert "training (process node-7:41" in res.output
    refused = cli("finish", str(hp), str(hr), uri=mlflow_server)
    assert refused.exit_code == 2, refused.output
    assert "1 run(s) still training (run 0 " in refused.output and "--force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert client.get_run(job.parent).info.status == "RUNNING"  # nothing written
    assert not client.list_artifacts(job.parent, "summary")

    # the pod is gone (node lost, OOM-killed): its lease runs out, and the run is LOST, not running
    client.set_tag(child.info.run_id, "lease", _lease("node-7:41:1", time.time() - 5))
    res = cli("status", str(hp), str(hr), uri=mlflow_server)
    assert "LOST" in table_rows(res.output)[0] and "nobody holds its lease" in res.output
    closed = cli("finish", str(hp), str(hr), uri=mlflow_server)
    assert closed.exit_code == 1 and "run 0 " in closed.output and "run 1 " in closed.output
    assert client.get_run(job.parent).info.status == "FAILED"

    # --force closes even while a pod trains
    client.set_tag(child.info.run_id, "lease", _lease("node-7:41:1", time.time() + 600))
    forced = cli("finish", str(hp), str(hr), "--force", "--no-plots", uri=mlflow_server)
    assert forced.exit_code == 1 and "training" in forced.output
    assert client.get_run(job.parent).info.status == "FAILED"


def test_status_and_finish_errors_are_one_line_and_create_nothing(tmp_path, data_root, mlflow_server, monkeypatch):
    client = MlflowClient(mlflow_server)
    # an experiment the server does not have: status says so, and does not create it
    hp, hr = make_search(tmp_path / "never", "finish_never_rendered", {"n_epochs": 1}, {"lr": [0.01]})
    res = cli("status", str(hp), str(hr), uri=mlflow_server)
    assert res.exit_code == 2 and "no experiment 'finish_never_rendered'" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert client.get_experiment_by_name("finish_never_rendered") is None
    # an experiment without this search's parent run (another search of it was rendered)
    hp1, hr1 = make_search(tmp_path / "one", "finish_other", {"n_epochs": 1}, {"lr": [0.01]})
    render(tmp_path / "one", hp1, hr1, mlflow_server, data_root)
    hp2, hr2 = make_search(tmp_path / "two", "finish_other", {"n_epochs": 1}, {"lr": [0.02]})
    res = cli("finish", str(hp2), str(hr2), uri=mlflow_server)
    assert res.exit_code == 2 and "no parent run of search" in res.output, res.output
    # a parent run id that is not this search's
    other = expand(hp1, hr1)
    parent1 = client.search_runs([client.get_experiment_by_name("finish_other").experiment_id],
                                 f"tags.search_id = '{other.search_id}'")[0].info.run_id
    res = cli("status", str(hp2), str(hr2), "--parent-run-id", parent1, uri=mlflow_server)
    assert res.exit_code == 2 and "is not the parent run of search" in res.output, res.output
    res = cli("status", str(hp2), str(hr2), "--parent-run-id", "0123456789abcdef0123456789abcdef", uri=mlflow_server)
    assert res.exit_code == 2 and "not found" in res.output, res.output
    # an unreachable server: exit 3, one line naming it and where it came from
    res = cli("status", str(hp1), str(hr1), uri="http://127.0.0.1:9")
    assert res.exit_code == 3, res.output
    assert "the MLflow tracking server http://127.0.0.1:9 (from --tracking-uri) cannot be reached" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # no tracking URI at all: click's usage error
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = cli("status", str(hp1), str(hr1))
    assert res.exit_code == 2 and "--tracking-uri" in res.output
    res = cli("finish", str(hp1), str(hr1), "--namespace", "Bad NS", uri=mlflow_server)
    assert res.exit_code == 2 and "--namespace 'Bad NS'" in res.output


def test_the_delete_command_is_what_kubectl_needs():
    from trainer.launch.finish import delete_command

    assert delete_command("abc", None) == ["kubectl", "delete", "job,configmap", "-l", "retina-trainer/search-id=abc",
                                           "--ignore-not-found"]
    assert delete_command("abc", "retina")[:3] == ["kubectl", "-n", "retina"]
