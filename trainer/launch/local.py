"""Run the runs of a search on this machine, one after another, each logged as an MLflow child run.

Before anything trains, every run is checked (its model builds, its recording exists). Runs already FINISHED in
the experiment with the same config id are skipped; an interrupted run resumes from its latest checkpoint in the
same MLflow run. A failing run is marked FAILED and the search goes on; Ctrl-C marks the current run KILLED.
"""

from __future__ import annotations

import math
import os
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import search as search_mod
from trainer.data.recording import load_data, recording_digest, recording_key, recording_path, resolve_data_root
from trainer.data.recording import preflight as recording_preflight
from trainer.data.windows import DataBundle
from trainer.errors import ConfigError, DataError, TrackingUnavailable, UserError
from trainer.models import build_model, prepare_model
from trainer.search import RunSpec, Search
from trainer.training import checkpoint
from trainer.training.trainer import FitResult, Trainer, as_rates, check_trainable, resolve_device

Echo = Callable[[str], None]


PRUNED_TAG = "pruned"  # tag of a run an adaptive search's pruner ended early (trainer/launch/adaptive.py)


@dataclass
class RunOutcome:
    """How one run of the search ended, for the summary table."""

    spec: RunSpec
    status: str  # FINISHED | FAILED | KILLED | SKIPPED | BUSY (another process trains it)
    run_id: str = ""
    best_val_pearson: float = math.nan
    test_pearson: float = math.nan
    best_epoch: int = 0
    error: str = ""
    user_error: bool = False  # the failure is one a retry cannot fix (bad input, diverged training)
    epochs_run: int = 0
    pruned_epoch: int = 0  # ended by an adaptive search's pruner after this epoch (the run is FINISHED)


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


