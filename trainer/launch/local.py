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


def preflight(search: Search, data_root: str | None) -> dict[int, Path]:
    """Check every run before any trains: recording exists and fits (shape, cells, length), model builds."""
    paths: dict[int, Path] = {}
    checked: dict[tuple[Any, ...], int] = {}
    for spec in search.runs:
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
    """The latest checkpoint of an interrupted run (local folder first, else its MLflow artifact), if it matches."""
    candidates: list[Path] = []
    local = checkpoint.latest(folder)
    if local is not None:
        candidates.append(local)
    with tempfile.TemporaryDirectory() as tmp:
        if not candidates:
            remote = log.download_checkpoint(checkpoint.LATEST, Path(tmp))
            if remote is not None:
                candidates.append(remote)
        for path in candidates:
            state = checkpoint.load(path)
            if search_mod.config_id(state["config"]) == spec.config_id:
                return state
    return None


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
        if resume is not None:
            logged = log.logged_steps()
            for row in resume["history"]:  # epochs checkpointed but not yet logged before the interruption
                if row["epoch"] not in logged:
                    log.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            echo(f"run {spec.index} {spec.name}: resuming after epoch {resume['epoch']}")
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg["n_epochs"], initial=resume["epoch"] if resume else 0,
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
        log.end("FINISHED")
        outcome.status = "FINISHED"
        outcome.best_val_pearson, outcome.test_pearson = result.best_val_pearson, result.test_pearson_at_best
        outcome.best_epoch = result.best_epoch
    except KeyboardInterrupt:
        log.end("KILLED")
        outcome.status = "KILLED"
        raise
    except UserError as exc:
        outcome.error = str(exc)
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
                m = done[0].metrics
                outcome.runs.append(RunOutcome(spec, "SKIPPED", run_id=done[0].run_id,
                                               best_val_pearson=m.get("best_val_pearson", math.nan),
                                               test_pearson=m.get("test_pearson_at_best", math.nan),
                                               best_epoch=int(m.get("best_epoch", 0))))
                echo(f"run {spec.index} {spec.name}: already FINISHED as {done[0].run_id}, skipped")
                continue
            outcome.runs.append(execute(spec, search_id=search.search_id, parent_id=parent_id, tracker=tracker,
                                        prior=earlier, path=paths[spec.index], cache=cache, echo=echo,
                                        progress=progress))
        if outcome.failed:
            status = "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if owns_parent:
            tracker.end_parent(parent_id, status)
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
