"""Kubernetes manifests for a search: a ConfigMap with the search's files and an Indexed Job, one pod per run.

Pure (no torch, no mlflow, no kubernetes client): `render` returns plain dicts that `retina-trainer k8s render`
prints as YAML for `kubectl apply -f -`. Pod i runs `retina-trainer run-index`, which reads
$JOB_COMPLETION_INDEX = i, expands the same files and trains run i of `retina-trainer expand` as an MLflow child
of the search's parent run. Exit code 2 (a configuration error) fails that index at once; exit code 3 (the tracking
server unreachable) is retried like any failure; a disruption such as preemption does not count against the
index's retries.

`Site` holds what a shared cluster asks of a Job: a Kueue queue (the Job is created suspended and Kueue admits
it), labels and annotations, placement (node selector, tolerations, priority class, a MIG or other GPU resource),
image pull secrets, a service account, its lifetime (ttlSecondsAfterFinished, activeDeadlineSeconds) and the
tracking server's credentials (a Secret). Anything else is a `--patch` (trainer/launch/k8s_patch.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from trainer import __version__
from trainer.errors import UserError
from trainer.search import Search, plan_packs

APP = "retina-trainer"
CONTAINER = "trainer"
CONFIG_DIR, DATA_DIR, WORK_DIR = "/config", "/data", "/work"
SEARCH_ID_LABEL = "retina-trainer/search-id"
USER_ERROR_EXIT_CODE = 2  # UserError.exit_code: retrying cannot help
TRACKING_UNAVAILABLE_EXIT_CODE = 3  # TrackingUnavailable.exit_code: the server may come back, a retry can help
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
MAX_NAME = 52  # room for the "-<index>" pod hostnames of an Indexed Job within a 63-character DNS label
CONFIGMAP_LIMIT = 1_000_000  # Kubernetes refuses ConfigMaps over 1 MiB (all keys together)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


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


def is_dns_subdomain(name: str) -> bool:
    """Whether `name` is a valid RFC 1123 subdomain (names of Secrets, PriorityClasses, ServiceAccounts, ...)."""
    return len(name) <= 253 and bool(_DNS_SUBDOMAIN.match(name))


def is_qualified_name(key: str) -> bool:
    """Whether `key` is a valid label or annotation key: an optional DNS-subdomain prefix and '/', then a name of
    at most 63 characters (letters, digits, '-', '_', '.')."""
    prefix, _, name = key.rpartition("/")
    return (not prefix or is_dns_subdomain(prefix)) and len(name) <= 63 and bool(_NAME_PART.match(name))


def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_NAME_PART.match(value)))


def is_quantity(value: str) -> bool:
    """Whether `value` is a Kubernetes resource quantity such as 2, 500m, 8Gi or 1.5."""
    return bool(_QUANTITY.match(value))


def parse_toleration(text: str) -> dict[str, str]:
    """`key[=value]:effect` (e.g. `nvidia.com/gpu:NoSchedule`, `dedicated=gpu-lab:NoSchedule`) as a toleration:
    with a value the operator is Equal, without one Exists."""
    head, sep, effect = text.rpartition(":")
    key, eq, value = head.partition("=")
    if not sep or not key or not is_qualified_name(key) or effect not in TOLERATION_EFFECTS \
            or (eq and not is_label_value(value)):
        raise UserError(f"--toleration '{text}' is not key[=value]:effect with effect one of "
                        f"{', '.join(TOLERATION_EFFECTS)} (e.g. nvidia.com/gpu:NoSchedule or "
                        "dedicated=gpu-lab:NoSchedule)")
    if eq:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


@dataclass
class Site:
    """What a shared cluster asks of the Job beyond the search: queue, labels, placement, lifetime, credentials.

    Empty by default (a plain Job as before). `check()` gives one UserError line for anything Kubernetes would
    refuse."""

    queue: str | None = None  # Kueue LocalQueue: label kueue.x-k8s.io/queue-name, and the Job starts suspended
    labels: dict[str, str] = field(default_factory=dict)  # on the Job and its pods
    annotations: dict[str, str] = field(default_factory=dict)  # on the Job and its pods
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    priority_class: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    service_account: str | None = None
    gpu_resource: str = DEFAULT_GPU_RESOURCE  # or a MIG profile such as nvidia.com/mig-3g.20gb
    ttl_s: int | None = None  # ttlSecondsAfterFinished: the finished Job (and its pods) deleted after this
    active_deadline_s: int | None = None  # activeDeadlineSeconds: the whole Job stopped after this
    tracking_secret: str | None = None  # Secret with keys username and password for the tracking server

    def check(self, own_labels: set[str]) -> None:
        if self.queue is not None and not (is_dns_subdomain(self.queue) and is_label_value(self.queue)):
            raise UserError(f"--queue '{self.queue}' is not a valid LocalQueue name (lower case letters, digits, "
                            "'-' and '.', at most 63 characters)")
        for what, pairs in (("--label", self.labels), ("--annotation", self.annotations),
                            ("--node-selector", self.node_selector)):
            for key, value in pairs.items():
                if not is_qualified_name(key):
                    raise UserError(f"{what} {key}={value}: '{key}' is not a valid key ([prefix/]name; name at "
                                    "most 63 letters, digits, '-', '_' or '.')")
                if what != "--annotation" and not is_label_value(value):
                    raise UserError(f"{what} {key}={value}: '{value}' is not a valid label value (at most 63 "
                                    "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
        taken = (own_labels | {KUEUE_QUEUE_LABEL}) & set(self.labels)
        if taken:
            key = sorted(taken)[0]
            hint = " (use --queue)" if key == KUEUE_QUEUE_LABEL else ""
            raise UserError(f"--label {key}: render sets this label itself{hint}")
        for what, name in (("--priority-class", self.priority_class), ("--service-account", self.service_account),
                           ("--tracking-secret", self.tracking_secret),
                           *(("--image-pull-secret", n) for n in self.image_pull_secrets)):
            if name is not None and not is_dns_subdomain(name):
                raise UserError(f"{what} '{name}' is not a valid Kubernetes name (lower case letters, digits, '-' "
                                "and '.')")
        prefix, _, rname = self.gpu_resource.rpartition("/")
        if not prefix or not is_dns_subdomain(prefix) or not _NAME_PART.match(rname) or len(rname) > 63 \
                or prefix.endswith("kubernetes.io"):
            raise UserError(f"--gpu-resource '{self.gpu_resource}' is not an extended resource name such as "
                            "nvidia.com/gpu or nvidia.com/mig-3g.20gb")
        for what, value in (("--ttl", self.ttl_s), ("--active-deadline", self.active_deadline_s)):
            if value is not None and value < (0 if what == "--ttl" else 1):
                raise UserError(f"{what} must be {'0 or more' if what == '--ttl' else 'at least 1'} seconds, "
                                f"got {value}")


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


@dataclass(frozen=True)
class StudyWorkers:
    """An adaptive search on Kubernetes: `workers` pods, each a worker of the Optuna study (`search --strategy`),
    pulling trials until `trials` count; the study's storage URL comes from key `url` of Secret `storage_secret`."""

    strategy: str
    trials: int
    prune: str
    sampler_seed: int
    workers: int
    storage_secret: str


