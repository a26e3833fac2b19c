"""Run the runs of a search on this machine, one after another, each logged as an MLflow child run.

Before anything trains, every run is checked (its model builds, its recording exists). Runs already FINISHED in
the experiment with the same config id are skipped; an interrupted run resumes from its latest checkpoint in the
same MLflow run. A failing run is marked FAILED and the search goes on; Ctrl-C marks the current run KILLED.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import search as search_mod
from trainer.data.recording import DataBundle, load_data, recording_path, resolve_data_root
from trainer.data.recording import preflight as recording_preflight
from trainer.errors import DataError, UserError
from trainer.models import build_model
from trainer.search import RunSpec, Search
from trainer.training import checkpoint
from trainer.training.trainer import Trainer, resolve_device

Echo = Callable[[str], None]


@dataclass
class RunOutcome:
    """How one run of the search ended, for the summary table."""

    spec: RunSpec
    status: str  # FINISHED | FAILED | KILLED | SKIPPED
    run_id: str = ""
    best_val_pearson: float = math.nan
    test_pearson: float = math.nan
    best_epoch: int = 0
    error: str = ""
    user_error: bool = False  # the failure is one a retry cannot fix (bad input, diverged training)


@dataclass
class SearchOutcome:
    search: Search
    parent_run_id: str
    tracking_uri: str
    runs: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status in ("FAILED", "KILLED")]


def seed_everything(seed: int) -> None:
    """Seed every generator a run touches, so a run is reproducible from its recorded seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def run_dir(spec: RunSpec) -> Path:
    """The seed's model folder: <save_root>/<exp_name>/<run name>/."""
    return Path(spec.config["save_root"]).expanduser() / spec.config["exp_name"] / spec.name


def preflight(search: Search, data_root: str | None, only: int | None = None) -> dict[int, Path]:
    """Check every run (or run `only`) before any trains: recording exists and fits, model builds."""
    paths: dict[int, Path] = {}
    checked: dict[tuple[Any, ...], int] = {}
    for spec in search.runs if only is None else [search.runs[only]]:
        cfg = spec.config
        root = resolve_data_root(data_root or cfg["data_root"])
        path = recording_path(root, cfg["dataset"], cfg["stim_type"])
        if not path.is_file():
            raise DataError(f"run {spec.index} ({spec.name}): recording not found: {path}; check --data-root, "
                            f"data_root or $RETINA_DATA_ROOT, dataset and stim_type, or make one with "
                            f"`retina-trainer data synth {root}`")
        try:
            key = (str(path), json.dumps(cfg["cells"]), tuple(cfg["img_shape"]), cfg["val_frac"])
            if key not in checked:
                checked[key] = recording_preflight(path, cells=cfg["cells"], img_shape=cfg["img_shape"],
                                                   val_frac=cfg["val_frac"])
            build_model(cfg, checked[key])
            resolve_device(cfg["device"])
        except UserError as exc:
            raise type(exc)(f"run {spec.index} ({spec.name}): {exc}") from None
        paths[spec.index] = path
    return paths


class DataCache:
    """Keeps the last recording loaded, so consecutive runs on the same data do not read it again."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.bundle: DataBundle | None = None

    def get(self, path: Path, cfg: dict[str, Any], device: torch.device) -> DataBundle:
        cells = cfg["cells"] if cfg["cells"] == "all" else tuple(cfg["cells"])
        key = (str(path), cells, tuple(cfg["img_shape"]), cfg["val_frac"], str(device))
        if key != self.key:
            self.bundle = None  # free the previous recording before reading the next
            self.bundle = load_data(path, cells=cfg["cells"], img_shape=cfg["img_shape"],
                                    val_frac=cfg["val_frac"], device=device)
            self.key = key
        assert self.bundle is not None
        return self.bundle


def _resume_state(spec: RunSpec, folder: Path, log: Any) -> dict[str, Any] | None:
    """The newest readable checkpoint of an interrupted run (its local folder or its MLflow artifact) that
    belongs to this run's configuration, or None."""
    best: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        candidates = [checkpoint.latest(folder), log.download_checkpoint(checkpoint.LATEST, Path(tmp))]
        for path in candidates:
            if path is None:
                continue
            try:
                state = checkpoint.load(path)
            except Exception:  # a checkpoint cut short by a kill: fall back to the other copy
                continue
            if search_mod.config_id(state["config"]) != spec.config_id:
                continue
            if best is None or state["epoch"] > best["epoch"]:
                best = state
    return best


