"""MLflow: the only module that imports mlflow.

A search is one parent run with one child run per expanded run. With no MLFLOW_TRACKING_URI, MLflow's default
store is used: `sqlite:///mlflow.db` in the working directory, the same store `mlflow ui` opens there. Under
`mlflow run`, the project's run (MLFLOW_RUN_ID) becomes the search's parent run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from trainer.errors import UserError  # noqa: E402

# Tags that identify what a run is; filters in the MLflow UI use them (e.g. tags.config_id = '...').
ROLE, SEARCH_ID, CONFIG_ID, INDEX = "role", "search_id", "config_id", "run_index"
PARENT_TAG, NAME_TAG = "mlflow.parentRunId", "mlflow.runName"
IMPORTED_FROM = "imported_from"  # tag of a run made by `retina-trainer import`: the original's file
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
FINISHED = RunStatus.to_string(RunStatus.FINISHED)


@dataclass
class PriorRun:
    """A child run already in the experiment for some config id."""

    run_id: str
    status: str
    metrics: dict[str, float]


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class RunLog:
    """Reports one child run's epochs and checkpoints to MLflow (implements the Trainer's Reporter)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=epoch)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_BATCH])

    def checkpoint(self, path: Path, name: str) -> None:
        """Upload a checkpoint file as checkpoints/<name> (a same-named upload replaces the previous one)."""
        if path.name == name:
            self.client.log_artifact(self.run_id, str(path), "checkpoints")
            return
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            shutil.copyfile(path, target)
            self.client.log_artifact(self.run_id, str(target), "checkpoints")

    def log_files(self, metrics: dict[str, float], files: list[tuple[str, Path]], step: int = 0) -> None:
        """Log scalar results and files (artifact folder, path), e.g. an evaluation's table and plots."""
        self.log_metrics({k: v for k, v in metrics.items() if v == v}, step=step)  # NaN scores are left out
        for folder, path in files:
            self.client.log_artifact(self.run_id, str(path), folder)

    def logged_steps(self, key: str = "train_loss") -> set[int]:
        """Epochs already logged for `key` (so a resumed run logs every epoch once)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def download_checkpoint(self, name: str, dest: Path) -> Path | None:
        """Fetch checkpoints/<name> of this run into `dest`, or None if the run has none."""
        try:
            names = {Path(f.path).name for f in self.client.list_artifacts(self.run_id, "checkpoints")}
        except MlflowException:
            return None
        if name not in names:
            return None
        return Path(self.client.download_artifacts(self.run_id, f"checkpoints/{name}", str(dest)))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params the run learns once its data is loaded (logging the same value again, on resume, is fine)."""
        self.client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])

    def end(self, status: str) -> None:
        """End the run FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)


class Tracker:
    """One experiment in one tracking store: parent runs for searches, child runs for their runs."""

    def __init__(self, exp_name: str):
        self.client = MlflowClient()
        self.uri = mlflow.get_tracking_uri()
        try:
            exp = self.client.get_experiment_by_name(exp_name)
            if exp is None:
                self.experiment_id = self.client.create_experiment(exp_name)
            elif exp.lifecycle_stage == "deleted":
                raise UserError(f"MLflow experiment '{exp_name}' is deleted in {self.uri}; restore it "
                                f"(mlflow experiments restore) or choose another exp_name")
            else:
                self.experiment_id = exp.experiment_id
        except MlflowException as exc:
            raise UserError(f"cannot reach the MLflow tracking store {self.uri}: {exc.message.splitlines()[0]}; "
                            f"check MLFLOW_TRACKING_URI") from None

    def _search(self, filter_string: str) -> list[Any]:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def parent_run(self, search_id: str, exp_name: str, n_runs: int, searched_keys: list[str],
                   files: dict[str, dict[str, Any]]) -> tuple[str, bool]:
        """The search's parent run id, and whether this process owns (and so ends) it.

        Under `mlflow run` the project's run is the parent (its params are the project's; never re-logged here).
        Otherwise a rerun of the same search reuses its parent run, so the children stay together.
        """
        tags = {ROLE: "search", SEARCH_ID: search_id, "n_runs": str(n_runs),
                "searched_keys": ",".join(searched_keys) or "(none)"}
        env_run = os.environ.get("MLFLOW_RUN_ID")
        if env_run:
            self.client.log_batch(env_run, tags=[RunTag(k, v) for k, v in tags.items()])
            return env_run, False
        found = self._search(f"tags.{ROLE} = 'search' and tags.{SEARCH_ID} = '{search_id}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        run = self.client.create_run(self.experiment_id, run_name=f"{exp_name}-search-{search_id}", tags=tags)
        for name, content in files.items():
            self.client.log_dict(run.info.run_id, content, name)
        return run.info.run_id, True

    def prior_runs(self) -> dict[str, list[PriorRun]]:
        """Child runs already in the experiment, by config id (newest first)."""
        by_id: dict[str, list[PriorRun]] = {}
        for r in self._search(f"tags.{ROLE} = 'run'"):
            by_id.setdefault(r.data.tags.get(CONFIG_ID, ""), []).append(
                PriorRun(r.info.run_id, r.info.status, dict(r.data.metrics)))
        return by_id

    def start_child(self, parent_id: str, search_id: str, index: int, name: str, config_id: str,
                    cfg: dict[str, Any]) -> RunLog:
        """Create a child run with the resolved hyperparameters as params and hyperparams.json as artifact."""
        tags = {PARENT_TAG: parent_id, ROLE: "run", SEARCH_ID: search_id, CONFIG_ID: config_id,
                INDEX: str(index)}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        log = RunLog(self.client, run.info.run_id)
        self.client.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in cfg.items()])
        self.client.log_dict(run.info.run_id, cfg, "hyperparams.json")
        return log

    def run_log(self, run_id: str) -> RunLog:
        """A reporter for an existing run (e.g. to attach files to a search's parent run)."""
        return RunLog(self.client, run_id)

    def reopen_child(self, run_id: str) -> RunLog:
        """Mark an interrupted child run RUNNING again, to resume it in place."""
        self.client.update_run(run_id, status="RUNNING")
        return RunLog(self.client, run_id)

    def finish_parent_if_complete(self, parent_id: str, config_ids: list[str]) -> bool:
        """Mark the parent FINISHED when every run of its search has FINISHED (the last pod of a Job does it)."""
        done = {r.data.tags.get(CONFIG_ID) for r in self._search(f"tags.{ROLE} = 'run' and "
                                                                   f"attributes.status = 'FINISHED'")}
        if not set(config_ids) <= done:
            return False
        if self.client.get_run(parent_id).info.status != FINISHED:
            self.client.set_terminated(parent_id, FINISHED)
        return True

    def end_parent(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)



# ---- registry and loading -----------------------------------------------------------------------------------------

CHAMPION = "champion"


def _lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def _finished_children(client: MlflowClient, target: str) -> tuple[list[Any], str]:
    """FINISHED child runs of an experiment (by name), a search (by search id) or a parent run (by run id)."""
    flt = f"tags.{ROLE} = 'run' and attributes.status = 'FINISHED'"
    exp = client.get_experiment_by_name(target)
    if exp is not None:
        return client.search_runs([exp.experiment_id], flt, max_results=5000), f"experiment '{target}'"
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, f"{flt} and tags.{SEARCH_ID} = '{target}'", max_results=5000)
    if runs:
        return runs, f"search {target}"
    runs = client.search_runs(exp_ids, f"{flt} and tags.`{PARENT_TAG}` = '{target}'", max_results=5000)
    if runs:
        return runs, f"parent run {target}"
    raise UserError(f"no experiment, search id or parent run '{target}' with FINISHED runs in "
                    f"{mlflow.get_tracking_uri()}; give an exp_name, a search id (from `retina-trainer expand`) "
                    f"or a parent run id")


