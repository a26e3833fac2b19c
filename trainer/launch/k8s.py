"""Kubernetes manifests for a search: a ConfigMap with the search's files and an Indexed Job, one pod per run.

Pure (no torch, no mlflow, no kubernetes client): `render` returns plain dicts that `retina-trainer k8s render`
prints as YAML for `kubectl apply -f -`. Pod i runs `retina-trainer run-index`, which reads
$JOB_COMPLETION_INDEX = i, expands the same files and trains run i of `retina-trainer expand` as an MLflow child
of the search's parent run. Exit code 2 (a configuration error) fails that index at once; a disruption such as
preemption does not count against the index's retries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from trainer import __version__
from trainer.errors import UserError
from trainer.search import Search, plan_packs

APP = "retina-trainer"
CONTAINER = "trainer"
CONFIG_DIR, DATA_DIR, WORK_DIR = "/config", "/data", "/work"
SEARCH_ID_LABEL = "retina-trainer/search-id"
USER_ERROR_EXIT_CODE = 2  # UserError.exit_code: retrying cannot help
MAX_NAME = 52  # room for the "-<index>" pod hostnames of an Indexed Job within a 63-character DNS label
CONFIGMAP_LIMIT = 1_000_000  # Kubernetes refuses ConfigMaps over 1 MiB (all keys together)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class HttpPolicy:
    """MLflow client retry/timeout settings for pods: a dead tracking server fails a call in seconds, not minutes."""

    max_retries: int = 3
    backoff_factor: int = 1
    timeout_s: int = 20

    def env(self) -> dict[str, str]:
        return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.max_retries),
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(self.backoff_factor),
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.timeout_s)}


def is_dns_label(name: str) -> bool:
    """Whether `name` is a valid RFC 1123 DNS label (what Kubernetes requires of Job and ConfigMap names here)."""
    return len(name) <= 63 and bool(_DNS_LABEL.match(name))


def dns_label(text: str, max_len: int = 63, fallback: str = APP) -> str:
    """`text` made into a DNS label: lower case, runs of other characters as one '-', trimmed to `max_len`."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return name or fallback[:max_len]


def job_name(exp_name: str, search_id: str) -> str:
    """The Job's name, `<exp_name>-<search_id>` as a DNS label; the search id is always kept whole."""
    suffix = dns_label(search_id)
    head = dns_label(exp_name, MAX_NAME - len(suffix) - 1, fallback="search")
    return f"{head}-{suffix}"


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def expanded_text(search: Search) -> str:
    """expanded.json: the search's header and shared config, then one run per line (index, name, config_id,
    seed, searched values), compact so that large searches fit a ConfigMap."""
    compact = search.to_compact_dict()
    head = {k: v for k, v in compact.items() if k != "runs"}
    lines = [json.dumps(r, separators=(",", ":")) for r in compact["runs"]]
    return json.dumps(head)[:-1] + ', "runs": [\n' + ",\n".join(lines) + "\n]}\n"


def labels(name: str, search_id: str, component: str) -> dict[str, str]:
    """The labels every object of a search carries (`kubectl get pods -l retina-trainer/search-id=<id>`)."""
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/version": __version__,
            "app.kubernetes.io/managed-by": APP, SEARCH_ID_LABEL: search_id}


def pod_command(has_ranges: bool, pack: int = 1, plots: bool = True) -> list[str]:
    """The container command: run the run (with pack > 1, the pack) numbered $JOB_COMPLETION_INDEX of the search
    in /config."""
    cmd = [APP, "run-index", f"{CONFIG_DIR}/hyperparams.json"]
    if has_ranges:
        cmd.append(f"{CONFIG_DIR}/hyperranges.json")
    if pack > 1:
        cmd += ["--pack", str(pack)]
    if not plots:
        cmd.append("--no-plots")
    return cmd


