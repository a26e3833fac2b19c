"""MLflow: the only module that imports mlflow.

A search is one parent run with one child run per expanded run. With no MLFLOW_TRACKING_URI, MLflow's default
store is used: `sqlite:///mlflow.db` in the working directory, the same store `mlflow ui` opens there. Under
`mlflow run`, the project's run (MLFLOW_RUN_ID) becomes the search's parent run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Bounded retries against a tracking server (MLflow's own defaults retry a dead server for minutes): about 10 s of
# backoff, 30 s per request. Settings given in the environment (e.g. a pod's) win.
# No "Downloading artifacts" progress bars in our output.
for _key, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"), ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):
    os.environ.setdefault(_key, _value)

import mlflow  # noqa: E402

# MLflow's INFO lines (database set-up, ...) are not for our users; its warnings and errors still show.
logging.getLogger("mlflow").setLevel(logging.WARNING)
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from trainer.errors import AccessRefused, TrackingUnavailable, UserError  # noqa: E402

# Tags that identify what a run is; filters in the MLflow UI use them (e.g. tags.config_id = '...').
ROLE, SEARCH_ID, CONFIG_ID, INDEX = "role", "search_id", "config_id", "run_index"
PARENT_TAG, NAME_TAG = "mlflow.parentRunId", "mlflow.runName"
IMPORTED_FROM = "imported_from"  # tag of a run made by `retina-trainer import`: the original's file
# The MLflow UI (3.x) opens an experiment in the view its kind names; without the tag it guesses, and a new
# experiment opened in its GenAI view ("0 traces"). Ours train models.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# The UI's own choice between its GenAI and model-training views is a browser setting (GenAI in a new browser);
# this query selects model training (and the browser keeps it).
UI_VIEW = "workflowType=machine_learning"
MODEL_ID = "model_id"  # tag of a run: the MLflow Model (LoggedModel) of its best checkpoint, what `register` registers
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
FINISHED = RunStatus.to_string(RunStatus.FINISHED)


@dataclass
class PriorRun:
    """A child run already in the experiment for some config id."""

    run_id: str
    status: str
    metrics: dict[str, float]
    lease: str = ""  # the LEASE tag: who trains it and until when
    start_time: int = 0

    def held_elsewhere(self) -> str | None:
        """Who else trains this run right now (a RUNNING run with another process's live lease), or None."""
        return lease_holder(self.lease) if self.status == "RUNNING" else None


# ---- leases: a run is trained by at most one process -----------------------------------------------------------
# A process that trains a run holds its lease: the tag LEASE = {"owner": host:pid:start, "until": epoch seconds},
# set when it opens the run and renewed every HEARTBEAT_S by a background thread, cleared when the run ends. Another
# process leaves a RUNNING run alone while the lease is live; a lease is stale once `until` has passed, or at once
# when its owner was a process of this host that no longer exists (a kill -9 followed by a rerun resumes at once).
LEASE_TAG = "lease"
LEASE_S = 180.0
HEARTBEAT_S = 30.0
_OWNER = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"


def lease_value(until: float | None = None) -> str:
    return json.dumps({"owner": _OWNER, "until": round(until if until is not None else time.time() + LEASE_S, 1)})


RESUMED_PREFIX = "resumed."  # + a hash of the interruption: the param naming the process that reopened the run
CLAIM_S = 60.0  # a reopening that wrote no lease within this time was left by a process that died meanwhile
CLAIM_TRIES = 8


def other_live_owner(owner: str, until: float) -> bool:
    """Whether `owner` (host:pid:start) is another process that holds something until `until`: not this process,
    not expired, and not a process of this host that no longer exists."""
    if owner == _OWNER or until < time.time():
        return False
    host, pid = owner.split(":")[:2]
    return not (host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)))