def register_best(target: str, metric: str = "best_val_pearson", name: str | None = None) -> dict[str, Any]:
    """Register the best FINISHED run's best checkpoint as a new model version; move the `champion` alias only
    when the new version beats the current champion on the same metric."""
    client = MlflowClient()
    runs, what = _finished_children(client, target)
    scored = [r for r in runs if metric in r.data.metrics and r.data.metrics[metric] == r.data.metrics[metric]]
    if not scored:
        known = sorted({k for r in runs for k in r.data.metrics if not k.startswith(("val_pearson_cell",
                                                                                     "test_pearson_cell"))})
        raise UserError(f"no FINISHED run of {what} has metric '{metric}'; use --metric with one of: "
                        f"{', '.join(known)}")
    sign = -1.0 if _lower_is_better(metric) else 1.0
    best = max(scored, key=lambda r: sign * r.data.metrics[metric])
    model_name = name or client.get_experiment(best.info.experiment_id).name
    return {**register_run(client, best, metric, model_name), "searched": what, "n_candidates": len(scored)}


def register_run(client: MlflowClient, run: Any, metric: str, model_name: str) -> dict[str, Any]:
    """Register a FINISHED run's checkpoints/ folder as a new version of `model_name` (created if needed), tagged
    with what it is; move the `champion` alias to it when there is no champion, the champion has no value of
    `metric`, or the run's value beats it (a run without the metric takes the alias only when there is none)."""
    sign = -1.0 if _lower_is_better(metric) else 1.0
    value = run.data.metrics.get(metric)
    params = run.data.params
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="retina-trainer models (state_dict checkpoints with "
                                                               "their resolved config and stimulus normalisation)")
    tags = {"run_id": run.info.run_id, "config_id": run.data.tags.get(CONFIG_ID, ""),
            "model_type": params.get("model_type", ""), "dataset": params.get("dataset", ""),
            "stim_type": params.get("stim_type", ""), "cells": params.get("cells", ""),
            "selection_metric": metric}
    if value is not None:
        tags[f"metric.{metric}"] = repr(value)
    for k in ("best_val_pearson", "test_pearson_at_best", "best_epoch"):
        if k in run.data.metrics:
            tags[f"metric.{k}"] = repr(run.data.metrics[k])
    if IMPORTED_FROM in run.data.tags:
        tags[IMPORTED_FROM] = run.data.tags[IMPORTED_FROM]
    version = client.create_model_version(model_name, source=f"{run.info.artifact_uri}/checkpoints",
                                          run_id=run.info.run_id, tags=tags)
    previous = None
    try:
        champ = client.get_model_version_by_alias(model_name, CHAMPION)
        previous = float(champ.tags[f"metric.{metric}"]) if f"metric.{metric}" in champ.tags else None
        prev_version = champ.version
    except MlflowException:
        prev_version = None
    if value is None:
        moved = prev_version is None
    else:
        moved = prev_version is None or previous is None or sign * value > sign * previous
    if moved:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return {"name": model_name, "version": version.version, "run_id": run.info.run_id, "metric": metric,
            "value": value, "champion_moved": moved, "previous_champion": prev_version, "previous_value": previous}