def provenance(device: torch.device) -> dict[str, str]:
    """What made a run, as tags: the package version and git commit (when known), torch and CUDA, the device
    (its name for a GPU), the host, and on Kubernetes the image, pod and node (env vars the rendered Job sets)."""
    from trainer import __version__

    tags = {"retina_trainer.version": __version__, "torch.version": torch.__version__,
            "cuda.version": torch.version.cuda or "none", "host": socket.gethostname(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for env, tag in (("RETINA_IMAGE", "image"), ("POD_NAME", "k8s.pod"), ("NODE_NAME", "k8s.node")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


_COMMIT: list[str | None] = []


def _git_commit() -> str | None:
    """$RETINA_GIT_COMMIT (an image sets it when built), else the commit of the checkout this package runs from
    (with -dirty when it has uncommitted changes), else None."""
    if not _COMMIT:
        commit = os.environ.get("RETINA_GIT_COMMIT") or None
        repo = Path(__file__).resolve().parents[2]
        if commit is None and (repo / ".git").exists():
            import subprocess

            try:
                head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                      timeout=10)
                dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=10)
                if head.returncode == 0:
                    commit = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
            except (OSError, subprocess.SubprocessError):
                commit = None
        _COMMIT.append(commit)
    return _COMMIT[0]


def run_dir(spec: RunSpec) -> Path:
    """The seed's model folder: <save_root>/<exp_name>/<run name>/."""
    return Path(spec.config["save_root"]).expanduser() / spec.config["exp_name"] / spec.name


def preflight(search: Search, data_root: str | None, only: int | None = None,
              cache: DataCache | None = None) -> dict[int, Path]:
    """Check every run (or run `only`) before any trains or any MLflow run exists: the recording exists, fits and
    holds valid values (read in full once, into `cache`, which the first run then uses), the model builds and
    takes the run's loop and pruning, the device exists, and the run folders can be written."""
    paths: dict[int, Path] = {}
    checked: dict[tuple[Any, ...], int] = {}
    specs = search.runs if only is None else [search.runs[only]]
    for spec in specs:
        cfg = spec.config
        root = resolve_data_root(data_root or cfg["data_root"])
        path = recording_path(root, cfg["dataset"], cfg["stim_type"])
        if not path.is_file():
            raise DataError(f"run {spec.index} ({spec.name}): recording not found: {path}; check --data-root, "
                            f"data_root or $RETINA_DATA_ROOT, dataset and stim_type, or make one with "
                            f"`retina-trainer data synth {root}`")
        try:
            key = recording_key(path, cfg)
            if key not in checked:
                checked[key] = recording_preflight(path, cells=cfg["cells"], img_shape=cfg["img_shape"],
                                                   val_frac=cfg["val_frac"], val_size=cfg["val_size"])
            check_trainable(build_model(cfg, checked[key]), cfg)
            resolve_device(cfg["device"])
            if cfg["analysis_interneurons"] and cfg["analysis"] != "none" and \
                    not Path(cfg["analysis_interneurons"]).expanduser().exists():
                raise ConfigError(f"analysis_interneurons: {cfg['analysis_interneurons']} does not exist; give an "
                                  "interneuron h5 file or a folder of them, or null")
        except UserError as exc:
            raise type(exc)(f"run {spec.index} ({spec.name}): {exc}") from None
        paths[spec.index] = path
    cache = cache if cache is not None else DataCache()
    n_train: dict[tuple[Any, ...], int] = {}
    for spec in reversed(specs):  # the values of every recording; the first run's stays in the cache
        cfg = spec.config
        key = recording_key(paths[spec.index], cfg)  # with val_size (a search over val_size has other counts)
        try:
            if key not in n_train:
                n_train[key] = len(cache.get(paths[spec.index], cfg, resolve_device(cfg["device"])).train)
            if cfg["batch_size"] > n_train[key]:
                raise ConfigError(f"batch_size {cfg['batch_size']} is larger than the {n_train[key]} training samples "
                                  "of the recording (training uses full batches only); lower batch_size")
        except UserError as exc:
            raise type(exc)(f"run {spec.index} ({spec.name}): {exc}") from None
    for folder in sorted({run_dir(spec).parent for spec in specs}):
        check_writable(folder)
    return paths


def check_writable(folder: Path) -> None:
    """A UserError unless run folders can be made in `folder` (save_root/exp_name): probed by making it and a file
    in it, then removing what the probe made, so a failed check leaves nothing behind."""
    made: list[Path] = []
    try:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        for p in reversed(missing):
            try:
                p.mkdir()
                made.append(p)
            except FileExistsError:  # made by another process a moment ago
                pass
        if not folder.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"save_root: cannot write run folders in {folder} ({exc.strerror or exc}); set save_root "
                        "to a writable folder") from None
    finally:
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass


class DataCache:
    """Keeps the last recording loaded, so consecutive runs on the same data do not read it again."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.bundle: DataBundle | None = None

    def get(self, path: Path, cfg: dict[str, Any], device: torch.device) -> DataBundle:
        key = (*recording_key(path, cfg), str(device))
        if key != self.key:
            self.bundle = None  # free the previous recording before reading the next
            self.bundle = load_data(path, cells=cfg["cells"], img_shape=cfg["img_shape"],
                                    val_frac=cfg["val_frac"], val_size=cfg["val_size"], device=device)
            self.key = key
        assert self.bundle is not None
        return self.bundle


def _resume_state(spec: RunSpec, folder: Path, log: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest readable checkpoint of an interrupted run (its local folder or its MLflow artifact) that
    belongs to this run's configuration, or None; and what was found unreadable, one line each."""
    best: dict[str, Any] | None = None
    unreadable: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        candidates = [(checkpoint.latest(folder), "local"),
                      (log.download_checkpoint(checkpoint.LATEST, Path(tmp)), "MLflow artifact")]
        for path, where in candidates:
            if path is None:
                continue
            try:
                state = checkpoint.load(path)
            except Exception as exc:  # a checkpoint cut short by a kill: fall back to the other copy
                unreadable.append(f"the {where} checkpoint {path if where == 'local' else 'checkpoints/latest.pt'} "
                                  f"is unreadable ({type(exc).__name__})")
                continue
            if search_mod.config_id(state["config"]) != spec.config_id:
                continue
            if best is None or state["epoch"] > best["epoch"]:
                best = state
    return best, unreadable