def execute(spec: RunSpec, *, search_id: str, parent_id: str, tracker: Any, prior: list[Any], path: Path,
            cache: DataCache, echo: Echo, progress: bool = True) -> RunOutcome:
    """Train one run (or resume it), logging it as a child of `parent_id`; never raises for a failed run."""
    cfg = spec.config
    folder = run_dir(spec)
    unfinished = [p for p in prior if p.status in ("RUNNING", "FAILED", "KILLED", "SCHEDULED")]
    log, resume = None, None
    if unfinished:
        log = tracker.reopen_child(unfinished[0].run_id)
        resume = _resume_state(spec, folder, log)
        if resume is None:
            log.end("FAILED")
            log = None
    if log is None:
        log = tracker.start_child(parent_id, search_id, spec.index, spec.name, spec.config_id, cfg)
    outcome = RunOutcome(spec, "FAILED", run_id=log.run_id)
    bar = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        device = resolve_device(cfg["device"])
        seed_everything(spec.seed)
        data = cache.get(path, cfg, device)
        model = build_model(cfg, data.n_cells)
        if hasattr(model, "prepare"):  # models that set themselves up from the data (e.g. read-out positions)
            model.prepare(data)
        if resume is not None:
            logged = log.logged_steps()
            for row in resume["history"]:  # epochs checkpointed but not yet logged before the interruption
                if row["epoch"] not in logged:
                    log.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            echo(f"run {spec.index} {spec.name}: resuming after epoch {resume['epoch']}")
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=None if cfg["prune"] else cfg["n_epochs"],  # pruning adds epochs past n_epochs
                       initial=resume["epoch"] if resume else 0,
                       desc=f"run {spec.index}/{spec.name}"[:60], unit="epoch", leave=True)

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            if bar is not None:
                bar.set_postfix(loss=f"{m['train_loss']:.4f}", val_r=f"{m['val_pearson']:.3f}")
                bar.update(1)

        trainer = Trainer(model, data, cfg, folder, device, reporter=log, on_epoch=on_epoch)
        result = trainer.fit(resume=resume)
        summary = {"best_val_pearson": result.best_val_pearson, "best_epoch": result.best_epoch,
                   "test_pearson_at_best": result.test_pearson_at_best, "epochs_run": result.epochs_run,
                   "stopped_early": float(result.stopped_early)}
        log.log_metrics(summary, step=result.epochs_run)
        _evaluate_best(trainer, data, folder, result.history, log, echo)
        log.end("FINISHED")
        outcome.status = "FINISHED"
        outcome.best_val_pearson, outcome.test_pearson = result.best_val_pearson, result.test_pearson_at_best
        outcome.best_epoch = result.best_epoch
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated): the latest epoch checkpoint is what resumes
        outcome.status = "KILLED"
        latest = checkpoint.latest(folder)
        if latest is not None:  # upload it again in case the interruption cut the last upload short
            log.checkpoint(latest, checkpoint.LATEST)
        log.end("KILLED")
        raise
    except UserError as exc:
        outcome.error, outcome.user_error = str(exc), True
        log.set_tag("error", outcome.error[:5000])
        log.end("FAILED")
        echo(f"run {spec.index} {spec.name} FAILED: {exc}")
    except Exception as exc:  # a bug, not a user error: keep the traceback for the report
        outcome.error = f"{type(exc).__name__}: {exc}"
        log.set_tag("error", traceback.format_exc()[-5000:])
        log.end("FAILED")
        echo(f"run {spec.index} {spec.name} FAILED:\n{traceback.format_exc()}")
    finally:
        if bar is not None:
            bar.close()
    return outcome


def _skipped(spec: RunSpec, done: Any, echo: Echo) -> RunOutcome:
    """The outcome of a run already FINISHED in the experiment (its summary metrics come from MLflow)."""
    echo(f"run {spec.index} {spec.name}: already FINISHED as {done.run_id}, skipped")
    m = done.metrics
    return RunOutcome(spec, "SKIPPED", run_id=done.run_id, best_val_pearson=m.get("best_val_pearson", math.nan),
                      test_pearson=m.get("test_pearson_at_best", math.nan), best_epoch=int(m.get("best_epoch", 0)))


def _evaluate_best(trainer: Trainer, data: DataBundle, folder: Path, history: list[dict[str, float]], log: Any,
                   echo: Echo) -> None:
    """Score the best checkpoint on the test split (r, reliability, FEVE, CC_norm, truth r) and log the
    per-cell table and plots with the run."""
    from trainer.evaluation.report import evaluate_predictions, write_report

    best = folder / checkpoint.BEST
    if not best.exists():
        return
    trainer.model.load_state_dict(checkpoint.load(best)["model"])
    pred = trainer.as_rates(trainer.predict(data.test)).cpu().numpy().astype(np.float64)
    ev = write_report(evaluate_predictions(pred, data), pred, data, trainer.model, history, folder / "eval")
    log.set_tag("eval_repeats", ev.repeats_note)
    log.log_files(ev.scalars, ev.files)