def _pod_files(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The files as the pods read them: a save_root outside the pod's writable /work is moved into it.

    save_root is not part of a run's identity (config_id), so this changes where checkpoints go, not which run
    is trained.
    """
    out = dict(files)
    hp = dict(files["hyperparams.json"])
    root = hp.get("save_root")
    if isinstance(root, str) and root.startswith(("/", "~")) and not (root + "/").startswith(WORK_DIR + "/"):
        hp["save_root"] = f"{WORK_DIR}/runs"
        out["hyperparams.json"] = hp
    return out


def config_map(search: Search, files: dict[str, dict[str, Any]], name: str, instance: str,
               namespace: str | None) -> dict[str, Any]:
    """The ConfigMap the pods mount at /config: hyperparams.json, hyperranges.json and expanded.json."""
    data = {key: _json_text(content) for key, content in _pod_files(files).items()}
    data["expanded.json"] = expanded_text(search)
    size = sum(len(k) + len(v.encode()) for k, v in data.items())
    if size > CONFIGMAP_LIMIT:
        raise UserError(f"the search's files and its {len(search.runs)} expanded runs take {size} bytes, more than "
                        f"a Kubernetes ConfigMap holds (1 MiB); split the search into smaller ones")
    meta: dict[str, Any] = {"name": name, "labels": labels(instance, search.search_id, "search-config")}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _resources(gpus: int, cpu: str, memory: str, cpu_limit: str | None) -> dict[str, Any]:
    limits: dict[str, Any] = {"memory": memory}
    if cpu_limit:
        limits["cpu"] = cpu_limit
    if gpus > 0:
        limits["nvidia.com/gpu"] = gpus  # GPUs go in limits only; the request defaults to the limit
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def _container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def indexed_job(search: Search, *, name: str, config_name: str, has_ranges: bool, image: str, tracking_uri: str,
                parent_run_id: str, parallelism: int, gpus: int, data_pvc: str, namespace: str | None,
                backoff_limit_per_index: int, max_failed_indexes: int | None, cpu: str, memory: str,
                cpu_limit: str | None, work_size: str, http: HttpPolicy,
                termination_grace_s: int, completions: int, pack: int = 1, plots: bool = True) -> dict[str, Any]:
    """The Indexed Job: `completions` = number of runs (with pack > 1, of packs), pod i trains run (pack) i,
    failures handled per index."""
    n = completions
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "RETINA_PARENT_RUN_ID": parent_run_id, "RETINA_DATA_ROOT": DATA_DIR,
           **http.env(), "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "HOME": WORK_DIR}
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": pod_command(has_ranges, pack, plots),
        "workingDir": WORK_DIR,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": _resources(gpus, cpu, memory, cpu_limit),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR, "readOnly": True},
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy and backoffLimitPerIndex
        "terminationGracePeriodSeconds": termination_grace_s,  # time to save and upload a checkpoint on SIGTERM
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name}},
            {"name": "data", "persistentVolumeClaim": {"claimName": data_pvc, "readOnly": True}},
            {"name": "work", "emptyDir": {"sizeLimit": work_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    if gpus > 0:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": n,
        "parallelism": max(1, min(parallelism, n)),
        "backoffLimitPerIndex": backoff_limit_per_index,
        "podFailurePolicy": {"rules": [
            # a user/config error (bad input, index out of range, diverged training): retrying cannot help
            {"action": "FailIndex",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [USER_ERROR_EXIT_CODE]}},
            # preemption, eviction, node drain: run the index again without counting it as a failure
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {
            "metadata": {"labels": labels(name, search.search_id, "search-run"),
                         "annotations": {"retina-trainer/parent-run-id": parent_run_id}},
            "spec": pod_spec,
        },
    }
    if max_failed_indexes is not None:
        spec["maxFailedIndexes"] = max_failed_indexes
    meta: dict[str, Any] = {
        "name": name,
        "labels": labels(name, search.search_id, "search"),
        "annotations": {"retina-trainer/exp-name": search.exp_name, "retina-trainer/parent-run-id": parent_run_id,
                        "retina-trainer/tracking-uri": tracking_uri,
                        "retina-trainer/runs": str(len(search.runs)), "retina-trainer/pack": str(pack)},
    }
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def render(search: Search, files: dict[str, dict[str, Any]], *, image: str, tracking_uri: str,
           parent_run_id: str, parallelism: int = 4, gpus: int = 0, data_pvc: str = "retina-data",
           namespace: str | None = None, name: str | None = None, backoff_limit_per_index: int = 2,
           max_failed_indexes: int | None = None, cpu: str = "2", memory: str = "8Gi", cpu_limit: str | None = None,
           work_size: str = "20Gi", http: HttpPolicy | None = None,
           termination_grace_s: int = 120, pack: int = 1, plots: bool = True) -> list[dict[str, Any]]:
    """The manifests of one search: [ConfigMap, Indexed Job], ready for `kubectl apply`. With `pack` > 1 each
    pod trains one pack of `plan_packs(search.runs, pack)` (runs that may share a forward pass) together.

    `files` holds the parsed input files under the names the pods read ("hyperparams.json" and, when the search
    has ranges, "hyperranges.json"). `parent_run_id` is the search's MLflow parent run, created beforehand.
    """
    if "hyperparams.json" not in files:
        raise UserError("render needs the hyperparams.json content")
    if not search.runs:
        raise UserError("the search has no runs")
    if pack < 1:
        raise UserError(f"--pack must be at least 1, got {pack}")
    completions = len(plan_packs(search.runs, pack))
    checks = [(parallelism >= 1, f"parallelism must be at least 1, got {parallelism}"),
              (gpus >= 0, f"gpus must be 0 or more, got {gpus}"),
              (backoff_limit_per_index >= 0, f"backoff limit per index must be 0 or more, got "
                                             f"{backoff_limit_per_index}"),
              (max_failed_indexes is None or 0 <= max_failed_indexes <= completions,
               f"max failed indexes must be between 0 and the number of indexes ({completions})"),
              (bool(image.strip()), "an image is required"),
              (bool(tracking_uri.strip()), "a tracking URI is required"),
              (bool(parent_run_id.strip()), "a parent run id is required")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for label, value in (("data PVC", data_pvc), ("namespace", namespace)):
        if value is not None and not is_dns_label(value):
            raise UserError(f"{label} '{value}' is not a valid Kubernetes name (lower case letters, digits and "
                            f"'-', at most 63 characters)")
    name = name or job_name(search.exp_name, search.search_id)
    if not is_dns_label(name) or len(name) > MAX_NAME:
        raise UserError(f"name '{name}' is not a valid Kubernetes name of at most {MAX_NAME} characters "
                        f"(lower case letters, digits and '-')")
    config_name = f"{name}-config"
    has_ranges = "hyperranges.json" in files
    return [
        config_map(search, files, config_name, name, namespace),
        indexed_job(search, name=name, config_name=config_name, has_ranges=has_ranges, image=image,
                    tracking_uri=tracking_uri, parent_run_id=parent_run_id, parallelism=parallelism, gpus=gpus,
                    data_pvc=data_pvc, namespace=namespace, backoff_limit_per_index=backoff_limit_per_index,
                    max_failed_indexes=max_failed_indexes, cpu=cpu, memory=memory, cpu_limit=cpu_limit,
                    work_size=work_size, http=http or HttpPolicy(), termination_grace_s=termination_grace_s,
                    completions=completions, pack=pack, plots=plots),
    ]


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML; multi-line strings (the JSON files) as literal blocks so they stay readable."""
    import yaml  # PyYAML, installed with MLflow; imported here so importing this module stays cheap

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)