@dataclass
class _Member:
    """One run of a group being trained: its MLflow run, folder, checkpoint to resume and, once built, Trainer."""

    spec: RunSpec
    log: Any
    folder: Path
    resume: dict[str, Any] | None
    outcome: RunOutcome
    trainer: Trainer | None = None
    ended: bool = False


def _open_run(spec: RunSpec, *, search_id: str, parent_id: str, tracker: Any, echo: Echo,
              wait: bool = False) -> _Member | RunOutcome:
    """The run's MLflow child (an interrupted one reopened, with the checkpoint it resumes from) and folder; or the
    outcome of a run not to train here. The store is asked now, not when the search began: a run another process
    FINISHED meanwhile is skipped, and one another process trains (a live lease, see trainer/tracking.py) is
    skipped, or with `wait` (a Kubernetes pod) waited for."""
    from trainer.tracking import FINISHED, HEARTBEAT_S

    while True:
        prior = tracker.prior_runs(spec.config_id).get(spec.config_id, [])
        done = [p for p in prior if p.status == FINISHED]
        if done:
            return _skipped(spec, done[0], echo)
        holder = next((h for p in prior if (h := p.held_elsewhere())), None)
        if holder is None:
            break
        if not wait:
            echo(f"run {spec.index} {spec.name}: another process trains it ({holder}); skipped here")
            return RunOutcome(spec, "BUSY")
        echo(f"run {spec.index} {spec.name}: another process trains it ({holder}); waiting")
        time.sleep(HEARTBEAT_S)
    folder = run_dir(spec)
    unfinished = [p for p in prior if p.status in ("RUNNING", "FAILED", "KILLED", "SCHEDULED")]
    log, resume = None, None
    if unfinished:
        reopened = tracker.reopen_child(unfinished[0].run_id)
        if isinstance(reopened, str):  # another process reopened it at the same moment, first
            if wait:  # a pod: ask again (it finds the run FINISHED, or waits for the other's lease)
                return _open_run(spec, search_id=search_id, parent_id=parent_id, tracker=tracker, echo=echo,
                                 wait=wait)
            echo(f"run {spec.index} {spec.name}: another process trains it ({reopened}); skipped here")
            return RunOutcome(spec, "BUSY")
        log = reopened
        resume, unreadable = _resume_state(spec, folder, log)
        what = "; ".join(unreadable)
        if resume is None:
            why = f"{what}: nothing to resume from" if what else "no checkpoint of this configuration to resume from"
            log.set_tag("error", why)
            log.end("FAILED")
            log = None
            echo(f"run {spec.index} {spec.name}: {why}; its earlier MLflow run {unfinished[0].run_id} is marked "
                 "FAILED and the run starts again from epoch 0")
        elif what:
            echo(f"run {spec.index} {spec.name}: {what}; resuming from the other copy (epoch {resume['epoch']})")
    if log is None:
        log = tracker.start_child(parent_id, search_id, spec.index, spec.name, spec.config_id, spec.config)
        holder = tracker.claim(log, spec.config_id)
        if holder is not None:  # another process opened it at the same moment, first
            echo(f"run {spec.index} {spec.name}: another process trains it ({holder}); skipped here")
            return RunOutcome(spec, "BUSY")
    return _Member(spec, log, folder, resume, RunOutcome(spec, "FAILED", run_id=log.run_id))