def log_imported(checkpoint_path: Path, cfg: dict[str, Any], imported_from: dict[str, Any],
                 metrics: dict[str, float], experiment: str = "imported", register_as: str | None = None,
                 run_name: str | None = None) -> dict[str, Any]:
    """Log an imported checkpoint (`retina-trainer import`) as a FINISHED run of `experiment`: the config as
    params and hyperparams.json, the original's scores as metrics at its epoch, the tag `imported_from` (the
    source file), the file as checkpoints/best.pt; then, with `register_as`, register it as `register` does."""
    tracker = Tracker(experiment)
    client = tracker.client
    source = str(imported_from.get("source", ""))
    tags = {ROLE: "import", IMPORTED_FROM: source, "imported_epoch": str(imported_from.get("epoch", ""))}
    try:
        run = client.create_run(tracker.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        log = RunLog(client, run_id)
        try:
            log.log_params(cfg)
            client.log_dict(run_id, cfg, "hyperparams.json")
            log.log_metrics(metrics, step=int(imported_from.get("epoch", 0) or 0))
            log.checkpoint(Path(checkpoint_path), "best.pt")
        except BaseException:
            log.end(RunStatus.to_string(RunStatus.FAILED))
            raise
        log.end(FINISHED)
        out: dict[str, Any] = {"run_id": run_id, "experiment": experiment, "tracking_uri": tracker.uri}
        if register_as:
            out["registered"] = register_run(client, client.get_run(run_id), "best_val_pearson", register_as)
        return out
    except MlflowException as exc:
        raise UserError(f"cannot log the import to {tracker.uri}: {exc.message.splitlines()[0]}; check "
                        "MLFLOW_TRACKING_URI") from None


def download_best_checkpoint(ref: str, dest: Path) -> Path:
    """Fetch best.pt for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID` or a bare run id."""
    client = MlflowClient()
    try:
        if ref.startswith("models:/"):
            body = ref[len("models:/"):]
            if "@" in body:
                model_name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(model_name, alias)
            elif "/" in body:
                model_name, ver = body.rsplit("/", 1)
                mv = client.get_model_version(model_name, ver)
            else:
                raise UserError(f"model URI '{ref}' needs a version or alias: models:/NAME@champion or "
                                f"models:/NAME/1")
            source = f"{mv.source.rstrip('/')}/best.pt"
        else:
            run_id = ref[len("runs:/"):].strip("/") if ref.startswith("runs:/") else ref
            source = f"{client.get_run(run_id).info.artifact_uri}/checkpoints/best.pt"
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest)))
    except MlflowException as exc:
        raise UserError(f"cannot load '{ref}' from {mlflow.get_tracking_uri()}: "
                        f"{exc.message.splitlines()[0]}") from None


def log_evaluation(run_id: str, metrics: dict[str, float], files: list[tuple[str, Path]]) -> None:
    """Attach evaluation metrics and files (tables, plots) to a run, e.g. one scored again later."""
    RunLog(MlflowClient(), run_id).log_files(metrics, files)