STUDY_STORAGE_KEY = "url"


def pod_command(has_ranges: bool, pack: int = 1, plots: bool = True, study: StudyWorkers | None = None) -> list[str]:
    """The container command: run the run (with pack > 1, the pack) numbered $JOB_COMPLETION_INDEX of the search
    in /config; with `study`, work on the study's trials (the parent run and storage come from the environment)."""
    if study is not None:
        cmd = [APP, "search", f"{CONFIG_DIR}/hyperparams.json", f"{CONFIG_DIR}/hyperranges.json", "--strategy",
               study.strategy, "--trials", str(study.trials), "--prune", study.prune, "--sampler-seed",
               str(study.sampler_seed), "--no-progress"]
        return cmd + ([] if plots else ["--no-plots"])
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
    if search.runs:  # an adaptive search samples its runs as it goes
        data["expanded.json"] = expanded_text(search)
    size = sum(len(k) + len(v.encode()) for k, v in data.items())
    if size > CONFIGMAP_LIMIT:
        raise UserError(f"the search's files and its {len(search.runs)} expanded runs take {size} bytes, more than "
                        f"a Kubernetes ConfigMap holds (1 MiB); split the search into smaller ones")
    meta: dict[str, Any] = {"name": name, "labels": labels(instance, search.search_id, "search-config")}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _resources(gpus: int, cpu: str, memory: str, cpu_limit: str | None, gpu_resource: str,
               ephemeral_storage: str | None) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if ephemeral_storage:
        requests["ephemeral-storage"] = ephemeral_storage  # the scratch volume /work: scheduled on room for it
    if cpu_limit:
        limits["cpu"] = cpu_limit
    if gpus > 0:
        # an extended resource: the request must equal the limit. Both are given, because Kueue and quotas
        # count requests, and a Job's pod template is not defaulted the way a Pod is
        requests[gpu_resource] = gpus
        limits[gpu_resource] = gpus
    return {"requests": requests, "limits": limits}