def _build(m: _Member, data: DataBundle, device: torch.device, echo: Echo,
           on_epoch: Callable[[int, dict[str, float]], None] | None,
           stop_check: Callable[[int, dict[str, float]], bool] | None = None) -> Trainer:
    """The member's model (seeded by its own seed, so its initial weights are those of the run alone) and Trainer;
    epochs it had checkpointed but not logged before an interruption are logged now."""
    spec, cfg = m.spec, m.spec.config
    m.folder.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)
    model = build_model(cfg, data.n_cells)
    prepare_model(model, cfg, data)  # read-out positions, initial output rates
    m.log.log_params({"cell_ids": data.cell_ids, "cells_source": data.cells_source})
    m.log.set_tags(provenance(device))
    m.log.log_recording(data.path, cfg["dataset"], cfg["stim_type"], recording_digest(data.path), cfg["val_frac"])
    m.log.start_system_metrics(resumed=m.resume is not None)
    if m.resume is not None:
        logged = m.log.logged_steps()
        for row in m.resume["history"]:
            if row["epoch"] not in logged:
                m.log.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        echo(f"run {spec.index} {spec.name}: resuming after epoch {m.resume['epoch']}")
    return Trainer(model, data, cfg, m.folder, device, reporter=m.log, on_epoch=on_epoch, stop_check=stop_check)


def _finish(m: _Member, result: FitResult, data: DataBundle, echo: Echo, plots: bool = True) -> None:
    """Log the run's summary and the evaluation of its best checkpoint, and end it FINISHED."""
    assert m.trainer is not None
    summary = {"best_val_pearson": result.best_val_pearson, "best_epoch": result.best_epoch,
               "test_pearson_at_best": result.test_pearson_at_best, "epochs_run": result.epochs_run,
               "stopped_early": float(result.stopped_early)}
    if result.history:  # the original's headline figure: the test r of the last epoch trained
        summary["test_pearson_last"] = result.history[-1]["test_pearson"]
    if result.pruned_epoch:  # an adaptive search's pruner ended it: FINISHED, with its best checkpoint so far
        summary["pruned_epoch"] = result.pruned_epoch
        m.log.set_tag(PRUNED_TAG, f"pruned after epoch {result.pruned_epoch} of {m.spec.config['n_epochs']} by the "
                                  "search's pruner (its validation r was behind the other trials')")
    m.log.log_metrics(summary, step=result.epochs_run, once=True)
    _evaluate_best(m, data, result.history, echo, plots)
    from trainer.inference import LoadedModel

    # the weights just evaluated (the best epoch's) as the run's MLflow Model, which `register` registers
    m.log.log_model(LoadedModel(model=m.trainer.model, config=m.trainer.cfg, mean=data.stim_mean, std=data.stim_std,
                                cell_ids=list(data.cell_ids), epoch=result.best_epoch, source=m.log.run_id))
    _analyze(m, data, echo, plots)
    m.log.end("FINISHED")
    m.ended = True
    m.outcome.status = "FINISHED"
    m.outcome.best_val_pearson, m.outcome.test_pearson = result.best_val_pearson, result.test_pearson_at_best
    m.outcome.best_epoch = result.best_epoch
    m.outcome.epochs_run, m.outcome.pruned_epoch = result.epochs_run, result.pruned_epoch


ANALYSIS_ERROR_TAG = "analysis_error"


def _analyze(m: _Member, data: DataBundle, echo: Echo, plots: bool) -> None:
    """The run's analyses (its `analysis` setting) on the evaluated weights, logged with it: metrics
    analysis_*, files under analysis/ and plots/analysis/. A failing analysis is a tag and a warning: the run's
    training results stand and it ends FINISHED."""
    from trainer import analysis

    names = analysis.selection(m.spec.config["analysis"])
    if not names:
        return
    from trainer.analysis.run import Model, analyze

    cfg = m.spec.config
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = analyze(Model(m.trainer.model, cfg, list(data.cell_ids), data.stim_mean, data.stim_std),
                             Path(tmp), names, recording=data.path,
                             interneurons=[Path(cfg["analysis_interneurons"])] if cfg["analysis_interneurons"]
                             else None, plots=plots, source=m.log.run_id)
            m.log.log_files(report.metrics, report.files)
        if report.skipped:
            m.log.set_tag("analysis_skipped", "; ".join(f"{k}: {v}" for k, v in report.skipped.items())[:5000])
        echo(f"run {m.spec.index} {m.spec.name}: analysis ({', '.join(report.seconds)}) in "
             f"{report.metrics['analysis_seconds']:.1f} s")
    except (KeyboardInterrupt, TrackingUnavailable):
        raise
    except Exception as exc:  # the training and its evaluation are logged: keep them
        why = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        m.log.set_tag(ANALYSIS_ERROR_TAG, why[:5000])
        echo(f"warning: run {m.spec.index} {m.spec.name}: its analysis failed ({why.splitlines()[0] if why else ''}); "
             "the run's training and evaluation are logged and it ends FINISHED; `retina-trainer analyze "
             f"{m.log.run_id}` runs the analysis again")