def _plot_search(outcome: SearchOutcome, tracker: Any, parent_id: str) -> None:
    """Log, on the parent run, the best validation r of every run against each searched hyperparameter."""
    keys = list(outcome.search.searched_keys)
    rows = [{**r.spec.searched, "best_val_pearson": r.best_val_pearson} for r in outcome.runs
            if math.isfinite(r.best_val_pearson)]
    if not keys or not rows:
        return
    from trainer.evaluation.plots import plot_search

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_search(rows, keys, "best_val_pearson", Path(tmp) / "search_best_val_pearson.png")
        tracker.run_log(parent_id).log_files({}, [("plots", path)])


def run_search(search: Search, *, data_root: str | None = None, echo: Echo = print, progress: bool = True,
               files: dict[str, dict[str, Any]] | None = None) -> SearchOutcome:
    """Check, then train every run of `search` that is not already FINISHED, logging to MLflow."""
    from trainer.tracking import FINISHED, Tracker

    paths = preflight(search, data_root)
    tracker = Tracker(search.exp_name)
    parent_id, owns_parent = tracker.parent_run(search.search_id, search.exp_name, len(search.runs),
                                                list(search.searched_keys), files or {})
    outcome = SearchOutcome(search, parent_id, tracker.uri)
    echo(f"search {search.search_id}: {len(search.runs)} runs, experiment '{search.exp_name}' in {tracker.uri}")
    prior = tracker.prior_runs()
    cache = DataCache()
    status = "FINISHED"
    try:
        for spec in search.runs:
            earlier = prior.get(spec.config_id, [])
            done = [p for p in earlier if p.status == FINISHED]
            if done:
                outcome.runs.append(_skipped(spec, done[0], echo))
                continue
            outcome.runs.append(execute(spec, search_id=search.search_id, parent_id=parent_id, tracker=tracker,
                                        prior=earlier, path=paths[spec.index], cache=cache, echo=echo,
                                        progress=progress))
        _plot_search(outcome, tracker, parent_id)
        if outcome.failed:
            status = "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if owns_parent:
            tracker.end_parent(parent_id, status)
    return outcome


def run_index(search: Search, index: int, parent_id: str, *, data_root: str | None = None, echo: Echo = print,
              progress: bool = False) -> RunOutcome:
    """Run run number `index` of `search` as a child of `parent_id` (the pod command of an Indexed Job).

    Skips it if a run with its config id already FINISHED; resumes it from its latest checkpoint if it was
    interrupted; a training failure is reported as a FAILED run (and an error for the caller).
    """
    from trainer.tracking import FINISHED, Tracker

    if not 0 <= index < len(search.runs):
        raise UserError(f"run index {index} is out of range: the search has {len(search.runs)} runs "
                        f"(0..{len(search.runs) - 1}); check completions of the Job against `retina-trainer expand`")
    spec = search.runs[index]
    path = preflight(search, data_root, only=index)[index]
    tracker = Tracker(search.exp_name)
    earlier = tracker.prior_runs().get(spec.config_id, [])
    done = [p for p in earlier if p.status == FINISHED]
    if done:
        outcome = _skipped(spec, done[0], echo)
    else:
        outcome = execute(spec, search_id=search.search_id, parent_id=parent_id, tracker=tracker, prior=earlier,
                          path=path, cache=DataCache(), echo=echo, progress=progress)
    if outcome.status in ("FINISHED", "SKIPPED") and tracker.finish_parent_if_complete(
            parent_id, [r.config_id for r in search.runs]):
        echo(f"every run of search {search.search_id} is FINISHED: parent run {parent_id} marked FINISHED")
    return outcome



def summary_table(outcome: SearchOutcome) -> str:
    """The end-of-search table: run, searched hyperparameters, best validation r, test r, status, MLflow id."""
    keys = list(outcome.search.searched_keys)
    header = ["run", "name"] + keys + ["best_val_r", "test_r", "epoch", "status", "mlflow_run_id"]
    rows = []
    for r in outcome.runs:
        rows.append([str(r.spec.index), r.spec.name] + [search_mod.short_value(r.spec.searched[k]) for k in keys]
                    + [f"{r.best_val_pearson:.3f}", f"{r.test_pearson:.3f}", str(r.best_epoch), r.status,
                       r.run_id])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