def _claimant(value: str) -> str | None:
    """The owner of a reopening (a RESUMED_PREFIX param's value) that may still write its lease, or None."""
    try:
        claim = json.loads(value)
        owner, at = str(claim["owner"]), float(claim["at"])
    except (ValueError, TypeError, KeyError):
        return None
    return owner if other_live_owner(owner, at + CLAIM_S) else None


def lease_holder(value: str) -> str | None:
    """The owner of a live lease held by another process (with when it ends), or None."""
    try:
        lease = json.loads(value) if value else None
        owner, until = str(lease["owner"]), float(lease["until"])
    except (ValueError, TypeError, KeyError):
        return None
    if not other_live_owner(owner, until):
        return None
    host, pid = owner.split(":")[:2]
    return f"process {host}:{pid}, lease until {time.strftime('%H:%M:%S', time.localtime(until))}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    """Renews the leases of the runs this process trains, every HEARTBEAT_S, from a daemon thread."""

    def __init__(self, client: Any):
        self.client = client
        self.runs: set[str] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold(self, run_id: str) -> None:
        with self.lock:
            self.runs.add(run_id)
            if self.thread is None:
                self.thread = threading.Thread(target=self._beat, name="retina-trainer-lease", daemon=True)
                self.thread.start()

    def release(self, run_id: str) -> None:
        with self.lock:
            self.runs.discard(run_id)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:  # release() waits for these writes: an ended run's cleared lease is never renewed
                for run_id in list(self.runs):
                    try:
                        self.client.set_tag(run_id, LEASE_TAG, lease_value())
                    except Exception:  # a dead server: the training thread meets it and stops the search
                        pass


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class RunLog:
    """Reports one child run's epochs and checkpoints to MLflow (implements the Trainer's Reporter)."""

    def __init__(self, client: MlflowClient, run_id: str, heartbeat: Heartbeat | None = None):
        self.client = client
        self.run_id = run_id
        self.heartbeat = heartbeat

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=epoch)

    def log_metrics(self, metrics: dict[str, float], step: int, once: bool = False) -> None:
        """Log `metrics` at `step`; with `once`, leave out those already logged at that step (a run that finished
        its training but was interrupted while logging its summary or evaluation logs them again on the rerun)."""
        if once:
            metrics = {k: v for k, v in metrics.items()
                       if step not in {m.step for m in self.client.get_metric_history(self.run_id, k)}}
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

    def log_files(self, metrics: dict[str, float], files: list[tuple[str, Path]], step: int = 0,
                  once: bool = True) -> None:
        """Log scalar results and files (artifact folder, path), e.g. an evaluation's table and plots; with `once`,
        metrics already logged at `step` are left as they are (a rerun of an interrupted run), else logged again
        (the newer value is the one MLflow shows)."""
        self.log_metrics({k: v for k, v in metrics.items() if v == v}, step=step, once=once)  # NaN left out
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

    def log_model(self, loaded: Any) -> str:
        """Log a trained model (a trainer.inference.LoadedModel) as this run's MLflow Model: pytorch flavor, raw
        frames in and rates out (trainer.inference.RatePredictor), with a signature, an input example, its pip
        requirements and this package as code, so that `mlflow.pyfunc.load_model`, `mlflow.pytorch.load_model`
        and `mlflow models serve` take it. Returns the model id (also the run's tag MODEL_ID)."""
        import h5py
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        import trainer

        h, height, width = (int(v) for v in loaded.config["img_shape"])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(loaded.cell_ids)))]))
        example = np.random.default_rng(0).random((h + 3, height, width), dtype=np.float32)
        pip = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"h5py=={h5py.__version__}"]
        quiet = logging.getLogger("mlflow.pytorch")  # its warning on pickled models: ours are our own classes
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with mlflow.start_run(run_id=self.run_id):  # the fluent API logs to the active run
                info = mlflow.pytorch.log_model(
                    loaded.served(), name="model", signature=signature, input_example=example, pip_requirements=pip,
                    code_paths=[str(Path(trainer.__file__).parent)], serialization_format="pickle")
        except Exception as exc:
            if _unreachable(exc):
                raise TrackingUnavailable(f"the MLflow tracking server {mlflow.get_tracking_uri()} is unreachable "
                                          f"({' '.join(str(exc).split())[:160]})") from None
            raise
        finally:
            quiet.setLevel(level)
        self.client.set_tag(self.run_id, MODEL_ID, info.model_id)
        return info.model_id

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_recording(self, path: Path, dataset: str, stim_type: str, digest: str, val_frac: float) -> None:
        """The recording as the run's dataset input (the UI's Dataset column): name <dataset>/<stim_type>, the file
        as source, its digest; context training, and which part each split is (MLflow keeps one input per
        dataset, so validation and test, parts of the same file, are said in the tag `splits`)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow warns that it resolved the source's type itself
            source = resolve_dataset_source(str(Path(path).resolve()))
        entity = MetaDataset(source, name=f"{dataset}/{stim_type}", digest=digest)._to_mlflow_entity()
        splits = (f"training: group train without its last {val_frac:g}; validation: that last {val_frac:g} after a "
                  "gap of one window; test: group test")
        inputs = [DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training"), InputTag("splits", splits)])]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as exc:
                # Two processes logging the same new dataset at one moment (pods of a Job starting together): the
                # server's insert of the second fails on its unique key; once the first is in, logging it works.
                text = str(exc)
                if attempt == 2 or not ("UNIQUE constraint failed: datasets" in text or
                                        "duplicate key value" in text and "datasets" in text):
                    raise
                time.sleep(0.5 * (attempt + 1))

    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None:
        """A table (column -> values) as an MLflow table artifact, so `mlflow.load_table` reads a search's at once."""
        self.client.log_table(self.run_id, data=table, artifact_file=artifact_file)

    def start_system_metrics(self, resumed: bool) -> None:
        """MLflow's system metrics for this run (CPU, memory, disk, network; GPU utilisation and memory where there
        is a GPU), every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) from a background thread, until it ends."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        quiet = logging.getLogger("mlflow.system_metrics")
        quiet.setLevel(logging.ERROR)  # its INFO lines on starting and on a missing GPU
        every = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10)
        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every, samples_before_logging=1,
                                            resume_logging=resumed, tracking_uri=mlflow.get_tracking_uri())
        self.monitor.start()

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params the run learns once its data is loaded (logging the same value again, on resume, is fine)."""
        self.client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])

    def end(self, status: str) -> None:
        """End the run FINISHED, FAILED or KILLED (and give up its lease)."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            self.monitor = None
            try:
                monitor.finish()
            except Exception:  # its last upload; the run's own end matters more
                pass
        if self.heartbeat is not None:
            self.heartbeat.release(self.run_id)
            self.client.set_tag(self.run_id, LEASE_TAG, "")
        self.client.set_terminated(self.run_id, status)


def _unreachable(exc: BaseException) -> bool:
    """Whether an error of an MLflow call means the tracking server could not be reached (connection refused or
    reset, timeouts, 5xx after MLflow's retries), rather than a request it refused."""
    import requests

    if isinstance(exc, requests.exceptions.RequestException | ConnectionError | TimeoutError):
        return True
    text = str(exc)
    return isinstance(exc, MlflowException) and ("failed with exception" in text or "Max retries exceeded" in text
                                                 or bool(re.search(r"failed with error code 5\d\d", text)))


def _refused(exc: BaseException, uri: str) -> str | None:
    """The one line for a server that refuses the request's credentials (401) or its user (403), else None."""
    code, user = getattr(exc, "error_code", None), os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED":
        if user:
            return (f"the MLflow tracking server {uri} refused the credentials of user '{user}' (401 not "
                    "authenticated): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (in a pod: the "
                    "Secret of `k8s render --tracking-secret`)")
        return (f"the MLflow tracking server {uri} asks for credentials (401 not authenticated): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (in a pod: `k8s render --tracking-secret "
                "SECRET`)")
    if code == "PERMISSION_DENIED":
        return (f"the MLflow tracking server {uri} does not let user '{user or '(none)'}' do this (403 permission "
                "denied); ask the experiment's owner or an admin for EDIT permission on it")
    return None


class GuardedClient:
    """An MlflowClient whose calls raise TrackingUnavailable (one line) when the server cannot be reached."""

    def __init__(self, client: MlflowClient, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                if _unreachable(exc):
                    first = " ".join(str(exc).split())[:160]
                    raise TrackingUnavailable(f"the MLflow tracking server {self._uri} is unreachable ({first})") \
                        from None
                refused = _refused(exc, self._uri)
                if refused:
                    raise AccessRefused(refused, exc.error_code) from None
                raise

        return call


@contextlib.contextmanager
def _store_setup_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a store between processes: MLflow and Optuna create their tables on first use, and
    two processes starting together on a new store raced there ("table ... already exists", a duplicate version
    row). A local SQLite store: an empty lock file in the system temp folder, one per store (as MLflow's own
    db_init_lock). A PostgreSQL store (workers in several pods): a session advisory lock in that database, held on
    a connection of its own while the tables are made; when that connection cannot be had, no lock is taken and
    the store's own error follows."""
    if uri.startswith(("postgresql", "postgres:")):
        with _advisory_lock(uri):
            yield
        return
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    name = f"retina-trainer-store-{hashlib.md5(path.encode(), usedforsecurity=False).hexdigest()}.lock"
    with open(Path(tempfile.gettempdir()) / name, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


SETUP_LOCK_KEY = 0x72657469  # "reti": the advisory lock key every retina-trainer process takes to set up tables


def driver_url(url: str) -> str:
    """A PostgreSQL URL without a driver names psycopg2 (in the image) when psycopg 3, SQLAlchemy 2.1's default for
    postgresql://, is not installed."""
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme) and importlib.util.find_spec("psycopg") is None:
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


@contextlib.contextmanager
def _advisory_lock(uri: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(driver_url(uri), poolclass=NullPool)
        conn = engine.connect()
    except Exception:  # a bad URL, password or host: the caller's own connection says so
        yield
        return
    try:
        conn.execute(sqlalchemy.text("select pg_advisory_lock(:key)"), {"key": SETUP_LOCK_KEY})
        yield
    finally:
        try:  # closing the session's connection releases its advisory lock in any case
            conn.execute(sqlalchemy.text("select pg_advisory_unlock(:key)"), {"key": SETUP_LOCK_KEY})
        except Exception:
            pass
        conn.close()
        engine.dispose()


def _check_local_store(uri: str) -> None:
    """A UserError unless the folder of a local SQLite or file store can be written: MLflow would otherwise retry
    for minutes and end in a long traceback."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
    elif uri.startswith("file:") or "://" not in uri:
        folder = Path(uri[5:] if uri.startswith("file:") else uri).expanduser()
        folder = folder if folder.exists() else folder.parent
    else:
        return
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mlflow-write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"the MLflow store {uri} cannot be written: {folder.resolve()} is not a writable folder "
                        f"({exc.strerror or exc}); run from a writable working directory or set "
                        "MLFLOW_TRACKING_URI") from None


class Tracker:
    """One experiment in one tracking store: parent runs for searches, child runs for their runs."""

    def __init__(self, exp_name: str, create: bool = True):
        self.uri = mlflow.get_tracking_uri()
        _check_local_store(self.uri)
        with _store_setup_lock(self.uri):  # the client sets up a new store's tables
            self.client = GuardedClient(MlflowClient(), self.uri)
            self._open_experiment(exp_name, create)
        self.heartbeat = Heartbeat(self.client)

    def _open_experiment(self, exp_name: str, create: bool) -> None:
        try:
            exp = self.client.get_experiment_by_name(exp_name)
            if exp is None and not create:
                raise UserError(f"no experiment '{exp_name}' in the MLflow tracking store {self.uri}: render the "
                                "search against this server first (retina-trainer k8s render), or check the "
                                "tracking URI")
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(exp_name, tags={EXPERIMENT_KIND: MODEL_TRAINING})
                    return
                except MlflowException as exc:  # another process created it a moment ago
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self.client.get_experiment_by_name(exp_name)
            if exp.lifecycle_stage == "deleted":
                raise UserError(f"MLflow experiment '{exp_name}' is deleted in {self.uri}; restore it "
                                f"(mlflow experiments restore) or choose another exp_name")
            else:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND not in exp.tags:
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        except MlflowException as exc:
            raise UserError(f"cannot reach the MLflow tracking store {self.uri}: {exc.message.splitlines()[0]}; "
                            f"check MLFLOW_TRACKING_URI") from None

    def run_url(self, run_id: str) -> str:
        """Where the run is in the MLflow UI: its URL on a tracking server, else how to open the local store. The
        query selects the UI's model-training view (a new browser opens MLflow 3's GenAI view)."""
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}?{UI_VIEW}"
        return f"(mlflow ui --backend-store-uri {self.uri}, then /#/experiments/{self.experiment_id}?{UI_VIEW})"

    def check_parent(self, parent_id: str, search_id: str) -> None:
        """A UserError unless `parent_id` is this search's parent run in this experiment (before anything trains)."""
        try:
            run = self.client.get_run(parent_id)
        except MlflowException:
            raise UserError(f"parent run '{parent_id}' not found in {self.uri}; pass the parent run id that "
                            "`retina-trainer k8s render` printed (the Job's RETINA_PARENT_RUN_ID)") from None
        if run.info.experiment_id != self.experiment_id:
            raise UserError(f"parent run '{parent_id}' belongs to another experiment than this search's "
                            f"(exp_name); pass the parent run of search {search_id}")

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
        if found:  # RUNNING again only once there is something to train (see reopen_parent)
            return found[0].info.run_id, True
        run = self.client.create_run(self.experiment_id, run_name=f"{exp_name}-search-{search_id}", tags=tags)
        # two processes that started the same search at the same moment: the earlier parent is the parent
        found = self._search(f"tags.{ROLE} = 'search' and tags.{SEARCH_ID} = '{search_id}'")
        first = min(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))
        if first.info.run_id != run.info.run_id:
            self.client.delete_run(run.info.run_id)
            return first.info.run_id, True
        for name, content in files.items():
            self.client.log_dict(run.info.run_id, content, name)
        return run.info.run_id, True

    def prior_runs(self, config_id: str | None = None) -> dict[str, list[PriorRun]]:
        """Child runs already in the experiment (of one config id, when given), by config id (newest first)."""
        flt = f"tags.{ROLE} = 'run'" + (f" and tags.{CONFIG_ID} = '{config_id}'" if config_id else "")
        by_id: dict[str, list[PriorRun]] = {}
        for r in self._search(flt):
            by_id.setdefault(r.data.tags.get(CONFIG_ID, ""), []).append(
                PriorRun(r.info.run_id, r.info.status, dict(r.data.metrics), r.data.tags.get(LEASE_TAG, ""),
                         r.info.start_time or 0))
        return by_id

    def claim(self, log: RunLog, config_id: str) -> str | None:
        """After opening a run, make sure no other process opened one for the same config id at the same time: of
        two RUNNING runs with live leases the earlier one is trained, the later one is deleted. Returns the other
        process's owner when this run yielded, else None."""
        runs = self.prior_runs(config_id).get(config_id, [])
        mine = [r for r in runs if r.run_id == log.run_id]
        others = [r for r in runs if r.run_id != log.run_id and r.held_elsewhere()]
        if not mine or not others:
            return None
        first = min(others, key=lambda r: (r.start_time, r.run_id))
        if (first.start_time, first.run_id) < (mine[0].start_time, mine[0].run_id):
            self.heartbeat.release(log.run_id)
            self.client.delete_run(log.run_id)
            return first.held_elsewhere()
        return None

    def start_child(self, parent_id: str, search_id: str, index: int, name: str, config_id: str,
                    cfg: dict[str, Any]) -> RunLog:
        """Create a child run with the resolved hyperparameters as params and hyperparams.json as artifact."""
        tags = {PARENT_TAG: parent_id, ROLE: "run", SEARCH_ID: search_id, CONFIG_ID: config_id,
                INDEX: str(index), LEASE_TAG: lease_value()}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.heartbeat.hold(run.info.run_id)
        log = RunLog(self.client, run.info.run_id, self.heartbeat)
        self.client.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in cfg.items()])
        self.client.log_dict(run.info.run_id, cfg, "hyperparams.json")
        return log

    def run_log(self, run_id: str) -> RunLog:
        """A reporter for an existing run (e.g. to attach files to a search's parent run)."""
        return RunLog(self.client, run_id)

    def reopen_child(self, run_id: str) -> RunLog | str:
        """Take the lease of an interrupted child run and mark it RUNNING again, to resume it in place; or, when
        another process took it meanwhile, that process (its owner, as lease_holder says it).

        Two processes may find the same interrupted run at the same moment, and a tag is last-writer-wins, so the
        run is won by a compare-and-set: a param `resumed.<hash of the interruption>` = this process. The store
        keeps one value per (run, key) and refuses another (INVALID_PARAMETER_VALUE), so of the processes that
        read the same interruption exactly one logs it; the others yield to it. The interruption is the run's end
        time and its lease as read: a reopened run's live lease sends later readers away before they get here,
        and a reopening whose process died (gone from this host, or no lease within CLAIM_S) is passed over by
        the next attempt number. The params record who resumed the run after each interruption."""
        for attempt in range(CLAIM_TRIES):
            run = self.client.get_run(run_id)
            # the lease whatever the status says: the server reads a run's status and its tags in separate queries,
            # so a rival's RUNNING can be missed while its lease is seen; an ended run's lease is cleared
            holder = lease_holder(run.data.tags.get(LEASE_TAG, ""))
            if holder is None and run.info.status == FINISHED:
                holder = "a process that finished it meanwhile"
            if holder is not None:
                return holder
            seen = f"{run.info.end_time}|{run.data.tags.get(LEASE_TAG, '')}|{attempt}"
            key = RESUMED_PREFIX + hashlib.md5(seen.encode(), usedforsecurity=False).hexdigest()[:12]
            try:
                self.client.log_param(run_id, key, json.dumps({"owner": _OWNER, "at": round(time.time(), 1)}))
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                winner = _claimant(self.client.get_run(run_id).data.params.get(key, ""))
                if winner is None:  # it died before writing its lease: the next attempt's key
                    continue
                host, pid = winner.split(":")[:2]
                return f"process {host}:{pid}, which reopened it a moment ago"
            self.client.set_tag(run_id, LEASE_TAG, lease_value())
            self.client.update_run(run_id, status="RUNNING")
            self.heartbeat.hold(run_id)
            return RunLog(self.client, run_id, self.heartbeat)
        return "other processes that reopened it and died before taking its lease"

    def finish_parent_if_complete(self, parent_id: str, config_ids: list[str]) -> bool:
        """Mark the parent FINISHED when every run of its search has FINISHED (the last pod of a Job does it)."""
        done = {r.data.tags.get(CONFIG_ID) for r in self._search(f"tags.{ROLE} = 'run' and "
                                                                   f"attributes.status = 'FINISHED'")}
        if not set(config_ids) <= done:
            return False
        if self.client.get_run(parent_id).info.status != FINISHED:
            self.client.set_terminated(parent_id, FINISHED)
        return True

    def reopen_parent(self, run_id: str) -> None:
        """Mark an earlier parent run RUNNING again: a rerun has runs left to train under it."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def note(self, run_id: str, text: str) -> None:
        """A note on a run, shown as its description in the MLflow UI."""
        self.client.set_tag(run_id, "mlflow.note.content", text)

    def end_parent(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)



# ---- registry and loading -----------------------------------------------------------------------------------------

CHAMPION = "champion"


def _lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def _best_child(client: Any, target: str, metric: str) -> tuple[Any, str]:
    """The best FINISHED child run on `metric` of an experiment (by name), a search (by search id) or a parent run
    (by run id), asked of the server (order_by, one result), and what was searched."""
    flt = f"tags.{ROLE} = 'run' and attributes.status = 'FINISHED'"
    order = [f"metrics.`{metric}` {'ASC' if _lower_is_better(metric) else 'DESC'}"]
    exp = client.get_experiment_by_name(target)
    if exp is not None:
        scopes = [([exp.experiment_id], flt, f"experiment '{target}'")]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        scopes = [(exp_ids, f"{flt} and tags.{SEARCH_ID} = '{target}'", f"search {target}"),
                  (exp_ids, f"{flt} and tags.`{PARENT_TAG}` = '{target}'", f"parent run {target}")]
    for exp_ids, where, what in scopes:
        if not client.search_runs(exp_ids, where, max_results=1):
            continue
        best = client.search_runs(exp_ids, f"{where} and metrics.`{metric}` > -1e308", order_by=order,
                                  max_results=1)
        if best:
            return best[0], what
        some = client.search_runs(exp_ids, where, max_results=50)
        known = sorted({k for r in some for k in r.data.metrics if not k.startswith(("val_pearson_cell",
                                                                                    "test_pearson_cell"))})
        raise UserError(f"no FINISHED run of {what} has metric '{metric}'; use --metric with one of: "
                        f"{', '.join(known)}")
    raise UserError(f"no experiment, search id or parent run '{target}' with FINISHED runs in "
                    f"{mlflow.get_tracking_uri()}; give an exp_name, a search id (from `retina-trainer expand`) "
                    f"or a parent run id")


def register_best(target: str, metric: str = "best_val_pearson", name: str | None = None) -> dict[str, Any]:
    """Register the best FINISHED run's model as a new model version; move the `champion` alias only when the new
    version beats the current champion on the same metric."""
    client = _existing_store_client()
    best, what = _best_child(client, target, metric)
    model_name = name or client.get_experiment(best.info.experiment_id).name
    return {**register_run(client, best, metric, model_name), "searched": what}


def register_run(client: MlflowClient, run: Any, metric: str, model_name: str) -> dict[str, Any]:
    """Register a FINISHED run's MLflow Model (its tag MODEL_ID; a run of retina-trainer before 0.2 has none, and its
    checkpoints/ folder is registered instead: `predict` and `evaluate` load it, MLflow cannot serve it) as a new
    version of `model_name` (created if needed), tagged with what it is; move the `champion` alias to it when there
    is no champion, the champion has no value of `metric`, or the run's value beats it (a run without the metric
    takes the alias only when there is none). A run already registered under `model_name` is left as it is."""
    sign = -1.0 if _lower_is_better(metric) else 1.0
    value = run.data.metrics.get(metric)
    params = run.data.params
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="retina-trainer models: MLflow Models (pytorch flavor, "
                                                               "raw stimulus frames in, rates out) of the best "
                                                               "checkpoint of a run")
    already = client.search_model_versions(f"name = '{model_name}' and run_id = '{run.info.run_id}'")
    if already:
        v = min(already, key=lambda mv: int(mv.version))
        return {"name": model_name, "version": v.version, "run_id": run.info.run_id, "metric": metric,
                "value": value, "already": True, "champion_moved": False, "previous_champion": None,
                "previous_value": None}
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
    model_id = run.data.tags.get(MODEL_ID)
    if model_id:
        version = client.create_model_version(model_name, source=f"models:/{model_id}", run_id=run.info.run_id,
                                              tags={**tags, "servable": "true"}, model_id=model_id)
    else:
        version = client.create_model_version(model_name, source=f"{run.info.artifact_uri}/checkpoints",
                                              run_id=run.info.run_id, tags={**tags, "servable": "false"})
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
            "value": value, "champion_moved": moved, "previous_champion": prev_version, "previous_value": previous,
            "already": False, "servable": bool(model_id)}


def log_imported(checkpoint_path: Path, cfg: dict[str, Any], imported_from: dict[str, Any],
                 metrics: dict[str, float], experiment: str = "imported", register_as: str | None = None,
                 run_name: str | None = None) -> dict[str, Any]:
    """Log an imported checkpoint (`retina-trainer import`) as a FINISHED run of `experiment`: the config as
    params and hyperparams.json, `metrics` (trainer.importer.run_metrics: the original's scores as original_*,
    ours as best_val_pearson when the import scored it) at our epoch (best_epoch), the tags `imported_from` (the
    source file) and `imported_epoch` (the original's 0-based epoch), the file as checkpoints/best.pt; then, with
    `register_as`, register it as `register` does."""
    tracker = Tracker(experiment)
    client = tracker.client
    source = str(imported_from.get("source", ""))
    epoch = imported_from.get("epoch")
    tags = {ROLE: "import", IMPORTED_FROM: source, "imported_epoch": "" if epoch is None else str(epoch)}
    try:
        run = client.create_run(tracker.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        log = RunLog(client, run_id)
        try:
            log.log_params(cfg)
            client.log_dict(run_id, cfg, "hyperparams.json")
            log.log_metrics(metrics, step=int(metrics.get("best_epoch", 0) or 0))
            log.checkpoint(Path(checkpoint_path), "best.pt")
            from trainer.inference import load_checkpoint

            log.log_model(load_checkpoint(checkpoint_path))
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


def _existing_store_client() -> Any:
    """A client of the tracking store, for commands that read one: a local SQLite store that does not exist is an
    error (MLflow would create an empty one in the working directory)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().is_file():
        raise UserError(f"no MLflow store here: {uri} does not exist in {Path.cwd()}; run from the folder that holds "
                        "mlflow.db or set MLFLOW_TRACKING_URI")
    return GuardedClient(MlflowClient(), uri)


def download_best_checkpoint(ref: str, dest: Path) -> tuple[Path, str]:
    """Fetch best.pt for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID` or a bare run id: the
    checkpoint of the version's run (whatever the version's source: the run's MLflow Model, or before 0.2 its
    checkpoints/ folder), and the run's id."""
    client = _existing_store_client()
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
            run_id = mv.run_id or ""
            if run_id:
                source = f"{client.get_run(run_id).info.artifact_uri}/checkpoints/best.pt"
        else:
            run_id = ref[len("runs:/"):].strip("/") if ref.startswith("runs:/") else ref
            source = f"{client.get_run(run_id).info.artifact_uri}/checkpoints/best.pt"
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest))), run_id
    except MlflowException as exc:
        raise UserError(f"cannot load '{ref}' from {mlflow.get_tracking_uri()}: "
                        f"{exc.message.splitlines()[0]}") from None


def recorded_recording(run_id: str) -> tuple[str, str] | None:
    """The recording a run was trained on, as its dataset input says: (file path, digest), or None."""
    client = _existing_store_client()
    for di in client.get_run(run_id).inputs.dataset_inputs:
        try:
            return json.loads(di.dataset.source)["uri"], di.dataset.digest
        except (ValueError, KeyError, TypeError):
            continue
    return None


def log_evaluation(run_id: str, metrics: dict[str, float], files: list[tuple[str, Path]]) -> None:
    """Attach metrics and files (tables, plots) to a run, e.g. one analysed again later: the new values replace
    what the run showed, same-named files replace the earlier ones."""
    client = _existing_store_client()
    RunLog(client, run_id).log_files(metrics, files, once=False)