def _fail(m: _Member, exc: BaseException, echo: Echo, tb: str | None = None) -> None:
    """End the run FAILED: a user error with its one line, anything else (a bug) with its traceback."""
    spec = m.spec
    if isinstance(exc, UserError):
        m.outcome.error, m.outcome.user_error = str(exc), True
        m.log.set_tag("error", m.outcome.error[:5000])
        echo(f"run {spec.index} {spec.name} FAILED: {exc}")
    else:
        tb = tb or "".join(traceback.format_exception(exc))
        m.outcome.error = f"{type(exc).__name__}: {exc}"
        m.log.set_tag("error", tb[-5000:])
        echo(f"run {spec.index} {spec.name} FAILED:\n{tb}")
    m.log.end("FAILED")
    m.ended = True


def _kill(m: _Member) -> None:
    """End an interrupted run KILLED; its latest epoch checkpoint is what resumes it."""
    m.outcome.status = "KILLED"
    latest = checkpoint.latest(m.folder)
    if latest is not None:  # upload it again in case the interruption cut the last upload short
        m.log.checkpoint(latest, checkpoint.LATEST)
    m.log.end("KILLED")
    m.ended = True


def execute(spec: RunSpec, *, search_id: str, parent_id: str, tracker: Any, path: Path,
            cache: DataCache, echo: Echo, progress: bool = True, plots: bool = True) -> RunOutcome:
    """Train one run (or resume it), logging it as a child of `parent_id`; never raises for a failed run."""
    return execute_pack([spec], search_id=search_id, parent_id=parent_id, tracker=tracker,
                        path=path, cache=cache, echo=echo, progress=progress,
                        plots=plots)[0]


