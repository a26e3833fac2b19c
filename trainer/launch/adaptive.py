"""Adaptive search (`search --strategy random|tpe --trials N --prune median|asha|hyperband`): an Optuna study
samples configurations from hyperranges.json and stops hopeless runs early on their per-epoch validation r.

The study lives in an Optuna RDB storage (by default `optuna.db` beside a local MLflow store; on a cluster the
PostgreSQL the tracking server uses, a separate database), named `<exp_name>-<search id>`, where the search id is a
hash of the strategy, the pruner, the sampler's seed, the space and the base configuration. Every trial is one run
as in a grid search (trainer/launch/local.py): an MLflow child run of the search's parent, identified by its config
id, with checkpoints, resume and evaluation. So the same command resumes a study (`load_if_exists`), any number of
processes (Kubernetes worker pods) can share it, and a trial interrupted in one of them resumes in the next from its
checkpoint, in the same MLflow run: the interrupted trial is failed and re-enqueued with the same parameters, by
its own process on Ctrl-C or SIGTERM, by the next worker when its owner process is gone (this host) or its Optuna
heartbeat is stale (another host).

What counts against `--trials`: trials that trained or train now (COMPLETE, PRUNED, RUNNING, WAITING) and trials
whose run failed. A sampled configuration that the checks reject (ConfigError: a kernel that does not fit, ...) is
reported and not counted; neither is an interrupted trial (its retry is), nor one that found another process
training its configuration. A configuration sampled again reuses the earlier result without training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import config
from trainer import search as search_mod
from trainer.errors import ConfigError, TrackingUnavailable, UserError
from trainer.search import RunSpec, Search

STRATEGIES = ("grid", "random", "tpe")
SAMPLED = ("random", "tpe")
PRUNERS = ("none", "median", "asha", "hyperband")
STORAGE_ENV = "RETINA_STUDY_STORAGE"
MAX_REJECTED = 50  # sampled configurations rejected in a row before the search stops: the space is mostly invalid
STUDY_TAG, STRATEGY_TAG = "optuna_study", "strategy"
# FAIL trials carry why in this user attribute; only "failed" (the run itself failed) counts against --trials
OUTCOME_ATTR, OWNER_ATTR, CONFIG_ATTR = "outcome", "owner", "config_id"

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """An adaptive search: the base configuration, the space to sample and how."""

    search_id: str
    exp_name: str
    base: dict[str, Any]
    space: dict[str, list[Any] | config.Range]
    strategy: str
    prune: str
    trials: int
    sampler_seed: int
    warnings: tuple[str, ...]

    @property
    def study_name(self) -> str:
        return f"{self.exp_name}-{self.search_id}"

    @property
    def searched_keys(self) -> tuple[str, ...]:
        return tuple(self.space)

    def space_json(self) -> dict[str, Any]:
        return {k: v.to_json() if isinstance(v, config.Range) else v for k, v in self.space.items()}


def plan(hyperparams: str | Path, hyperranges: str | Path | None, strategy: str, trials: int | None,
         prune: str = "none", sampler_seed: int | None = None) -> Plan:
    """Read and check the two files for a sampled strategy; any problem is a ConfigError before anything runs."""
    if strategy not in SAMPLED:
        raise ConfigError(f"--strategy {strategy} is not sampled; choose one of {', '.join(SAMPLED)}")
    if prune not in PRUNERS:
        raise ConfigError(f"--prune {prune} is unknown; choose one of {', '.join(PRUNERS)}")
    if trials is None or trials < 1:
        raise ConfigError(f"--strategy {strategy} needs --trials N (N >= 1): how many configurations to train")
    params = config.load_hyperparams(hyperparams)
    ranges = config.load_hyperranges(hyperranges, ranges_ok=True)
    base = config.resolve(params.values)
    if not ranges.values:
        raise ConfigError(f"--strategy {strategy} has nothing to sample: {hyperranges or 'no hyperranges file'} "
                          "names no key; give the values or ranges to search, or use --strategy grid")
    if base["n_repeats"] != 1:
        raise ConfigError(f"{hyperparams}: n_repeats {base['n_repeats']} applies to --strategy grid; a sampled "
                          "strategy trains each configuration once (search seed as a key to vary it)")
    seed = base["seed"] if sampler_seed is None else sampler_seed
    p = Plan("", base["exp_name"], base, dict(ranges.values), strategy, prune, trials, seed,
             tuple(params.warnings + ranges.warnings + config.unset_log_poisson(params, ranges, str(hyperparams))))
    identity = {"strategy": strategy, "prune": prune, "sampler_seed": seed, "base": config.identity_view(base),
                "space": p.space_json()}
    return dataclasses.replace(p, search_id="s" + search_mod._digest(identity, 9))


# ---- the study -------------------------------------------------------------------------------------------------


def default_storage(tracking_uri: str) -> str:
    """`$RETINA_STUDY_STORAGE`, else `optuna.db` beside a local SQLite MLflow store, else in the working folder."""
    env = os.environ.get(STORAGE_ENV)
    if env:
        return env
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).expanduser().resolve().parent / 'optuna.db'}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def shown(url: str) -> str:
    """A storage URL without its password, to print and tag."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _quiet() -> None:
    """Optuna's messages that say nothing to our users."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and their retry callback are marked experimental, and meant for study.optimize: we record them
    # ourselves around ask/tell (_Heartbeat), which is what optimize does
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    # a resumed trial reports again the epochs before its checkpoint; those already in the study are kept
    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")


def open_study(p: Plan, storage_url: str, *, create: bool = True) -> Any:
    """The plan's study in `storage_url`, created on first use (by whichever process comes first); with
    `create=False` (k8s status and finish) an existing study only, else a UserError."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from trainer.tracking import HEARTBEAT_S, LEASE_S, _store_setup_lock, driver_url

    _quiet()
    storage_url = driver_url(storage_url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if storage_url.startswith("sqlite:"):
        kwargs = {"connect_args": {"timeout": 120}}  # several local workers wait for SQLite's write lock
        path = Path(storage_url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise UserError(f"the study storage {storage_url} cannot be created: {path.parent} is not a folder; set "
                            f"--study-storage or ${STORAGE_ENV}")
        if not create and not path.is_file():
            raise UserError(f"no study storage at {storage_url}: pass the --study-storage the workers used")
    last: Exception | None = None
    for attempt in range(3):
        try:
            # Optuna creates its tables on first use, and two workers starting together on a new database raced
            # there ("table studies already exists", a second version row): the store lock of trainer/tracking.py
            # (a file lock for SQLite, an advisory lock in PostgreSQL) serialises it, and a database error still
            # gets two more tries (Optuna wraps those of its sessions in StorageInternalError)
            with _store_setup_lock(storage_url):
                storage = RDBStorage(storage_url, engine_kwargs=kwargs, heartbeat_interval=int(HEARTBEAT_S),
                                     grace_period=int(LEASE_S),
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                         inherit_intermediate_values=True))
                if not create:
                    try:
                        return optuna.load_study(study_name=p.study_name, storage=storage, sampler=make_sampler(p),
                                                 pruner=make_pruner(p))
                    except KeyError:
                        raise UserError(f"no study {p.study_name} in {shown(storage_url)}: pass the files and the "
                                        "--strategy, --prune and --sampler-seed the search was rendered with, and "
                                        "the --study-storage its workers used") from None
                return optuna.create_study(study_name=p.study_name, storage=storage, direction="maximize",
                                           sampler=make_sampler(p), pruner=make_pruner(p), load_if_exists=True)
        except UserError:
            raise
        except Exception as exc:
            last = exc
            if attempt < 2 and type(exc).__name__ in ("OperationalError", "IntegrityError", "ProgrammingError",
                                                      "StorageInternalError"):
                time.sleep(1 + attempt)
                continue
            break
    first = " ".join(str(last).split())[:200]
    raise UserError(f"cannot open the study storage {shown(storage_url)} ({type(last).__name__}: {first}); check "
                    f"--study-storage or ${STORAGE_ENV} (an SQLAlchemy URL such as sqlite:///optuna.db or "
                    "postgresql://user:password@host/optuna)")


def make_sampler(p: Plan, trial_number: int | None = None) -> Any:
    """The plan's sampler; for one trial, seeded by (sampler seed, trial number): workers that share a study then
    draw different values (equal seeds would make them propose the same ones), and one worker's study is the same
    on every machine."""
    import optuna

    seed = p.sampler_seed
    if trial_number is not None:
        seed = int(hashlib.sha256(f"{p.sampler_seed}:{trial_number}".encode()).hexdigest()[:8], 16)
    if p.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(p: Plan) -> Any:
    """The pruner on per-epoch validation r. Median: after 5 finished trials, a trial whose r at an epoch is below the
    median of the others' at that epoch stops (not in its first epoch). ASHA: rungs at 1, 3, 9, ... epochs, a third
    of the trials go on at each. Hyperband: several ASHA brackets up to n_epochs."""
    import optuna

    n_epochs = p.base["n_epochs"]
    if p.prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if p.prune == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if p.prune == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def sample(trial: Any, p: Plan) -> dict[str, Any]:
    """The trial's values of the searched keys (a retried trial gets its earlier values back). Choices that are not
    plain numbers or strings (lists such as chans) are offered to Optuna by their JSON text."""
    out: dict[str, Any] = {}
    for key, dim in p.space.items():
        if isinstance(dim, config.Range):
            if dim.integer:
                out[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
            else:
                out[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in dim)
            if plain:
                out[key] = trial.suggest_categorical(key, dim)
            else:
                out[key] = json.loads(trial.suggest_categorical(key, [json.dumps(v) for v in dim]))
    return out


def trial_spec(p: Plan, number: int, sampled: dict[str, Any]) -> RunSpec:
    """The run of a trial: the base configuration with its sampled values, checked as a grid run is."""
    cfg = dict(p.base, **sampled)
    where = f"trial {number} ({', '.join(f'{k}={json.dumps(v)}' for k, v in sampled.items())})"
    for key, value in sampled.items():  # a range's values pass the schema's own checks too
        param = config.BY_NAME[key]
        bad = param.check(value) if param.check and not isinstance(value, list) else None
        if bad:
            raise ConfigError(f"{where}: {key} {bad}")
    config.check_run(cfg, where)
    name = search_mod.run_name(p.exp_name, number, sampled, 0, 1)
    return RunSpec(index=number, name=name[:search_mod.RUN_NAME_LIMIT], config_id=search_mod.config_id(cfg),
                   seed=cfg["seed"], repeat=0, searched=sampled, config=cfg)


def _counts(trial: Any) -> bool:
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(OUTCOME_ATTR) == "failed"


def counted(study: Any, before: int | None = None) -> int:
    """Trials that count against --trials (of those numbered below `before`, when given)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if _counts(t) and (before is None or t.number < before))


def work_left(study: Any, trials: int) -> bool:
    """Whether a worker has a trial to train: fewer than `trials` count, or a retry of a trial whose worker is gone
    waits (WAITING counts already, in place of the lost one, and ask takes it first)."""
    from optuna.trial import TrialState

    return counted(study) < trials or bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def reclaim(study: Any, echo: Echo) -> None:
    """Fail and re-enqueue the trials whose process is gone: stale Optuna heartbeats (any host), and at once the
    RUNNING trials of processes of this host that no longer exist (a kill -9, then a rerun)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.trial import TrialState

    _quiet()
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    fail_stale_trials(study)
    retry = RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
    storage = study._storage
    lost = gone(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number not in lost:
            continue
        try:  # the note first: a finished trial takes no more attributes
            storage.set_trial_user_attr(t._trial_id, OUTCOME_ATTR, "interrupted")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(t._trial_id))
        except UpdateFinishedTrialError:  # another process took it first
            pass
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number not in before and t.user_attrs.get(OUTCOME_ATTR, "interrupted") == "interrupted":
            echo(f"trial {t.number}: its process is gone; it resumes as a new trial with the same values")


def gone(study: Any) -> set[int]:
    """Numbers of the RUNNING trials whose worker is gone: a stale Optuna heartbeat (any host), or an owner process
    of this host that no longer exists. Reads only (reclaim, in the next worker, fails and re-enqueues them)."""
    from optuna.trial import TrialState

    from trainer.tracking import _OWNER, other_live_owner

    storage = study._storage
    stale = set(storage._get_stale_trial_ids(study._study_id)) if storage.get_heartbeat_interval() else set()
    out = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        dead_here = bool(owner) and owner != _OWNER and not other_live_owner(owner, math.inf)
        if t._trial_id in stale or dead_here:
            out.add(t.number)
    return out


class _Heartbeat:
    """Records the trial's Optuna heartbeat every HEARTBEAT_S while it trains (other workers fail it when it stops)."""

    def __init__(self, study: Any, trial: Any):
        from trainer.tracking import HEARTBEAT_S

        self.stop = threading.Event()
        storage, trial_id = study._storage, trial._trial_id

        def beat() -> None:
            while not self.stop.wait(HEARTBEAT_S):
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # a storage hiccup; the training goes on
                    pass

        storage.record_heartbeat(trial_id)
        self.thread = threading.Thread(target=beat, name="retina-trainer-trial-heartbeat", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()


def _interrupted(study: Any, trial: Any) -> None:
    """Fail a trial this process cannot finish (Ctrl-C, SIGTERM, tracking server gone) and enqueue it again with the
    same values and the epochs it reported, for this or another worker to resume from its checkpoint."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    _quiet()
    try:
        trial.set_user_attr(OUTCOME_ATTR, "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, study._storage.get_trial(
            trial._trial_id))
    except Exception:  # the storage is gone too: the heartbeat goes stale and another worker retries it
        pass


# ---- the worker loop ----------------------------------------------------------------------------------------------


def run_study(p: Plan, *, data_root: str | None = None, echo: Echo = print, progress: bool = True,
              plots: bool = True, storage: str | None = None, parent_id: str | None = None,
              files: dict[str, dict[str, Any]] | None = None) -> Any:
    """Train trials of the plan's study until --trials count, as one worker (several may share the study). Returns
    the SearchOutcome of the trials this process saw end. With `parent_id` (a Kubernetes worker) the runs attach to
    that parent; otherwise the search's parent run is made or reused, and ended by the worker that sees the study
    complete."""
    from optuna.trial import TrialState

    from trainer.launch.local import DataCache, RunOutcome, SearchOutcome, preflight
    from trainer.tracking import _OWNER, Tracker

    tracker = Tracker(p.exp_name)
    storage_url = storage or default_storage(tracker.uri)
    study = open_study(p, storage_url)
    worker = parent_id is not None  # a Kubernetes worker: the last one to see the study complete ends the parent
    if parent_id is None:
        parent_id, owns_parent = tracker.parent_run(p.search_id, p.exp_name, p.trials, list(p.searched_keys),
                                                    files or {})
    else:
        tracker.check_parent(parent_id, p.search_id)
        owns_parent = False
    tracker.client.set_tag(parent_id, STUDY_TAG, f"{p.study_name} in {shown(storage_url)}")
    tracker.client.set_tag(parent_id, STRATEGY_TAG, f"{p.strategy}, prune {p.prune}, {p.trials} trials, sampler "
                                                    f"seed {p.sampler_seed}")
    reclaim(study, echo)  # trials of workers that are gone are retried first, within the budget
    done_before = counted(study)
    echo(f"search {p.search_id}: {p.strategy} over {', '.join(p.searched_keys)}, {p.trials} trials "
         f"({done_before} counted already), prune {p.prune}; study {p.study_name} in {shown(storage_url)}; "
         f"experiment '{p.exp_name}' in {tracker.uri}")
    outcomes: list[RunOutcome] = []
    cache = DataCache()
    rejected = 0
    status = "FINISHED"
    nothing = not work_left(study, p.trials)
    if owns_parent and not nothing:
        tracker.reopen_parent(parent_id)
    try:
        while True:
            reclaim(study, echo)
            if not work_left(study, p.trials):
                break
            trial = study.ask()
            trial.set_user_attr(OWNER_ATTR, _OWNER)
            if counted(study, before=trial.number) >= p.trials:  # other workers took the last ones meanwhile
                trial.set_user_attr(OUTCOME_ATTR, "over budget")
                study.tell(trial, state=TrialState.FAIL)
                break
            study.sampler = make_sampler(p, trial.number)  # values are drawn at suggest time, from this sampler
            first = study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial", trial.number)
            number = int(first)  # a retried trial keeps its first number, so its run keeps its name and folder
            beat = _Heartbeat(study, trial)
            try:
                try:
                    spec = trial_spec(p, number, sample(trial, p))
                    search = Search(p.search_id, p.exp_name, (spec,), p.searched_keys, ())
                    path = preflight(search, data_root, cache=cache)[spec.index]
                except ConfigError as exc:
                    rejected += 1
                    echo(f"trial {trial.number}: the sampled configuration is rejected, not counted: {exc}")
                    trial.set_user_attr(OUTCOME_ATTR, f"rejected: {str(exc)[:500]}")
                    study.tell(trial, state=TrialState.FAIL)
                    if rejected >= MAX_REJECTED:
                        raise ConfigError(f"{MAX_REJECTED} sampled configurations in a row were rejected (the last: "
                                          f"{exc}); narrow hyperranges to valid values") from None
                    continue
                rejected = 0
                trial.set_user_attr(CONFIG_ATTR, spec.config_id)
                outcome = _train(trial, study, spec, path, p, parent_id, tracker, cache, echo, progress, plots)
            except BaseException:
                _interrupted(study, trial)
                raise
            finally:  # also after a rejected sample's `continue`
                beat.close()
            if outcome is not None:
                outcomes.append(outcome)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except TrackingUnavailable:
        owns_parent = False
        raise
    except UserError:
        status = "FAILED"
        raise
    finally:
        if status != "FINISHED" and owns_parent:
            tracker.end_parent(parent_id, status)
    trials = study.get_trials(deepcopy=False)
    busy = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    specs = [o.spec for o in outcomes]
    outcome = SearchOutcome(Search(p.search_id, p.exp_name, tuple(specs), p.searched_keys, p.warnings), parent_id,
                            tracker.uri, runs=sorted(outcomes, key=lambda o: o.spec.index))
    if busy:
        echo(f"search {p.search_id}: {search_mod.plural(len(busy), 'trial')} still train in other processes; the "
             "last of them closes the search")
        return outcome
    if nothing and tracker.client.get_run(parent_id).info.status != "RUNNING":  # an earlier parent stays as it was
        echo(f"search {p.search_id}: all {p.trials} trials are done already; nothing to train (more trials: a "
             "larger --trials)")
        return outcome
    _close(study, p, tracker, parent_id, plots, echo, end=owns_parent or worker)
    return outcome


def _train(trial: Any, study: Any, spec: RunSpec, path: Path, p: Plan, parent_id: str, tracker: Any, cache: Any,
           echo: Echo, progress: bool, plots: bool) -> Any:
    """Train (or resume) the trial's run with the pruner asked after each epoch; tell the study how it ended."""
    from optuna.trial import TrialState

    from trainer.launch.local import execute_pack

    def stop_check(epoch: int, metrics: dict[str, float]) -> bool:
        value = metrics["val_pearson"]
        trial.report(value if math.isfinite(value) else -1.0, epoch)
        return p.prune != "none" and trial.should_prune()

    echo(f"trial {trial.number}: {', '.join(f'{k}={search_mod.short_value(v)}' for k, v in spec.searched.items())}")
    [outcome] = execute_pack([spec], search_id=p.search_id, parent_id=parent_id, tracker=tracker, path=path,
                             cache=cache, echo=echo, progress=progress, plots=plots, stop_check=stop_check)
    if outcome.status == "BUSY":  # another process trains this configuration (a retry raced): not counted here
        trial.set_user_attr(OUTCOME_ATTR, "busy")
        study.tell(trial, state=TrialState.FAIL)
        return None
    trial.set_user_attr("mlflow_run_id", outcome.run_id)
    if outcome.status in ("FINISHED", "SKIPPED"):
        trial.set_user_attr("epochs_trained", outcome.epochs_run if outcome.status == "FINISHED" else 0)
        if outcome.status == "SKIPPED":
            echo(f"trial {trial.number}: this configuration was trained before ({outcome.run_id}); its result counts")
        if outcome.pruned_epoch:
            if outcome.status == "SKIPPED":
                trial.report(outcome.best_val_pearson, outcome.pruned_epoch)
            echo(f"trial {trial.number}: pruned after epoch {outcome.pruned_epoch} (best val r "
                 f"{outcome.best_val_pearson:.3f}); run {outcome.run_id} is FINISHED with its best checkpoint")
            study.tell(trial, state=TrialState.PRUNED)
        else:
            value = outcome.best_val_pearson
            study.tell(trial, value if math.isfinite(value) else -1.0)
        return outcome
    trial.set_user_attr(OUTCOME_ATTR, "failed")  # the run FAILED (diverged, a bad recording): counts as a trial
    study.tell(trial, state=TrialState.FAIL)
    return outcome


# ---- the end of a study: the parent run's summary --------------------------------------------------------------


def trials_table(study: Any) -> dict[str, list[Any]]:
    """One row per trial: number, state, value (best validation r), epochs trained, MLflow run, values."""
    rows = study.get_trials(deepcopy=False)
    keys = sorted({k for t in rows for k in t.params})
    table: dict[str, list[Any]] = {"trial": [], "state": [], "best_val_pearson": [], "epochs": [], "mlflow_run_id": [],
                                   "note": []}
    table.update({k: [] for k in keys})
    for t in rows:
        table["trial"].append(t.number)
        table["state"].append(t.state.name)
        table["best_val_pearson"].append(t.value if t.value is not None else
                                         max(t.intermediate_values.values(), default=None))
        table["epochs"].append(t.user_attrs.get("epochs_trained", len(t.intermediate_values)))
        table["mlflow_run_id"].append(t.user_attrs.get("mlflow_run_id", ""))
        table["note"].append(t.user_attrs.get(OUTCOME_ATTR, ""))
        for k in keys:
            table[k].append(t.params.get(k))
    return table


def _close(study: Any, p: Plan, tracker: Any, parent_id: str, plots: bool, echo: Echo, end: bool) -> None:
    """Log the study's summary on the parent run (trials table, best value, epochs spent, plots) and end it."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(OUTCOME_ATTR) == "failed"]
    epochs = sum(int(t.user_attrs.get("epochs_trained", 0)) for t in done)
    metrics = {"trials_complete": len(complete), "trials_pruned": len(done) - len(complete),
               "trials_failed": len(failed), "epochs_trained": epochs}
    if complete:
        metrics["best_val_pearson"] = study.best_value
    log = tracker.run_log(parent_id)
    log.log_metrics(metrics, step=0)
    log.log_table(trials_table(study), "study/trials.json")
    if plots and done:
        with tempfile.TemporaryDirectory() as tmp:
            files = [("plots", _plot_history(study, Path(tmp) / "optimization_history.png"))]
            importance = _plot_importance(study, Path(tmp) / "param_importances.png")
            if importance is not None:
                files.append(("plots", importance))
            log.log_files({}, files)
    if complete:
        best = study.best_trial
        echo(f"search {p.search_id}: best trial {best.number} (best val r {best.value:.3f}, MLflow run "
             f"{best.user_attrs.get('mlflow_run_id', '?')}): "
             f"{', '.join(f'{k}={v}' for k, v in best.params.items())}; {len(done)} trials trained "
             f"{epochs} epochs ({len(done) - len(complete)} pruned)")
    if end:
        tracker.end_parent(parent_id, "FAILED" if failed else "FINISHED")


def _plot_history(study: Any, path: Path) -> Path:
    """Best validation r of each trial in the order they began, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from optuna.trial import TrialState

    rows = [(t.number, t.value if t.value is not None else max(t.intermediate_values.values(), default=math.nan),
             t.state == TrialState.PRUNED)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for pruned, colour, label in ((False, "C0", "complete"), (True, "C7", "pruned (best r before it stopped)")):
        xs = [n for n, _, pr in rows if pr == pruned]
        ys = [v for _, v, pr in rows if pr == pruned]
        if xs:
            ax.scatter(xs, ys, s=14, color=colour, label=label)
    best, line = -math.inf, []
    for n, v, pruned in rows:
        if not pruned and math.isfinite(v):
            best = max(best, v)
        line.append((n, best if math.isfinite(best) else math.nan))
    if line:
        ax.step([n for n, _ in line], [b for _, b in line], where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation r")
    ax.set_title(f"{study.study_name}: optimisation history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _plot_importance(study: Any, path: Path) -> Path | None:
    """Optuna's fANOVA importance of each searched key for the best validation r (None with too few trials)."""
    import optuna

    try:
        importances = optuna.importance.get_param_importances(study)
    except Exception:  # fewer than two complete trials, or a single key that never varied
        return None
    if not importances:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 0.5 + 0.4 * len(importances)))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance for best validation r (fANOVA)")
    ax.set_title(f"{study.study_name}: parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
