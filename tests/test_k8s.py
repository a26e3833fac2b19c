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
    return {e["name"]: e["value"] for e in container(job)["env"]}


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


STATIC = sorted([*ROOT.glob("k8s/**/*.yaml"), ROOT / "mlflow_project" / "kubernetes_job_template.yaml"])


@pytest.mark.parametrize("path", STATIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_static_manifests_pass_strict_schema_validation(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    validate_all(docs, str(path.relative_to(ROOT)))


def test_static_manifests_are_all_there():
    names = {str(p.relative_to(ROOT)) for p in STATIC}
    assert {"k8s/job-template.yaml", "k8s/data-pvc.yaml", "k8s/mlflow/mlflow-server.yaml", "k8s/mlflow/postgres.yaml",
            "k8s/mlflow/secret.example.yaml", "mlflow_project/kubernetes_job_template.yaml"} <= names


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
    assert "nvidia.com/gpu" not in res["requests"]  # GPUs are limits only; the request defaults to the limit
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
    code = ("import sys\nfrom click.testing import CliRunner\nfrom trainer.cli import main\n"
            f"r = CliRunner().invoke(main, ['k8s', 'render', {str(hp)!r}, {str(hr)!r}, '--image', 'i:1', "
            "'--tracking-uri', 'http://m:5000', '--parent-run-id', 'p'])\n"
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
    assert f"the MLflow tracking server http://127.0.0.1:{port} is unreachable" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "kind: Job" not in result.output


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