def execute_pack(specs: list[RunSpec], *, search_id: str, parent_id: str, tracker: Any,
                 path: Path, cache: DataCache, echo: Echo, progress: bool = True,
                 plots: bool = True, wait: bool = False,
                 stop_check: Callable[[int, dict[str, float]], bool] | None = None) -> list[RunOutcome]:
    """Train a group of runs that share recording and architecture (or resume them), each logged as a child of
    `parent_id`: one run alone with its own Trainer, several packed on one batch stream (trainer/training/packed.py).
    A failing run ends FAILED and the others go on; Ctrl-C or SIGTERM ends the unfinished ones KILLED and
    propagates. Never raises for a failed run. With `plots` false, the final evaluation logs its scores and
    table but no plots. Runs finished or trained by another process meanwhile are left out (see _open_run).
    `stop_check` (one run only: an adaptive search's trial) is asked after each epoch whether to end the run there."""
    if stop_check is not None and len(specs) != 1:
        raise ValueError("stop_check applies to a group of one run")
    opened = [_open_run(s, search_id=search_id, parent_id=parent_id, tracker=tracker, echo=echo, wait=wait)
              for s in specs]
    members = [m for m in opened if isinstance(m, _Member)]
    if not members:
        return [o for o in opened if isinstance(o, RunOutcome)]
    specs = [m.spec for m in members]
    cfg = specs[0].config
    for m in members:
        echo(f"run {m.spec.index} {m.spec.name}: MLflow run {m.log.run_id} {tracker.run_url(m.log.run_id)}")
    bar = None
    # A progress bar on a terminal; else (a pod, `mlflow run`, a log file) one line per epoch.
    progress = progress and sys.stderr.isatty()
    try:
        device = resolve_device(cfg["device"])
        data = cache.get(path, cfg, device)
        if progress:
            from tqdm import tqdm

            desc = f"run {specs[0].index}/{specs[0].name}" if len(specs) == 1 else \
                f"pack of {len(specs)}: runs {', '.join(str(s.index) for s in specs)}"
            bar = tqdm(total=None if cfg["prune"] else max(s.config["n_epochs"] for s in specs),  # pruning adds epochs
                       initial=min(m.resume["epoch"] if m.resume else 0 for m in members),
                       desc=desc[:60], unit="epoch", leave=True)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", val_r=f"{metrics['val_pearson']:.3f}")
                bar.update(1)

        def epoch_line(spec: RunSpec) -> Callable[[int, dict[str, float]], None]:
            def line(epoch: int, metrics: dict[str, float]) -> None:
                echo(f"run {spec.index} {spec.name}: epoch {epoch}/{spec.config['n_epochs']} train_loss "
                     f"{metrics['train_loss']:.4f} val_loss {metrics['val_loss']:.4f} val_r "
                     f"{metrics['val_pearson']:.3f} ({metrics['epoch_seconds']:.1f} s)")
            return line

        def on_pack_epoch(reported: list[dict[str, float]]) -> None:
            if bar is not None and reported:
                bar.set_postfix(runs=len(reported), best_val_r=f"{max(r['val_pearson'] for r in reported):.3f}")
                bar.update(1)

        for m in members:
            try:
                m.trainer = _build(m, data, device, echo, epoch_line(m.spec) if bar is None else
                                   on_epoch if len(members) == 1 else None, stop_check)
            except (UserError, RuntimeError, ValueError) as exc:  # this run's settings; the others may be fine
                _fail(m, exc, echo)
        live = [m for m in members if not m.ended]
        if len(live) == 1:
            m = live[0]
            result = m.trainer.fit(resume=m.resume)
            if bar is not None:  # before the evaluation, so the bar ends at its last epoch
                bar.close()
                bar = None
            _finish(m, result, data, echo, plots)
        elif live:
            from trainer.training.packed import PackedTrainer

            names = ", ".join(s.name for s in specs)
            for m in live:  # MLflow tag values hold at most 5,000 characters
                m.log.set_tag("pack", names if len(names) <= 5000 else names[:4990] + ", ...")

            def on_done(i: int, result: FitResult | Exception) -> None:
                m = live[i]
                try:
                    if isinstance(result, Exception):
                        raise result
                    _finish(m, result, data, echo, plots)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:
                    if not m.ended:
                        _fail(m, exc, echo)

            PackedTrainer([m.trainer for m in live], on_epoch=on_pack_epoch).fit([m.resume for m in live], on_done)
    except TrackingUnavailable as exc:  # nothing more can be logged: stop, keep the local checkpoints
        folders = ", ".join(str(m.folder) for m in members)
        raise TrackingUnavailable(f"{exc}; training stopped, the local checkpoints are in {folders}; run the same "
                                  "command again once the server is back and the runs resume") from None
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated): each run's latest epoch checkpoint resumes it
        for m in members:
            if not m.ended:
                _kill(m)
        raise
    except Exception as exc:  # the shared part failed (recording, device, the pack itself): every open run fails
        tb = traceback.format_exc()
        for m in members:
            if not m.ended:
                _fail(m, exc, echo, tb)
    finally:
        if bar is not None:
            bar.close()
    return [o if isinstance(o, RunOutcome) else o.outcome for o in opened]


def _skipped(spec: RunSpec, done: Any, echo: Echo) -> RunOutcome:
    """The outcome of a run already FINISHED in the experiment (its summary metrics come from MLflow)."""
    echo(f"run {spec.index} {spec.name}: already FINISHED as {done.run_id}, skipped")
    m = done.metrics
    return RunOutcome(spec, "SKIPPED", run_id=done.run_id, best_val_pearson=m.get("best_val_pearson", math.nan),
                      test_pearson=m.get("test_pearson_at_best", math.nan), best_epoch=int(m.get("best_epoch", 0)),
                      epochs_run=int(m.get("epochs_run", 0)), pruned_epoch=int(m.get("pruned_epoch", 0)))


