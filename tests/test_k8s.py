"""Kubernetes manifests: rendered and static ones pass the Kubernetes 1.33+ schemas (strict), plus the rules the
schemas do not check (Indexed mode, completions, GPU limits, index-to-run mapping, failure policy, names)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import ROOT, SMALL
from trainer.cli import main
from trainer.errors import UserError
from trainer.launch import k8s
from trainer.search import expand

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
IMAGE = "registry.example.com/retina-trainer:0.2.0"
IN_CLUSTER_URI = "http://mlflow.retina.svc.cluster.local:5000"
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def write_search(folder: Path, hp_extra=None, ranges=None) -> tuple[Path, Path | None]:
    hp = {"exp_name": "k8s_test", **SMALL, "n_epochs": 1, "save_root": "runs", **(hp_extra or {})}
    (folder / "hp.json").write_text(json.dumps(hp))
    if ranges is None:
        return folder / "hp.json", None
    (folder / "hr.json").write_text(json.dumps(ranges))
    return folder / "hp.json", folder / "hr.json"


def files_of(hp: Path, hr: Path | None) -> dict:
    files = {"hyperparams.json": json.loads(hp.read_text())}
    if hr is not None:
        files["hyperranges.json"] = json.loads(hr.read_text())
    return files


GRID = {"lr": [0.01, 0.003], "chans": [[4, 4], [2, 4]]}


def rendered(tmp_path, ranges=GRID, hp_extra=None, **kwargs):
    """Expand and render a search; ranges=None means no hyperranges file."""
    hp, hr = write_search(tmp_path, hp_extra, ranges)
    s = expand(hp, hr)
    args = {"image": IMAGE, "tracking_uri": IN_CLUSTER_URI, "parent_run_id": "parent123", **kwargs}
    return s, k8s.render(s, files_of(hp, hr), **args)


def container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def env_of(job) -> dict[str, str]:
    """Plain values as they are; values from elsewhere (downward API, Secrets) as 'from:<where>'."""
    out = {}
    for e in container(job)["env"]:
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]
            out[e["name"]] = ("from:" + ref["fieldRef"]["fieldPath"] if "fieldRef" in ref else
                              f"from:secret/{ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}")
    return out


def validate_all(docs, where):
    assert docs, f"{where}: no manifests"
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: "
                            f"{exc.message} at {'.'.join(map(str, exc.path))}")


# --- schema validation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [0, 1])
@pytest.mark.parametrize("with_ranges", [True, False])
def test_rendered_manifests_pass_strict_schema_validation(tmp_path, gpus, with_ranges):
    _, docs = rendered(tmp_path, ranges=GRID if with_ranges else None, gpus=gpus, namespace="retina",
                       max_failed_indexes=1 if with_ranges else None)
    validate_all(docs, "rendered")
    # and they survive the trip through YAML unchanged (what kubectl reads)
    assert list(yaml.safe_load_all(k8s.to_yaml(docs))) == docs


STATIC = sorted([*(p for p in ROOT.glob("k8s/**/*.yaml") if "patches" not in p.parts),  # patches: test_k8s_docs
                 ROOT / "mlflow_project" / "kubernetes_job_template.yaml"])


@pytest.mark.parametrize("path", STATIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_static_manifests_pass_strict_schema_validation(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    validate_all(docs, str(path.relative_to(ROOT)))


def test_static_manifests_are_all_there():
    names = {str(p.relative_to(ROOT)) for p in STATIC}
    assert {"k8s/job-template.yaml", "k8s/data-pvc.yaml", "k8s/mlflow/mlflow-server.yaml", "k8s/mlflow/postgres.yaml",
            "k8s/mlflow/secret.example.yaml", "k8s/mlflow/network-policy.yaml", "k8s/mlflow/ingress.yaml",
            "k8s/mlflow/postgres-backup.yaml", "k8s/mlflow/postgres-restore.yaml",
            "mlflow_project/kubernetes_job_template.yaml"} <= names


def test_schema_check_catches_what_it_should():
    # the validator really runs: an unknown field and a wrong type are rejected
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"parallelism": "two", "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.33.0", strict=True)
    job["spec"]["parallelism"] = 2
    job["spec"]["foo"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.33.0", strict=True)


# --- what the schema does not check -----------------------------------------------------------------------------

def test_indexed_job_has_one_completion_per_run_and_per_index_failure_handling(tmp_path):
    s, (cm, job) = rendered(tmp_path, parallelism=3, backoff_limit_per_index=2)
    assert len(s.runs) == 4
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 4
    assert spec["parallelism"] == 3
    assert spec["backoffLimitPerIndex"] == 2
    assert "backoffLimit" not in spec and "maxFailedIndexes" not in spec
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailIndex"]
    assert len(fail) == 1
    assert fail[0]["onExitCodes"] == {"containerName": container(job)["name"], "operator": "In", "values": [2]}
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert ignore == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    assert not [r for r in rules if r["action"] == "FailJob"]
    # exit 3 (the tracking server unreachable) is an ordinary retry: the first rule that matches it counts it
    first_for_3 = next(r for r in rules if "onExitCodes" in r and 3 in r["onExitCodes"]["values"])
    assert first_for_3["action"] == "Count" and first_for_3["onExitCodes"]["operator"] == "In"
    assert all(2 not in r["onExitCodes"]["values"] for r in rules if r["action"] != "FailIndex" and "onExitCodes" in r)


def test_parallelism_is_capped_at_the_number_of_runs_and_max_failed_indexes_passes_through(tmp_path):
    _, (_, job) = rendered(tmp_path, parallelism=50, max_failed_indexes=2)
    assert job["spec"]["parallelism"] == 4
    assert job["spec"]["maxFailedIndexes"] == 2


def test_gpu_limit_present_if_and_only_if_gpus_are_asked_for(tmp_path):
    _, (_, cpu_job) = rendered(tmp_path, gpus=0)
    res = container(cpu_job)["resources"]
    assert "nvidia.com/gpu" not in res["limits"] and "nvidia.com/gpu" not in res["requests"]
    assert "tolerations" not in cpu_job["spec"]["template"]["spec"]
    _, (_, gpu_job) = rendered(tmp_path, gpus=2)
    res = container(gpu_job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2
    # an extended resource's request must equal its limit; given explicitly because Kueue and quotas count requests
    assert res["requests"]["nvidia.com/gpu"] == 2
    assert res["requests"]["memory"] == res["limits"]["memory"]
    tolerations = gpu_job["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_configmap_holds_the_files_and_entry_i_of_expanded_json_is_run_i(tmp_path):
    s, (cm, job) = rendered(tmp_path)
    data = cm["data"]
    assert json.loads(data["hyperparams.json"]) == json.loads((tmp_path / "hp.json").read_text())
    assert json.loads(data["hyperranges.json"]) == json.loads((tmp_path / "hr.json").read_text())
    listed = json.loads(data["expanded.json"])
    assert listed["search_id"] == s.search_id and listed["exp_name"] == "k8s_test"
    assert [r["index"] for r in listed["runs"]] == list(range(len(s.runs)))
    assert [r["config_id"] for r in listed["runs"]] == [r.config_id for r in s.runs]
    # each entry with the shared config is the full run: base_config + searched values + seed
    for entry, run in zip(listed["runs"], s.runs, strict=True):
        full = {**listed["base_config"], **entry["searched"], "seed": entry["seed"]}
        assert full == json.loads(json.dumps(run.config)) and entry["name"] == run.name
    # what a pod does: expand the mounted files again; index i must be the same run
    pod = tmp_path / "pod"
    pod.mkdir()
    for key in ("hyperparams.json", "hyperranges.json"):
        (pod / key).write_text(data[key])
    again = expand(pod / "hyperparams.json", pod / "hyperranges.json")
    assert again.search_id == s.search_id
    assert [r.config_id for r in again.runs] == [r["config_id"] for r in listed["runs"]]
    # the volume mounts the ConfigMap the Job names, and the command reads both files from it
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert container(job)["command"] == ["retina-trainer", "run-index", "/config/hyperparams.json",
                                         "/config/hyperranges.json"]


def test_without_ranges_the_command_has_one_file_and_the_job_one_run(tmp_path):
    _, (cm, job) = rendered(tmp_path, ranges=None)
    assert container(job)["command"] == ["retina-trainer", "run-index", "/config/hyperparams.json"]
    assert set(cm["data"]) == {"hyperparams.json", "expanded.json"}
    assert job["spec"]["completions"] == 1 and job["spec"]["parallelism"] == 1


def test_a_save_root_outside_the_pods_work_dir_moves_into_it_without_changing_the_runs(tmp_path):
    s, (cm, _) = rendered(tmp_path, hp_extra={"save_root": "/home/someone/runs"})
    assert json.loads(cm["data"]["hyperparams.json"])["save_root"] == "/work/runs"
    pod = tmp_path / "pod"
    pod.mkdir()
    for key in ("hyperparams.json", "hyperranges.json"):
        (pod / key).write_text(cm["data"][key])
    assert [r.config_id for r in expand(pod / "hyperparams.json", pod / "hyperranges.json").runs] == \
        [r.config_id for r in s.runs]


def test_pod_environment_mounts_and_security(tmp_path):
    _, (_, job) = rendered(tmp_path, data_pvc="recordings")
    env = env_of(job)
    assert env["MLFLOW_TRACKING_URI"] == IN_CLUSTER_URI
    assert env["RETINA_PARENT_RUN_ID"] == "parent123"
    assert env["RETINA_DATA_ROOT"] == "/data"
    # a dead tracking server fails a call within seconds, not the client's default of about 4 minutes
    assert int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3
    assert int(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) <= 2
    assert int(env["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30
    assert "JOB_COMPLETION_INDEX" not in env  # set by Kubernetes for Indexed Jobs
    c = container(job)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert mounts["/data"]["readOnly"] is True
    assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"] == {"claimName": "recordings", "readOnly": True}
    assert mounts["/config"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/work"]["name"]] and "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert c["workingDir"] == "/work"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["automountServiceAccountToken"] is False


def test_labels_tie_every_object_and_pod_to_the_search(tmp_path):
    s, (cm, job) = rendered(tmp_path, namespace="retina")
    for obj in (cm, job, job["spec"]["template"]):
        lab = obj["metadata"]["labels"]
        assert lab["app.kubernetes.io/name"] == "retina-trainer"
        assert lab["app.kubernetes.io/instance"] == job["metadata"]["name"]
        assert lab["app.kubernetes.io/component"]
        assert lab["retina-trainer/search-id"] == s.search_id
        assert all(len(v) <= 63 and LABEL_VALUE.match(v) for v in lab.values()), lab
    assert cm["metadata"]["namespace"] == job["metadata"]["namespace"] == "retina"
    assert job["metadata"]["annotations"]["retina-trainer/parent-run-id"] == "parent123"


@pytest.mark.parametrize("exp_name", ["k8s_test", "My Experiment.v2 (2024)", "x" * 120, "___", "-a-", "Ünïcødé"])
def test_names_are_dns_labels_that_keep_the_search_id(tmp_path, exp_name):
    s, (cm, job) = rendered(tmp_path, hp_extra={"exp_name": exp_name})
    name = job["metadata"]["name"]
    assert k8s.is_dns_label(name) and len(name) <= k8s.MAX_NAME
    assert name.endswith("-" + s.search_id)
    assert k8s.is_dns_label(cm["metadata"]["name"])
    # pod hostnames of an Indexed Job are <job name>-<index>: still a DNS label at the largest index
    assert k8s.is_dns_label(f"{name}-{len(s.runs) - 1}")


def test_dns_label_helper():
    assert k8s.dns_label("My_Exp.V2") == "my-exp-v2"
    assert k8s.dns_label("--") == "retina-trainer"
    assert k8s.is_dns_label("a-b1") and not k8s.is_dns_label("-a") and not k8s.is_dns_label("A")
    assert not k8s.is_dns_label("a" * 64)


def test_with_pack_each_index_is_a_pack_and_the_pod_command_says_so(tmp_path):
    # lr x chans: the two lr values of one chans may share a pack, the two chans may not
    s, (cm, job) = rendered(tmp_path, pack=4, parallelism=8, max_failed_indexes=1)
    assert len(s.runs) == 4
    assert job["spec"]["completions"] == 2 and job["spec"]["parallelism"] == 2
    assert container(job)["command"][-2:] == ["--pack", "4"]
    assert job["metadata"]["annotations"]["retina-trainer/pack"] == "4"
    assert job["metadata"]["annotations"]["retina-trainer/runs"] == "4"
    assert len(json.loads(cm["data"]["expanded.json"])["runs"]) == 4  # the pods still see every run
    validate_all([cm, job], "packed")
    _, (_, plain) = rendered(tmp_path)
    assert "--pack" not in container(plain)["command"] and "--no-plots" not in container(plain)["command"]
    _, (_, quiet) = rendered(tmp_path, pack=2, plots=False)
    assert container(quiet)["command"][-3:] == ["--pack", "2", "--no-plots"]
    with pytest.raises(UserError, match="max failed indexes"):
        rendered(tmp_path, pack=4, max_failed_indexes=3)
    with pytest.raises(UserError, match="--pack"):
        rendered(tmp_path, pack=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"parallelism": 0}, "parallelism"),
    ({"gpus": -1}, "gpus"),
    ({"namespace": "Bad_NS"}, "namespace"),
    ({"data_pvc": "has space"}, "data PVC"),
    ({"name": "UPPER"}, "name"),
    ({"max_failed_indexes": 99}, "max failed indexes"),
    ({"parent_run_id": " "}, "parent run id"),
])
def test_render_rejects_bad_settings_with_a_user_error(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        rendered(tmp_path, **kwargs)


def test_a_thousand_run_search_fits_and_one_far_larger_is_a_user_error(tmp_path):
    s, (cm, job) = rendered(tmp_path, ranges={"seed": list(range(500)), "lr": [0.01, 0.001]})
    assert job["spec"]["completions"] == 1000 and len(json.loads(cm["data"]["expanded.json"])["runs"]) == 1000
    with pytest.raises(UserError, match="ConfigMap"):
        rendered(tmp_path, ranges={"seed": list(range(5000)), "lr": [0.01, 0.001]})


def _normalised(docs: list[dict]) -> list[dict]:
    """Manifests with what depends on the hyperparameter schema (search id, full configs) reduced to placeholders."""
    out = []
    for doc in docs:
        doc = json.loads(json.dumps(doc))
        if doc["kind"] == "ConfigMap":
            listed = json.loads(doc["data"]["expanded.json"])
            doc["data"]["expanded.json"] = [(r["index"], r["name"]) for r in listed["runs"]]
        search_id = doc["metadata"]["labels"]["retina-trainer/search-id"]
        out.append(json.loads(json.dumps(doc).replace(search_id, "SEARCH_ID")))
    return out


def test_documented_job_template_is_what_render_prints():
    """k8s/job-template.yaml is render's output for the example search (its comment header says so).

    The search id and the expanded configurations follow the hyperparameter schema, so they are compared as
    placeholders: the test fails when the manifests' shape changes, not when a hyperparameter is added.
    """
    text = (ROOT / "k8s" / "job-template.yaml").read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    result = CliRunner().invoke(main, [
        "k8s", "render", str(ROOT / "examples" / "hyperparams.json"), str(ROOT / "examples" / "hyperranges.json"),
        "--image", IMAGE, "--tracking-uri", IN_CLUSTER_URI, "--parent-run-id", "<parent run id: created by render>",
        "--gpus", "1", "--namespace", "retina", "--parallelism", "2"])
    assert result.exit_code == 0, result.output
    assert _normalised(list(yaml.safe_load_all(body))) == _normalised(list(yaml.safe_load_all(result.stdout))), \
        "k8s/job-template.yaml is out of date: regenerate it with the command in its header"


# --- the command ------------------------------------------------------------------------------------------------

def test_k8s_render_command_with_a_given_parent_run_needs_no_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hp, hr = write_search(tmp_path, ranges={"lr": [0.01, 0.003, 0.001]})
    result = CliRunner().invoke(main, ["k8s", "render", str(hp), str(hr), "--image", IMAGE, "--tracking-uri",
                                       IN_CLUSTER_URI, "--parent-run-id", "abc123", "--gpus", "1",
                                       "--parallelism", "2", "--data-pvc", "recordings", "--namespace", "retina"])
    assert result.exit_code == 0, result.output
    cm, job = list(yaml.safe_load_all(result.stdout))
    assert cm["kind"] == "ConfigMap" and job["kind"] == "Job"
    assert job["spec"]["completions"] == 3 and job["spec"]["parallelism"] == 2
    assert env_of(job)["RETINA_PARENT_RUN_ID"] == "abc123"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "kubectl -n retina get pods -l retina-trainer/search-id=" in result.stderr
    assert "MLFLOW_TRACKING_URI" not in os.environ
    validate_all([cm, job], "k8s render output")


def test_k8s_render_imports_neither_torch_nor_mlflow_with_a_given_parent(tmp_path):
    hp, hr = write_search(tmp_path, ranges={"lr": [0.01, 0.003]})
    patch = tmp_path / "patch.yaml"
    patch.write_text(yaml.safe_dump(SHM_PATCH))
    code = ("import sys\nfrom click.testing import CliRunner\nfrom trainer.cli import main\n"
            f"r = CliRunner().invoke(main, ['k8s', 'render', {str(hp)!r}, {str(hr)!r}, '--image', 'i:1', "
            "'--tracking-uri', 'http://m:5000', '--parent-run-id', 'p', '--queue', 'q', '--gpus', '1', "
            f"'--toleration', 'a=b:NoSchedule', '--tracking-secret', 's', '--patch', {str(patch)!r}])\n"
            "assert r.exit_code == 0, r.output\n"
            "print('HEAVY', 'torch' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY False False" in out.stdout


def test_k8s_render_reports_bad_input_as_a_user_error(tmp_path):
    hp, _ = write_search(tmp_path, hp_extra={"chanz": [4, 4]})
    result = CliRunner().invoke(main, ["k8s", "render", str(hp), "--image", IMAGE, "--tracking-uri", IN_CLUSTER_URI,
                                       "--parent-run-id", "p"])
    assert result.exit_code == 2
    assert "chanz" in result.output


def test_k8s_render_with_an_unreachable_server_is_a_user_error_and_creates_nothing(tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    hp, hr = write_search(tmp_path, ranges={"lr": [0.01, 0.003]})
    result = CliRunner().invoke(main, ["k8s", "render", str(hp), str(hr), "--image", IMAGE, "--tracking-uri",
                                       f"http://127.0.0.1:{port}"])
    assert result.exit_code == 3, result.output  # the server may come back: not a user error of the files
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "kind: Job" not in result.output
    # the URI it tried, where that came from, and the two ways out
    assert f"the MLflow tracking server http://127.0.0.1:{port} (from --tracking-uri) cannot be reached" in line
    assert "--local-tracking-uri" in line and "--parent-run-id" in line
    assert "MLFLOW_TRACKING_URI" not in line  # it did not come from there
    # with --local-tracking-uri, that is the one named
    local = CliRunner().invoke(main, ["k8s", "render", str(hp), str(hr), "--image", IMAGE, "--tracking-uri",
                                      IN_CLUSTER_URI, "--local-tracking-uri", f"http://127.0.0.1:{port}",
                                      "--namespace", "retina"])
    assert local.exit_code == 3, local.output
    assert f"http://127.0.0.1:{port} (from --local-tracking-uri) cannot be reached" in local.output
    assert "kubectl -n retina port-forward svc/mlflow 5000:5000" in local.output
    assert len(local.output.strip().splitlines()) == 1


@pytest.mark.e2e
def test_k8s_render_creates_the_parent_run_on_a_real_server_and_reuses_it(tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hp, hr = write_search(tmp_path, hp_extra={"exp_name": "k8s_render_e2e"}, ranges={"lr": [0.01, 0.003]})
    s = expand(hp, hr)
    base = ["k8s", "render", str(hp), str(hr), "--image", IMAGE]
    first = CliRunner().invoke(main, [*base, "--tracking-uri", mlflow_server])
    assert first.exit_code == 0, first.output
    _, job = list(yaml.safe_load_all(first.stdout))
    parent_id = env_of(job)["RETINA_PARENT_RUN_ID"]
    assert env_of(job)["MLFLOW_TRACKING_URI"] == mlflow_server
    assert "MLFLOW_TRACKING_URI" not in os.environ  # restored after render

    client = MlflowClient(mlflow_server)
    parent = client.get_run(parent_id)
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == "k8s_render_e2e"
    assert parent.data.tags["role"] == "search"
    assert parent.data.tags["search_id"] == s.search_id
    assert parent.data.tags["n_runs"] == "2"
    assert parent.data.tags["launcher"] == "kubernetes"
    assert parent.data.tags["k8s_job"] == job["metadata"]["name"]
    assert {"hyperparams.json", "hyperranges.json"} <= {f.path for f in client.list_artifacts(parent_id)}

    # rendering again (pods reach the server by its in-cluster name; this machine through a port-forward)
    again = CliRunner().invoke(main, [*base, "--tracking-uri", IN_CLUSTER_URI, "--local-tracking-uri", mlflow_server])
    assert again.exit_code == 0, again.output
    _, job2 = list(yaml.safe_load_all(again.stdout))
    assert env_of(job2)["RETINA_PARENT_RUN_ID"] == parent_id  # the same search keeps its parent run
    assert env_of(job2)["MLFLOW_TRACKING_URI"] == IN_CLUSTER_URI
    parents = client.search_runs([exp.experiment_id], "tags.role = 'search'")
    assert [p.info.run_id for p in parents] == [parent_id]


# --- shared clusters: queue, placement, lifetime, credentials (issue #13) ---------------------------------------

SITE_VARIANTS = {
    "kueue queue": k8s.Site(queue="lab-gpu", labels={"kueue.x-k8s.io/priority-class": "batch-low"}),
    "labels and annotations": k8s.Site(labels={"team": "retina", "example.org/cost-centre": "cc-42"},
                                       annotations={"example.org/contact": "alice@example.org, room 3"}),
    "MIG GPU on chosen nodes": k8s.Site(gpu_resource="nvidia.com/mig-3g.20gb",
                                       node_selector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
                                                      "nvidia.com/mig.config": "all-3g.20gb"},
                                       tolerations=[k8s.parse_toleration("dedicated=gpu-lab:NoSchedule"),
                                                    k8s.parse_toleration("nvidia.com/gpu:NoSchedule")]),
    "priority, pull secret, service account": k8s.Site(priority_class="research-low",
                                                       image_pull_secrets=["regcred", "lab-registry"],
                                                       service_account="retina-trainer"),
    "lifetime": k8s.Site(ttl_s=86400, active_deadline_s=7 * 86400),
    "tracking credentials": k8s.Site(tracking_secret="mlflow-alice"),
}


@pytest.mark.parametrize("variant", SITE_VARIANTS, ids=list(SITE_VARIANTS))
def test_every_site_variant_passes_strict_schema_validation(tmp_path, variant):
    _, docs = rendered(tmp_path, gpus=1, namespace="retina", site=SITE_VARIANTS[variant])
    validate_all(docs, variant)
    assert list(yaml.safe_load_all(k8s.to_yaml(docs))) == docs


def test_all_site_settings_together_pass_validation_and_the_resource_settings_reach_the_pod(tmp_path):
    site = k8s.Site(**{k: v for s in SITE_VARIANTS.values() for k, v in vars(s).items() if v not in (None, [], {})
                       and v != k8s.DEFAULT_GPU_RESOURCE})
    _, docs = rendered(tmp_path, gpus=2, namespace="retina", site=site, cpu="4", cpu_limit="6", memory="16Gi",
                       work_size="50Gi", termination_grace_s=300, pack=2, max_failed_indexes=1)
    validate_all(docs, "everything")
    job = docs[1]
    res = container(job)["resources"]
    assert res["requests"] == {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "50Gi",
                               "nvidia.com/mig-3g.20gb": 2}
    assert res["limits"] == {"memory": "16Gi", "cpu": "6", "nvidia.com/mig-3g.20gb": 2}
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    assert {"name": "work", "emptyDir": {"sizeLimit": "50Gi"}} in pod["volumes"]


def test_queue_labels_the_job_for_kueue_and_creates_it_suspended(tmp_path):
    _, (cm, job) = rendered(tmp_path, site=k8s.Site(queue="lab-gpu"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lab-gpu"
    assert job["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    _, (_, plain) = rendered(tmp_path)
    assert "suspend" not in plain["spec"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


def test_labels_and_annotations_reach_the_job_and_its_pods_and_ours_win(tmp_path):
    site = k8s.Site(labels={"team": "retina"}, annotations={"example.org/contact": "alice"})
    s, (cm, job) = rendered(tmp_path, site=site)
    for obj in (job, job["spec"]["template"]):
        assert obj["metadata"]["labels"]["team"] == "retina"
        assert obj["metadata"]["labels"]["retina-trainer/search-id"] == s.search_id
        assert obj["metadata"]["annotations"]["example.org/contact"] == "alice"
        assert obj["metadata"]["annotations"]["retina-trainer/parent-run-id"] == "parent123"


def test_placement_settings_reach_the_pod_spec(tmp_path):
    site = SITE_VARIANTS["MIG GPU on chosen nodes"]
    _, (_, job) = rendered(tmp_path, gpus=1, site=site)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
                                   "nvidia.com/mig.config": "all-3g.20gb"}
    assert pod["tolerations"] == [  # the GPU taint once, then the site's
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "gpu-lab", "effect": "NoSchedule"}]
    res = container(job)["resources"]
    assert res["limits"]["nvidia.com/mig-3g.20gb"] == 1 and "nvidia.com/gpu" not in res["limits"]
    _, (_, other) = rendered(tmp_path, site=SITE_VARIANTS["priority, pull secret, service account"])
    pod = other["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "research-low"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "lab-registry"}]
    assert pod["serviceAccountName"] == "retina-trainer"
    assert pod["automountServiceAccountToken"] is False  # the pods still get no API token
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_lifetime_settings_and_the_scratch_volume_request(tmp_path):
    _, (_, job) = rendered(tmp_path, site=k8s.Site(ttl_s=3600, active_deadline_s=86400), work_size="30Gi")
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    assert container(job)["resources"]["requests"]["ephemeral-storage"] == "30Gi"  # default: the scratch size
    _, (_, own) = rendered(tmp_path, ephemeral_storage="40Gi")
    assert container(own)["resources"]["requests"]["ephemeral-storage"] == "40Gi"
    _, (_, plain) = rendered(tmp_path)
    assert "ttlSecondsAfterFinished" not in plain["spec"] and "activeDeadlineSeconds" not in plain["spec"]


def test_pods_know_their_name_node_and_image_and_get_tracking_credentials_from_a_secret(tmp_path):
    _, (_, job) = rendered(tmp_path, site=k8s.Site(tracking_secret="mlflow-alice"))
    env = env_of(job)
    assert env["POD_NAME"] == "from:metadata.name"
    assert env["NODE_NAME"] == "from:spec.nodeName"
    assert env["RETINA_IMAGE"] == IMAGE
    assert env["MLFLOW_TRACKING_USERNAME"] == "from:secret/mlflow-alice/username"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "from:secret/mlflow-alice/password"
    text = k8s.to_yaml([job])
    assert "alice" not in text.replace("mlflow-alice", "")  # no credential is written into the manifest
    _, (_, plain) = rendered(tmp_path)
    assert "MLFLOW_TRACKING_USERNAME" not in env_of(plain) and "MLFLOW_TRACKING_PASSWORD" not in env_of(plain)


@pytest.mark.parametrize("text, expected", [
    ("nvidia.com/gpu:NoSchedule", {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}),
    ("dedicated=gpu-lab:NoExecute", {"key": "dedicated", "operator": "Equal", "value": "gpu-lab",
                                     "effect": "NoExecute"}),
    ("example.org/slow=:PreferNoSchedule", {"key": "example.org/slow", "operator": "Equal", "value": "",
                                            "effect": "PreferNoSchedule"}),
])
def test_toleration_syntax(text, expected):
    assert k8s.parse_toleration(text) == expected


@pytest.mark.parametrize("text", ["nvidia.com/gpu", "gpu:Sometimes", ":NoSchedule", "a b:NoSchedule",
                                  "k=v w:NoSchedule"])
def test_bad_tolerations_are_one_line_user_errors(text):
    with pytest.raises(UserError, match=r"--toleration .* is not key\[=value\]:effect"):
        k8s.parse_toleration(text)


@pytest.mark.parametrize("site, kwargs, message", [
    (k8s.Site(queue="Lab GPU"), {}, "--queue 'Lab GPU'"),
    (k8s.Site(labels={"bad key!": "x"}), {}, "--label bad key!=x"),
    (k8s.Site(labels={"team": "has space"}), {}, "not a valid label value"),
    (k8s.Site(labels={"retina-trainer/search-id": "x"}), {}, "render sets this label itself"),
    (k8s.Site(labels={"kueue.x-k8s.io/queue-name": "q"}), {}, "use --queue"),
    (k8s.Site(node_selector={"zone": "a b"}), {}, "--node-selector"),
    (k8s.Site(gpu_resource="gpu"), {"gpus": 1}, "--gpu-resource 'gpu'"),
    (k8s.Site(gpu_resource="kubernetes.io/gpu"), {"gpus": 1}, "--gpu-resource"),
    (k8s.Site(priority_class="Low_Priority"), {}, "--priority-class"),
    (k8s.Site(image_pull_secrets=["Reg Cred"]), {}, "--image-pull-secret"),
    (k8s.Site(tracking_secret="MLflow"), {}, "--tracking-secret"),
    (k8s.Site(active_deadline_s=0), {}, "--active-deadline"),
    (k8s.Site(), {"cpu": "two"}, "--cpu 'two' is not a Kubernetes quantity"),
    (k8s.Site(), {"work_size": "20 GB"}, "--scratch-size"),
    (k8s.Site(), {"ephemeral_storage": "lots"}, "--ephemeral-storage"),
    (k8s.Site(), {"termination_grace_s": -1}, "--grace-period"),
])
def test_bad_site_settings_are_one_line_user_errors(tmp_path, site, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        rendered(tmp_path, site=site, **kwargs)
    assert "\n" not in str(err.value)


# --- --patch ----------------------------------------------------------------------------------------------------

SHM_PATCH = {"spec": {"template": {"spec": {
    "containers": [{"name": "trainer", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                    "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}],
    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40000"]}]}]}}}}}}}


def test_a_strategic_merge_patch_adds_to_lists_by_their_merge_keys(tmp_path):
    _, (_, plain) = rendered(tmp_path)
    _, (cm, job) = rendered(tmp_path, patches=[("--patch shm.yaml", "strategic", SHM_PATCH)])
    validate_all([cm, job], "patched")
    c = container(job)
    assert [m["mountPath"] for m in c["volumeMounts"]] == [m["mountPath"] for m in container(plain)["volumeMounts"]] \
        + ["/dev/shm"]  # merged by mountPath, nothing lost
    assert env_of(job) == {**env_of(plain), "NCCL_DEBUG": "WARN"}
    assert c["command"] == container(plain)["command"] and c["resources"] == container(plain)["resources"]
    pod = job["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["config", "data", "work", "tmp", "dshm"]
    assert "nodeAffinity" in pod["affinity"]
    # an item with a merge key already there is merged into it; $patch: delete removes one; null removes a key
    more = {"spec": {"template": {"spec": {
        "containers": [{"name": "trainer", "env": [{"name": "MLFLOW_HTTP_REQUEST_TIMEOUT", "value": "60"}]}],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],
        "enableServiceLinks": None}}}}
    _, (_, job2) = rendered(tmp_path, patches=[("a", "strategic", SHM_PATCH), ("b", "strategic", more)])
    assert env_of(job2)["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    vols = {v["name"]: v for v in job2["spec"]["template"]["spec"]["volumes"]}
    assert vols["tmp"]["emptyDir"] == {"sizeLimit": "4Gi"} and "dshm" in vols
    assert "enableServiceLinks" not in job2["spec"]["template"]["spec"]
    drop = {"spec": {"template": {"spec": {"volumes": [{"name": "dshm", "$patch": "delete"}],
                                           "containers": [{"name": "trainer", "volumeMounts": [
                                               {"mountPath": "/dev/shm", "$patch": "delete"}]}]}}}}
    _, (_, job3) = rendered(tmp_path, patches=[("a", "strategic", SHM_PATCH), ("c", "strategic", drop)])
    assert job3["spec"]["template"]["spec"]["volumes"] == plain["spec"]["template"]["spec"]["volumes"]
    # lists without a merge key are replaced whole, as Kubernetes does (tolerations)
    tol = {"spec": {"template": {"spec": {"tolerations": [{"key": "x", "operator": "Exists"}]}}}}
    _, (_, job4) = rendered(tmp_path, gpus=1, patches=[("t", "strategic", tol)])
    assert job4["spec"]["template"]["spec"]["tolerations"] == [{"key": "x", "operator": "Exists"}]


def test_a_json_merge_patch_replaces_lists_and_merges_maps(tmp_path):
    patch = {"spec": {"backoffLimitPerIndex": 5, "template": {"metadata": {"labels": {"team": "retina"}},
                                                               "spec": {"hostNetwork": False}}}}
    _, (cm, job) = rendered(tmp_path, patches=[("--patch m.json", "merge", patch)])
    validate_all([cm, job], "merge-patched")
    assert job["spec"]["backoffLimitPerIndex"] == 5
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "retina"
    assert job["spec"]["template"]["metadata"]["labels"]["retina-trainer/search-id"]  # merged, not replaced
    # a merge patch replaces a list whole: patching containers this way drops what render put there
    with pytest.raises(UserError, match="--patch m.json changes the command of container 'trainer'"):
        rendered(tmp_path, patches=[("--patch m.json", "merge", {"spec": {"template": {"spec": {
            "containers": [{"name": "trainer", "image": IMAGE}]}}}})])


@pytest.mark.parametrize("patch, message", [
    ({"spec": {"completions": 1}}, "changes spec.completions"),
    ({"spec": {"completionMode": "NonIndexed"}}, "changes spec.completionMode"),
    ({"metadata": {"name": "other"}}, "changes metadata.name"),
    ({"spec": {"template": {"spec": {"restartPolicy": "OnFailure"}}}}, "restartPolicy"),
    ({"spec": {"template": {"spec": {"containers": [{"name": "trainer", "$patch": "delete"}]}}}},
     "removes the container 'trainer'"),
    ({"spec": {"template": {"spec": {"containers": [{"name": "trainer", "image": "other:1"}]}}}},
     "changes the image of container 'trainer'"),
    ({"spec": {"template": {"spec": {"containers": [{"name": "trainer", "env": [
        {"name": "RETINA_PARENT_RUN_ID", "$patch": "delete"}]}]}}}}, "RETINA_PARENT_RUN_ID"),
    ({"spec": {"template": {"spec": {"volumes": [{"name": "config", "configMap": {"name": "x"}}]}}}},
     "'config' volume"),
    ({"spec": {"template": {"metadata": {"labels": {"retina-trainer/search-id": None}}}}}, "labels"),
    ({"spec": {"podFailurePolicy": {"rules": []}}}, "exit code 2"),
])
def test_a_patch_that_breaks_what_the_pods_rely_on_is_refused(tmp_path, patch, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        rendered(tmp_path, patches=[("--patch p.yaml", "strategic", patch)])
    assert str(err.value).startswith("--patch p.yaml ") and "\n" not in str(err.value)


def test_render_command_with_patch_files_validates_the_result(tmp_path):
    from trainer.launch import k8s_patch

    hp, hr = write_search(tmp_path, ranges={"lr": [0.01, 0.003]})
    base = ["k8s", "render", str(hp), str(hr), "--image", IMAGE, "--tracking-uri", IN_CLUSTER_URI,
            "--parent-run-id", "p1"]
    good = tmp_path / "shm.yaml"
    good.write_text(yaml.safe_dump({"apiVersion": "batch/v1", "kind": "Job", **SHM_PATCH}))
    ok = CliRunner().invoke(main, [*base, "--patch", str(good)])
    assert ok.exit_code == 0, ok.output
    cm, job = list(yaml.safe_load_all(ok.stdout))
    assert "/dev/shm" in [m["mountPath"] for m in container(job)["volumeMounts"]]
    validate_all([cm, job], "CLI patched")
    # an unknown field: Kubernetes would refuse it; render says so in one line, and prints no YAML
    typo = tmp_path / "typo.yaml"
    typo.write_text("spec:\n  template:\n    spec:\n      nodeSelektor: {zone: a}\n")
    bad = CliRunner().invoke(main, [*base, "--patch", str(typo)])
    assert bad.exit_code == 2 and "kind: Job" not in bad.output
    assert f"--patch {typo} makes the Job invalid for Kubernetes" in bad.output and "nodeSelektor" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    # files that are not a patch
    for text, message in (("- a\n- b\n", "a patch is a mapping"), ("spec: [unclosed\n", "not valid YAML or JSON"),
                          ("kind: Deployment\n", "not kind 'Deployment'")):
        f = tmp_path / "p.yaml"
        f.write_text(text)
        res = CliRunner().invoke(main, [*base, "--patch", str(f)])
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, \
            res.output
    missing = CliRunner().invoke(main, [*base, "--patch", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot be read" in missing.output
    # a JSON merge patch from the command line
    mp = tmp_path / "merge.json"
    mp.write_text(json.dumps({"spec": {"backoffLimitPerIndex": 4}}))
    merged = CliRunner().invoke(main, [*base, "--patch", str(mp), "--patch-type", "merge"])
    assert merged.exit_code == 0, merged.output
    assert list(yaml.safe_load_all(merged.stdout))[1]["spec"]["backoffLimitPerIndex"] == 4
    assert k8s_patch.PATCH_TYPES == ("strategic", "merge")


def test_render_command_takes_every_site_option(tmp_path):
    hp, hr = write_search(tmp_path, ranges={"lr": [0.01, 0.003]})
    res = CliRunner().invoke(main, [
        "k8s", "render", str(hp), str(hr), "--image", IMAGE, "--tracking-uri", IN_CLUSTER_URI,
        "--parent-run-id", "p1", "--namespace", "retina", "--gpus", "1", "--gpu-resource", "nvidia.com/mig-1g.10gb",
        "--queue", "lab-gpu", "--label", "team=retina", "--label", "kueue.x-k8s.io/priority-class=low",
        "--annotation", "example.org/contact=alice", "--node-selector", "nvidia.com/mig.config=all-1g.10gb",
        "--toleration", "dedicated=gpu-lab:NoSchedule", "--priority-class", "research-low",
        "--image-pull-secret", "regcred", "--service-account", "trainer", "--ttl", "3600",
        "--active-deadline", "86400", "--cpu", "1", "--cpu-limit", "2", "--memory", "4Gi",
        "--scratch-size", "10Gi", "--ephemeral-storage", "12Gi", "--grace-period", "60",
        "--tracking-secret", "mlflow-alice"])
    assert res.exit_code == 0, res.output
    cm, job = list(yaml.safe_load_all(res.stdout))
    validate_all([cm, job], "every option")
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lab-gpu" and job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "low"
    assert pod["nodeSelector"] == {"nvidia.com/mig.config": "all-1g.10gb"}
    assert pod["priorityClassName"] == "research-low" and pod["serviceAccountName"] == "trainer"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["terminationGracePeriodSeconds"] == 60
    assert {"key": "dedicated", "operator": "Equal", "value": "gpu-lab", "effect": "NoSchedule"} in pod["tolerations"]
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "12Gi",
                                           "nvidia.com/mig-1g.10gb": 1},
                              "limits": {"memory": "4Gi", "cpu": "2", "nvidia.com/mig-1g.10gb": 1}}
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600 and job["spec"]["activeDeadlineSeconds"] == 86400
    assert env_of(job)["MLFLOW_TRACKING_USERNAME"] == "from:secret/mlflow-alice/username"
    assert "Kueue queue 'lab-gpu'" in res.stderr
    for args, message in ((["--label", "team"], "--label 'team' is not KEY=VALUE"),
                          (["--label", "a=1", "--label", "a=2"], "--label a is given twice"),
                          (["--toleration", "gpu"], "--toleration 'gpu'")):
        bad = CliRunner().invoke(main, ["k8s", "render", str(hp), str(hr), "--image", IMAGE, "--tracking-uri",
                                        IN_CLUSTER_URI, "--parent-run-id", "p1", *args])
        assert bad.exit_code == 2 and message in bad.output and len(bad.output.strip().splitlines()) == 1, \
            bad.output


# --- the tracking server's manifests: who may connect, backups, pinned images -----------------------------------

def _docs(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_admit_the_training_pods_and_the_database_clients_only(tmp_path):
    policies = {d["metadata"]["name"]: d for d in _docs("k8s/mlflow/network-policy.yaml")}
    server = next(d for d in _docs("k8s/mlflow/mlflow-server.yaml") if d["kind"] == "Deployment")
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    pg = next(d for d in _docs("k8s/mlflow/postgres.yaml") if d["kind"] == "StatefulSet")
    pg_labels = pg["spec"]["template"]["metadata"]["labels"]
    _, (_, job) = rendered(tmp_path, site=k8s.Site(labels={"team": "retina"}))
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    backup = _docs("k8s/mlflow/postgres-backup.yaml")[1]["spec"]["jobTemplate"]["spec"]["template"]
    restore = _docs("k8s/mlflow/postgres-restore.yaml")[0]["spec"]["template"]

    mlflow = policies["mlflow"]["spec"]
    assert _matches(mlflow["podSelector"], server_labels) and mlflow["policyTypes"] == ["Ingress"]
    same_namespace = [f for rule in mlflow["ingress"] for f in rule["from"] if "namespaceSelector" not in f]
    assert len(same_namespace) == 1 and _matches(same_namespace[0]["podSelector"], pod_labels)
    assert not _matches(same_namespace[0]["podSelector"], {**pod_labels, "app.kubernetes.io/component": "search"})
    assert all(p["port"] == 5000 for rule in mlflow["ingress"] for p in rule["ports"])

    postgres = policies["postgres"]["spec"]
    assert _matches(postgres["podSelector"], pg_labels)
    sources = [f["podSelector"] for rule in postgres["ingress"] for f in rule["from"]]
    for labels_ in (server_labels, backup["metadata"]["labels"], restore["metadata"]["labels"]):
        assert any(_matches(s, labels_) for s in sources), labels_
    assert not any(_matches(s, pod_labels) for s in sources)  # training pods never talk to the database
    assert [p["port"] for rule in postgres["ingress"] for p in rule["ports"]] == [5432]


def test_backups_dump_to_a_volume_and_the_restore_reads_them():
    pvc, cron = _docs("k8s/mlflow/postgres-backup.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["command"][-1]
    assert "pg_dump --format=custom" in script and 'mv "$out.partial" "$out"' in script  # whole files only
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    claim = next(v for v in pod["volumes"] if v["name"] == mounts["/backups"])["persistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "POSTGRES_PASSWORD"}
    restore = _docs("k8s/mlflow/postgres-restore.yaml")[0]["spec"]["template"]["spec"]
    assert "pg_restore --clean --if-exists" in restore["containers"][0]["command"][-1]
    assert restore["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_images_of_the_manifests_are_pinned_and_say_how_to_pin_a_digest():
    images = {}
    for path in sorted(ROOT.glob("k8s/mlflow/*.yaml")):
        for doc in _docs(str(path.relative_to(ROOT))):
            text = json.dumps(doc)
            for image in re.findall(r'"image": "([^"]+)"', text):
                images.setdefault(image, []).append(path.name)
    assert images, "no images found"
    for image, files in images.items():
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"\d+(\.\d+)+", tag.split("@")[0]), f"{image} in {files}: not a pinned version"
    assert {i.split(":")[0] for i in images} == {"postgres", "registry.example.com/retina-mlflow-server"}
    assert len({i for i in images if i.startswith("postgres:")}) == 1  # backup and restore match the server
    for name in ("postgres.yaml", "mlflow-server.yaml", "postgres-backup.yaml", "postgres-restore.yaml"):
        assert "@sha256:<digest>" in (ROOT / "k8s" / "mlflow" / name).read_text(), name