def _container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _env(tracking_uri: str, parent_run_id: str, image: str, http: HttpPolicy,
         tracking_secret: str | None, study: StudyWorkers | None = None) -> list[dict[str, Any]]:
    """The container's environment: where to log, the parent run, the data, MLflow's retry settings, what the pod
    is (POD_NAME, NODE_NAME from the downward API; RETINA_IMAGE), and the tracking server's credentials."""
    plain = {"MLFLOW_TRACKING_URI": tracking_uri, "RETINA_PARENT_RUN_ID": parent_run_id, "RETINA_DATA_ROOT": DATA_DIR,
             **http.env(), "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "HOME": WORK_DIR,
             "RETINA_IMAGE": image}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
    env += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    if tracking_secret:
        # a Secret of type kubernetes.io/basic-auth (keys username, password): MLflow's client sends them
        env += [{"name": "MLFLOW_TRACKING_USERNAME",
                 "valueFrom": {"secretKeyRef": {"name": tracking_secret, "key": "username"}}},
                {"name": "MLFLOW_TRACKING_PASSWORD",
                 "valueFrom": {"secretKeyRef": {"name": tracking_secret, "key": "password"}}}]
    if study is not None:  # the study's database URL (with its password) stays in the Secret
        env.append({"name": "RETINA_STUDY_STORAGE",
                    "valueFrom": {"secretKeyRef": {"name": study.storage_secret, "key": STUDY_STORAGE_KEY}}})
    return env