def _evaluate_best(m: _Member, data: DataBundle, history: list[dict[str, float]], echo: Echo,
                   plots: bool = True) -> None:
    """Score the best checkpoint on the test split (r, reliability, FEVE, CC_norm, truth r) and log the
    per-cell table and plots with the run. An unreadable best.pt (cut short by a kill) is said in one line and
    the latest epoch's weights are scored instead, so the run can still finish."""
    from trainer.evaluation.report import evaluate_predictions, write_report

    trainer, folder, log = m.trainer, m.folder, m.log
    best = folder / checkpoint.BEST
    if not best.exists():
        return
    try:
        trainer.model.load_state_dict(checkpoint.load(best)["model"])
        scored = "best"
    except Exception as exc:  # a truncated or foreign file: the model holds the latest epoch's weights
        scored = f"latest epoch ({best} unreadable: {type(exc).__name__})"
        echo(f"run {m.spec.index} {m.spec.name}: {best} is unreadable ({type(exc).__name__}); evaluating the latest "
             "epoch's weights instead")
    pred = as_rates(trainer.cfg, trainer.predict(data.test)).cpu().numpy().astype(np.float64)
    ev = write_report(evaluate_predictions(pred, data), pred, data, trainer.model, history, folder / "eval",
                      plots_too=plots)
    log.set_tag("eval_repeats", ev.repeats_note)
    log.set_tag("eval_checkpoint", scored)
    log.log_files(ev.scalars, ev.files)
    from trainer.evaluation.metrics import per_cell_columns

    log.log_table(per_cell_columns(ev.result, data.cell_ids), "eval/per_cell_table.json")


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
               files: dict[str, dict[str, Any]] | None = None, pack: int = 1, plots: bool = True) -> SearchOutcome:
    """Check, then train every run of `search` that is not already FINISHED, logging to MLflow.

    With `pack` > 1, runs that differ only in optimiser settings, stopping rule and seed train up to `pack` at a
    time on one batch stream (`trainer.search.plan_packs`); the others train alone."""
    from trainer.tracking import FINISHED, Tracker

    if pack < 1:
        raise UserError(f"--pack must be at least 1, got {pack}: 1 trains runs one at a time")
    cache = DataCache()
    paths = preflight(search, data_root, cache=cache)
    tracker = Tracker(search.exp_name)
    parent_id, owns_parent = tracker.parent_run(search.search_id, search.exp_name, len(search.runs),
                                                list(search.searched_keys), files or {})
    outcome = SearchOutcome(search, parent_id, tracker.uri)
    echo(f"search {search.search_id}: {search_mod.plural(len(search.runs), 'run')}, experiment '{search.exp_name}' "
         f"in {tracker.uri}")
    prior = tracker.prior_runs()
    pending = []
    for spec in search.runs:
        done = [p for p in prior.get(spec.config_id, []) if p.status == FINISHED]
        if done:
            outcome.runs.append(_skipped(spec, done[0], echo))
        else:
            pending.append(spec)
    if not pending:  # an earlier parent keeps its status and end time
        echo(f"search {search.search_id}: every run is FINISHED already; nothing to train")
        made_now = owns_parent and tracker.client.get_run(parent_id).info.status == "RUNNING"
        if made_now or not owns_parent:  # a parent of this call (ours, or `mlflow run`'s): say where the runs are
            tracker.note(parent_id, f"Nothing trained: every run of search {search.search_id} had FINISHED before "
                                    f"(filter the runs with tags.search_id = '{search.search_id}').")
        if made_now:
            tracker.end_parent(parent_id, "FINISHED")
        owns_parent = False
    elif owns_parent:
        tracker.reopen_parent(parent_id)
    packs = search_mod.plan_packs(pending, pack)
    if pack > 1:
        sizes = [len(p) for p in packs]
        echo(f"{search_mod.plural(len(pending), 'run')} to train in {search_mod.plural(len(packs), 'pack')} (largest "
             f"{max(sizes, default=0)}; runs that "
             f"differ in more than optimiser settings, stopping rule and seed, or prune, train_loop "
             f"retinotopic_loop or compile, train alone)")
    status = "FINISHED"
    try:
        for group in packs:
            outcome.runs.extend(execute_pack(group, search_id=search.search_id, parent_id=parent_id,
                                             tracker=tracker, path=paths[group[0].index], cache=cache,
                                             echo=echo, progress=progress, plots=plots))
        outcome.runs.sort(key=lambda r: r.spec.index)
        if plots:
            _plot_search(outcome, tracker, parent_id)
        if outcome.failed:
            status = "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except TrackingUnavailable:
        owns_parent = False  # the server cannot be told; a rerun reopens the parent
        raise
    finally:
        if owns_parent:
            tracker.end_parent(parent_id, status)
    return outcome


