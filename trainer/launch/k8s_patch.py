"""Site patches for the rendered Job (`retina-trainer k8s render --patch FILE`): a strategic merge patch (what
`kubectl patch` applies by default) or a JSON merge patch (RFC 7386), so a cluster's own rules need no fork.

Pure Python (no kubernetes client): the strategic merge follows the Kubernetes types for what a Job holds: lists
with a merge key (containers and initContainers by `name`, env by `name`, volumes by `name`, volumeMounts by
`mountPath`, ports by `containerPort`, imagePullSecrets by `name`, ...) are merged item by item, every other list
is replaced whole (tolerations, args, command, podFailurePolicy rules, as in Kubernetes); maps are merged; a null
deletes a key; `$patch: delete` in a list item removes that item, `$patch: replace` in a map replaces it whole.
After patching, `check_patched` makes sure the Job still does what `run-index` relies on, and `validate_schema`
checks it against the Kubernetes schema (when kubernetes-validate is installed).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from trainer.errors import UserError

PATCH_TYPES = ("strategic", "merge")

# list field -> merge key, from the Kubernetes API types (patchStrategy "merge") of the objects inside a Job
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath", "ports": "containerPort",
    "imagePullSecrets": "name", "hostAliases": "ip", "resourceClaims": "name", "schedulingGates": "name",
    "topologySpreadConstraints": "topologyKey",
}
DIRECTIVE = "$patch"


def load_patch(path: str) -> dict[str, Any]:
    """A patch file (YAML or JSON) as a mapping; one clear line when it cannot be read or is not a mapping."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"--patch {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        patch = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--patch {path}: not valid YAML or JSON{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(patch, dict):
        raise UserError(f"--patch {path}: a patch is a mapping (part of a Job, e.g. spec: {{template: ...}}), "
                        f"got {type(patch).__name__}")
    for key, wanted in (("kind", "Job"), ("apiVersion", "batch/v1")):
        if key in patch and patch[key] != wanted:
            raise UserError(f"--patch {path}: it patches the rendered {wanted} ({key}: {wanted}), not "
                            f"{key} {patch[key]!r}")
    return patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, null deletes, anything else (lists included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge(target: Any, patch: Any, where: str = "") -> Any:
    """Kubernetes strategic merge patch of `target` by `patch` (see the module docstring for what is supported)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get(DIRECTIVE)
    if directive is not None and directive not in ("replace", "merge"):
        raise UserError(f"--patch: '{DIRECTIVE}: {directive}' at {where or 'the top'} is not supported here "
                        "(use replace, or delete inside a list item)")
    body = {k: v for k, v in patch.items() if k != DIRECTIVE}
    if directive == "replace" or not isinstance(target, dict):
        return {k: copy.deepcopy(v) for k, v in body.items() if v is not None}
    out = dict(target)
    for key, value in body.items():
        path = f"{where}.{key}" if where else key
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key], path)
        elif isinstance(value, list):
            out[key] = [_strip(v) for v in value if not (isinstance(v, dict) and v.get(DIRECTIVE) == "delete")]
        else:
            out[key] = strategic_merge(out.get(key), value, path)
    return out


def _strip(value: Any) -> Any:
    """A new list item: its directives dropped."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != DIRECTIVE}
    return copy.deepcopy(value)


def _merge_list(current: list[Any], patch: list[Any], key: str, where: str) -> list[Any]:
    out = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise UserError(f"--patch: every item of {where} needs its merge key '{key}' (items are matched by it), "
                            f"got {json.dumps(item)[:80]}")
        at = next((i for i, old in enumerate(out) if isinstance(old, dict) and old.get(key) == item[key]), None)
        if item.get(DIRECTIVE) == "delete":
            if at is not None:
                del out[at]
        elif at is None:
            out.append(_strip(item))
        else:
            out[at] = strategic_merge(out[at], item, f"{where}[{key}={item[key]}]")
    return out


def apply(job: dict[str, Any], patch: dict[str, Any], patch_type: str) -> dict[str, Any]:
    """The Job patched (a new dict; `job` is left as it was)."""
    if patch_type not in PATCH_TYPES:
        raise UserError(f"--patch-type must be one of {', '.join(PATCH_TYPES)}, got '{patch_type}'")
    body = {k: v for k, v in patch.items() if k not in ("kind", "apiVersion")}
    return merge_patch(job, body) if patch_type == "merge" else strategic_merge(job, body)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def check_patched(job: dict[str, Any], original: dict[str, Any], container: str, source: str) -> None:
    """A UserError (naming `source`) if the patched Job lost what `run-index` and `k8s finish` rely on."""
    def broken(what: str) -> UserError:
        return UserError(f"{source} {what}; a patch may add to the Job or change settings, not this")

    for path in (("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"),
                 ("spec", "completionMode"), ("spec", "completions")):
        if _get(job, *path) != _get(original, *path):
            raise broken(f"changes {'.'.join(path)} (from {_get(original, *path)!r} to {_get(job, *path)!r})")
    pod = _get(job, "spec", "template", "spec") or {}
    if pod.get("restartPolicy") != "Never":
        raise broken("changes the pods' restartPolicy from Never (per-index retries and podFailurePolicy need it)")
    containers = [c for c in pod.get("containers") or [] if isinstance(c, dict)]
    mine = next((c for c in containers if c.get("name") == container), None)
    before = next(c for c in _get(original, "spec", "template", "spec", "containers") if c["name"] == container)
    if mine is None:
        raise broken(f"removes the container '{container}' that trains the runs")
    for key in ("image", "command"):
        if mine.get(key) != before.get(key):
            raise broken(f"changes the {key} of container '{container}' (render it with --image instead)"
                         if key == "image" else f"changes the command of container '{container}'")
    wanted_env = {e["name"] for e in before.get("env", [])}
    if not wanted_env <= {e.get("name") for e in mine.get("env") or [] if isinstance(e, dict)}:
        raise broken(f"removes environment variables of container '{container}' "
                     f"({', '.join(sorted(wanted_env - {e.get('name') for e in mine.get('env') or []}))})")
    volumes = {v.get("name"): v for v in pod.get("volumes") or [] if isinstance(v, dict)}
    config_vol = next(v for v in _get(original, "spec", "template", "spec", "volumes") if v["name"] == "config")
    if volumes.get("config") != config_vol:
        raise broken("changes the 'config' volume (the search's ConfigMap)")
    labels_before = _get(original, "spec", "template", "metadata", "labels") or {}
    labels_after = _get(job, "spec", "template", "metadata", "labels") or {}
    lost = [k for k, v in labels_before.items() if labels_after.get(k) != v]
    if lost:
        raise broken(f"changes the pods' labels {', '.join(lost)} (`k8s status`, `k8s finish` and the "
                     "NetworkPolicy select by them)")
    rules = _get(job, "spec", "podFailurePolicy", "rules") or []
    if not any(r.get("action") == "FailIndex" and 2 in (_get(r, "onExitCodes", "values") or []) for r in rules
               if isinstance(r, dict)):
        raise broken("drops the podFailurePolicy rule that fails an index on exit code 2 (a user error: a "
                     "retry cannot help)")


def validate_schema(job: dict[str, Any], source: str) -> str | None:
    """Check the patched Job against the newest Kubernetes schema kubernetes-validate knows (strict: unknown
    fields are errors). A UserError when it fails; a note (not an error) when kubernetes-validate is missing."""
    try:
        import kubernetes_validate
    except ImportError:
        return (f"{source}: the patched Job's schema was not checked (pip install kubernetes-validate, or "
                "retina-trainer[k8s]); our own checks passed")
    version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(job, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        at = ".".join(map(str, exc.path)) or "the top"
        message = " ".join(str(exc.message).split())[:200]
        raise UserError(f"{source} makes the Job invalid for Kubernetes {version}: {message} at {at}") from None
    return None