def indexed_job(search: Search, *, name: str, config_name: str, has_ranges: bool, image: str, tracking_uri: str,
                parent_run_id: str, parallelism: int, gpus: int, data_pvc: str, namespace: str | None,
                backoff_limit_per_index: int, max_failed_indexes: int | None, cpu: str, memory: str,
                cpu_limit: str | None, work_size: str, http: HttpPolicy,
                termination_grace_s: int, completions: int, pack: int = 1, plots: bool = True,
                site: Site | None = None, ephemeral_storage: str | None = None,
                study: StudyWorkers | None = None) -> dict[str, Any]:
    """The Indexed Job: `completions` = number of runs (with pack > 1, of packs), pod i trains run (pack) i,
    failures handled per index; with `study`, `completions` = workers, each pulling trials from the study (a
    restarted worker goes on pulling, and an interrupted trial is resumed by whichever worker comes next)."""
    site = site or Site()
    n = completions
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": pod_command(has_ranges, pack, plots, study),
        "workingDir": WORK_DIR,
        "env": _env(tracking_uri, parent_run_id, image, http, site.tracking_secret, study),
        "resources": _resources(gpus, cpu, memory, cpu_limit, site.gpu_resource, ephemeral_storage),
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
    if site.service_account:
        pod_spec["serviceAccountName"] = site.service_account  # its token stays unmounted: the pods need no API
    if site.priority_class:
        pod_spec["priorityClassName"] = site.priority_class
    if site.node_selector:
        pod_spec["nodeSelector"] = dict(site.node_selector)
    tolerations = []
    if gpus > 0:
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    tolerations += [t for t in site.tolerations if t not in tolerations]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if site.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in site.image_pull_secrets]
    pod_labels = {**site.labels, **labels(name, search.search_id, "search-run")}
    pod_annotations = {**site.annotations, "retina-trainer/parent-run-id": parent_run_id}
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": n,
        "parallelism": n if study is not None else max(1, min(parallelism, n)),
        "backoffLimitPerIndex": backoff_limit_per_index,
        "podFailurePolicy": {"rules": [
            # a user/config error (bad input, index out of range, diverged training): retrying cannot help
            {"action": "FailIndex",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [USER_ERROR_EXIT_CODE]}},
            # the tracking server could not be reached: an ordinary retry (counted against backoffLimitPerIndex),
            # which resumes from the last checkpoint once the server is back
            {"action": "Count",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                             "values": [TRACKING_UNAVAILABLE_EXIT_CODE]}},
            # preemption, eviction, node drain: run the index again without counting it as a failure
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {
            "metadata": {"labels": pod_labels, "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if max_failed_indexes is not None:
        spec["maxFailedIndexes"] = max_failed_indexes
    if site.queue:
        spec["suspend"] = True  # Kueue admits the Job (unsuspends it) when its queue has quota for it
    if site.ttl_s is not None:
        spec["ttlSecondsAfterFinished"] = site.ttl_s
    if site.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = site.active_deadline_s
    job_labels = {**site.labels, **labels(name, search.search_id, "search")}
    if site.queue:
        job_labels[KUEUE_QUEUE_LABEL] = site.queue
    meta: dict[str, Any] = {
        "name": name,
        "labels": job_labels,
        "annotations": {**site.annotations, "retina-trainer/exp-name": search.exp_name,
                        "retina-trainer/parent-run-id": parent_run_id, "retina-trainer/tracking-uri": tracking_uri,
                        "retina-trainer/runs": str(len(search.runs) if study is None else study.trials),
                        "retina-trainer/pack": str(pack)},
    }
    if study is not None:
        meta["annotations"]["retina-trainer/strategy"] = f"{study.strategy} prune {study.prune}"
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def render(search: Search, files: dict[str, dict[str, Any]], *, image: str, tracking_uri: str,
           parent_run_id: str, parallelism: int = 4, gpus: int = 0, data_pvc: str = "retina-data",
           namespace: str | None = None, name: str | None = None, backoff_limit_per_index: int = 2,
           max_failed_indexes: int | None = None, cpu: str = "2", memory: str = "8Gi", cpu_limit: str | None = None,
           work_size: str = "20Gi", ephemeral_storage: str | None = None, http: HttpPolicy | None = None,
           termination_grace_s: int = 120, pack: int = 1, plots: bool = True, site: Site | None = None,
           patches: list[tuple[str, str, dict[str, Any]]] | None = None,
           study: StudyWorkers | None = None) -> list[dict[str, Any]]:
    """The manifests of one search: [ConfigMap, Indexed Job], ready for `kubectl apply`. With `pack` > 1 each
    pod trains one pack of `plan_packs(search.runs, pack)` (runs that may share a forward pass) together.

    `files` holds the parsed input files under the names the pods read ("hyperparams.json" and, when the search
    has ranges, "hyperranges.json"). `parent_run_id` is the search's MLflow parent run, created beforehand.
    `ephemeral_storage` is the pods' ephemeral-storage request (default: `work_size`, the scratch volume's size).
    `site` adds what a shared cluster asks for (queue, placement, lifetime, credentials); `patches` are
    (source, type, patch) with type "strategic" or "merge", applied to the Job in order and checked after.
    With `study` (an adaptive search; `search` then has no runs), the Job runs `study.workers` worker pods.
    """
    site = site or Site()
    if "hyperparams.json" not in files:
        raise UserError("render needs the hyperparams.json content")
    if not search.runs and study is None:
        raise UserError("the search has no runs")
    if pack < 1:
        raise UserError(f"--pack must be at least 1, got {pack}")
    if study is not None:
        if pack > 1:
            raise UserError("--pack applies to --strategy grid only; leave it out for a sampled strategy")
        if "hyperranges.json" not in files:
            raise UserError("a sampled strategy needs hyperranges.json")
        if not is_dns_label(study.storage_secret):
            raise UserError(f"--study-storage-secret '{study.storage_secret}' is not a valid Secret name")
        if study.workers < 1:
            raise UserError(f"--workers must be at least 1, got {study.workers}")
    completions = study.workers if study is not None else len(plan_packs(search.runs, pack))
    ephemeral_storage = work_size if ephemeral_storage is None else ephemeral_storage
    checks = [(parallelism >= 1, f"parallelism must be at least 1, got {parallelism}"),
              (gpus >= 0, f"gpus must be 0 or more, got {gpus}"),
              (backoff_limit_per_index >= 0, f"backoff limit per index must be 0 or more, got "
                                             f"{backoff_limit_per_index}"),
              (max_failed_indexes is None or 0 <= max_failed_indexes <= completions,
               f"max failed indexes must be between 0 and the number of indexes ({completions})"),
              (termination_grace_s >= 0, f"--grace-period must be 0 or more seconds, got {termination_grace_s}"),
              (bool(image.strip()), "an image is required"),
              (bool(tracking_uri.strip()), "a tracking URI is required"),
              (bool(parent_run_id.strip()), "a parent run id is required")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for option, value in (("--cpu", cpu), ("--memory", memory), ("--cpu-limit", cpu_limit),
                          ("--scratch-size", work_size), ("--ephemeral-storage", ephemeral_storage or None)):
        if value is not None and not is_quantity(value):
            raise UserError(f"{option} '{value}' is not a Kubernetes quantity (e.g. 2, 500m, 8Gi, 20Gi)")
    for label, value in (("data PVC", data_pvc), ("namespace", namespace)):
        if value is not None and not is_dns_label(value):
            raise UserError(f"{label} '{value}' is not a valid Kubernetes name (lower case letters, digits and "
                            f"'-', at most 63 characters)")
    name = name or job_name(search.exp_name, search.search_id)
    if not is_dns_label(name) or len(name) > MAX_NAME:
        raise UserError(f"name '{name}' is not a valid Kubernetes name of at most {MAX_NAME} characters "
                        f"(lower case letters, digits and '-')")
    site.check(set(labels(name, search.search_id, "search")))
    config_name = f"{name}-config"
    has_ranges = "hyperranges.json" in files
    job = indexed_job(search, name=name, config_name=config_name, has_ranges=has_ranges, image=image,
                      tracking_uri=tracking_uri, parent_run_id=parent_run_id, parallelism=parallelism, gpus=gpus,
                      data_pvc=data_pvc, namespace=namespace, backoff_limit_per_index=backoff_limit_per_index,
                      max_failed_indexes=max_failed_indexes, cpu=cpu, memory=memory, cpu_limit=cpu_limit,
                      work_size=work_size, http=http or HttpPolicy(), termination_grace_s=termination_grace_s,
                      completions=completions, pack=pack, plots=plots, site=site,
                      ephemeral_storage=ephemeral_storage or None, study=study)
    if patches:
        from trainer.launch import k8s_patch

        original = job
        for source, patch_type, patch in patches:
            job = k8s_patch.apply(job, patch, patch_type)
            k8s_patch.check_patched(job, original, CONTAINER, source)
    return [config_map(search, files, config_name, name, namespace), job]


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