def run_index(search: Search, index: int, parent_id: str, *, data_root: str | None = None, echo: Echo = print,
              progress: bool = False, pack: int = 1, plots: bool = True) -> list[RunOutcome]:
    """Run run number `index` of `search` as a child of `parent_id` (the pod command of an Indexed Job); with
    `pack` > 1, `index` numbers the packs of `plan_packs(search.runs, pack)` and the pack's runs train together.

    Runs whose config id already FINISHED are skipped; interrupted ones resume from their latest checkpoint; a
    training failure is reported as a FAILED run (and an error for the caller). The outcomes in run order.
    """
    from trainer.tracking import FINISHED, Tracker

    if pack < 1:
        raise UserError(f"--pack must be at least 1, got {pack}")
    groups = search_mod.plan_packs(search.runs, pack)
    if not 0 <= index < len(groups):
        what = f"{len(search.runs)} runs" if pack == 1 else f"{len(groups)} packs of at most {pack} runs"
        raise UserError(f"{'run' if pack == 1 else 'pack'} index {index} is out of range: the search has {what} "
                        f"(0..{len(groups) - 1}); check completions of the Job against `retina-trainer k8s render`")
    group = groups[index]
    cache = DataCache()
    paths = {s.index: preflight(search, data_root, only=s.index, cache=cache)[s.index] for s in group}
    tracker = Tracker(search.exp_name)
    tracker.check_parent(parent_id, search.search_id)
    prior = tracker.prior_runs()
    outcomes: list[RunOutcome] = []
    todo: list[RunSpec] = []
    for spec in group:
        done = [p for p in prior.get(spec.config_id, []) if p.status == FINISHED]
        if done:
            outcomes.append(_skipped(spec, done[0], echo))
        else:
            todo.append(spec)
    if todo:
        outcomes += execute_pack(todo, search_id=search.search_id, parent_id=parent_id, tracker=tracker,
                                 path=paths[todo[0].index], cache=cache, echo=echo, wait=True,
                                 progress=progress, plots=plots)
    outcomes.sort(key=lambda r: r.spec.index)
    if all(o.status in ("FINISHED", "SKIPPED") for o in outcomes) and tracker.finish_parent_if_complete(
            parent_id, [r.config_id for r in search.runs]):
        echo(f"every run of search {search.search_id} is FINISHED: parent run {parent_id} marked FINISHED")
    return outcomes


def summary_table(outcome: SearchOutcome) -> str:
    """The end-of-search table: run, searched hyperparameters, best validation r, test r, status, MLflow id."""
    keys = list(outcome.search.searched_keys)
    header = ["run", "name"] + keys + ["best_val_r", "test_r", "best_epoch", "status", "mlflow_run_id"]
    rows = []
    for r in outcome.runs:
        rows.append([str(r.spec.index), r.spec.name] + [search_mod.short_value(r.spec.searched[k]) for k in keys]
                    + [f"{r.best_val_pearson:.3f}", f"{r.test_pearson:.3f}", str(r.best_epoch), r.status,
                       r.run_id])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
