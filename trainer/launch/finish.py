"""`retina-trainer k8s status` and `k8s finish`: a Kubernetes search's state, read from MLflow alone.

An Indexed Job's pods each train their runs and the pod that finishes the search's last run closes the parent run;
when an index fails for good, nobody does, and the parent never gets the search plot or a results table.
`read_state` reads every run of the search from the tracking server (by config id, as the pods skip runs by
it); `finish` logs the summary table and the search plot to the parent run and ends it FINISHED (every run done)
or FAILED (naming the runs that are not). Everything is read before anything is written, so a failure on the way
leaves the parent as it was and the same command can be run again. `delete` removes the search's Job and
ConfigMap with kubectl, or says how.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.launch.k8s import SEARCH_ID_LABEL
from trainer.search import Search

Echo = Callable[[str], None]

PENDING = "PENDING"  # no MLflow run yet: the index has not started (queued, suspended, or never scheduled)
LOST = "LOST"  # RUNNING in MLflow, but nobody holds its lease any more: the pod is gone
RUNNING = "RUNNING"  # a pod trains it right now (a live lease)
SUMMARY_FILE = "search_summary.txt"
PLOT_FILE = "search_best_val_pearson.png"  # the name `search` logs its plot under, so a rerun replaces it
CLOSED_BY = "retina-trainer k8s finish"


def read_tracker(exp_name: str) -> Any:
    """A Tracker for an experiment that must already exist (status and finish create nothing)."""
    from trainer.tracking import Tracker

    return Tracker(exp_name, create=False)


@dataclass
class SearchState:
    """Where every run of a search stands: its RunOutcome (FINISHED, FAILED, KILLED, RUNNING, LOST or PENDING),
    and for each run that is not FINISHED, why."""

    outcome: Any  # trainer.launch.local.SearchOutcome
    parent_status: str
    why: dict[int, str] = field(default_factory=dict)

    @property
    def search(self) -> Search:
        return self.outcome.search

    @property
    def parent_id(self) -> str:
        return self.outcome.parent_run_id

    def with_status(self, *statuses: str) -> list[Any]:
        return [r for r in self.outcome.runs if r.status in statuses]

    @property
    def unfinished(self) -> list[Any]:
        return [r for r in self.outcome.runs if r.status != "FINISHED"]

    def counts(self) -> str:
        order = ["FINISHED", RUNNING, "FAILED", "KILLED", LOST, PENDING]
        n = {s: len(self.with_status(s)) for s in order}
        return ", ".join(f"{n[s]} {s}" for s in order if n[s] or s == "FINISHED")


def find_parent(tracker: Any, search: Search, parent_run_id: str | None) -> Any:
    """The search's parent run: the one given (checked), else the one `k8s render` made (tags role=search and
    search_id; the earliest if there were two)."""
    from trainer.tracking import ROLE, SEARCH_ID

    if parent_run_id:
        try:
            run = tracker.client.get_run(parent_run_id)
        except Exception as exc:
            if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise UserError(f"parent run '{parent_run_id}' not found in {tracker.uri}: pass the id `k8s render` "
                            "printed (the Job's RETINA_PARENT_RUN_ID)") from None
        if run.info.experiment_id != tracker.experiment_id or run.data.tags.get(SEARCH_ID) != search.search_id:
            raise UserError(f"run '{parent_run_id}' is not the parent run of search {search.search_id} in experiment "
                            f"'{search.exp_name}': pass the files the Job was rendered from, or its parent run id")
        return run
    found = tracker.client.search_runs([tracker.experiment_id],
                                       f"tags.{ROLE} = 'search' and tags.{SEARCH_ID} = '{search.search_id}'",
                                       max_results=100)
    if not found:
        raise UserError(f"no parent run of search {search.search_id} in experiment '{search.exp_name}' at "
                        f"{tracker.uri}: render the search against this server first, or pass --parent-run-id")
    return min(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _first_line(text: str, limit: int = 160) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def read_state(tracker: Any, search: Search, parent_run_id: str | None = None) -> SearchState:
    """Every run of `search` as MLflow has it (reads only). A run FINISHED under any child run of the experiment
    with its config id counts as done, as the pods skip it."""
    from trainer.launch.local import RunOutcome, SearchOutcome
    from trainer.tracking import FINISHED

    parent = find_parent(tracker, search, parent_run_id)
    prior = tracker.prior_runs()
    outcome = SearchOutcome(search, parent.info.run_id, tracker.uri)
    why: dict[int, str] = {}
    for spec in search.runs:
        runs = prior.get(spec.config_id, [])
        done = [p for p in runs if p.status == FINISHED]
        latest = done[0] if done else (runs[0] if runs else None)
        if latest is None:
            outcome.runs.append(RunOutcome(spec, PENDING))
            why[spec.index] = "not started"
            continue
        m = latest.metrics
        status = latest.status
        if status == "RUNNING":
            holder = latest.held_elsewhere()
            status = RUNNING if holder else LOST
            why[spec.index] = (f"training ({holder})" if holder else
                               "RUNNING in MLflow but nobody holds its lease: its pod is gone; a retry of the "
                               "index resumes it from its checkpoint")
        elif status != FINISHED:
            error = tracker.client.get_run(latest.run_id).data.tags.get("error", "")
            why[spec.index] = f"{status}: {_first_line(error)}" if error else status
        outcome.runs.append(RunOutcome(spec, status, run_id=latest.run_id,
                                       best_val_pearson=m.get("best_val_pearson", math.nan),
                                       test_pearson=m.get("test_pearson_at_best", math.nan),
                                       best_epoch=int(m.get("best_epoch", 0))))
    return SearchState(outcome, parent.info.status, why)


def report(state: SearchState) -> list[str]:
    """The summary table, one line per run that is not FINISHED (why), and a last line of counts."""
    from trainer.launch.local import summary_table

    lines = [summary_table(state.outcome)]
    for r in state.unfinished:
        lines.append(f"run {r.spec.index} {r.spec.name}: {state.why.get(r.spec.index, r.status)}")
    lines.append(f"search {state.search.search_id} ({len(state.outcome.runs)} runs): {state.counts()}; parent run "
                 f"{state.parent_id} is {state.parent_status}")
    return lines


def _plot(state: SearchState, folder: Path) -> Path | None:
    keys = list(state.search.searched_keys)
    rows = [{**r.spec.searched, "best_val_pearson": r.best_val_pearson} for r in state.outcome.runs
            if math.isfinite(r.best_val_pearson)]
    if not keys or not rows:
        return None
    from trainer.evaluation.plots import plot_search

    return plot_search(rows, keys, "best_val_pearson", folder / PLOT_FILE)


def _log_summary(log: Any, search: Any, parent_id: str, status: str, lines: list[str],
                 plot: Callable[[Path], Path | None] | None = None) -> None:
    """Log SUMMARY_FILE (a heading with the new status and when, then `lines`) to the parent run, and the plot
    that `plot` makes in the same folder, if any."""
    closed = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    heading = (f"search {search.search_id}, experiment '{search.exp_name}', parent run {parent_id}: {status} "
               f"({CLOSED_BY}, {closed})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / SUMMARY_FILE).write_text("\n".join([heading, "", *lines, ""]))
        files = [("summary", folder / SUMMARY_FILE)]
        made = plot(folder) if plot else None
        if made is not None:
            files.append(("plots", made))
        log.log_files({}, files)


def finish(tracker: Any, state: SearchState, *, plots: bool = True, force: bool = False) -> str:
    """Log the summary table (and the search plot) to the parent run and end it FINISHED when every run is,
    else FAILED. Refuses while a pod still trains a run, unless `force`. Returns the parent's new status."""
    from trainer.tracking import FINISHED

    running = state.with_status(RUNNING)
    if running and not force:
        names = ", ".join(f"{r.spec.index} {r.spec.name}" for r in running[:5])
        more = f" and {len(running) - 5} more" if len(running) > 5 else ""
        raise UserError(f"search {state.search.search_id}: {len(running)} run(s) still training (run {names}{more}); "
                        "wait until the Job is done (kubectl wait --for=condition=complete job/<name>), or pass "
                        "--force to close the parent run now")
    status = FINISHED if not state.unfinished else "FAILED"
    log = tracker.run_log(state.parent_id)
    _log_summary(log, state.search, state.parent_id, status, report(state)[:-1],
                 (lambda folder: _plot(state, folder)) if plots else None)
    n_done = len(state.outcome.runs) - len(state.unfinished)
    log.set_tag("runs_finished", f"{n_done}/{len(state.outcome.runs)}")
    log.set_tag("runs_not_finished", ",".join(str(r.spec.index) for r in state.unfinished))
    log.set_tag("closed_by", CLOSED_BY)
    tracker.end_parent(state.parent_id, status)
    return status


def delete_command(search_id: str, namespace: str | None) -> list[str]:
    """kubectl's command that deletes the search's Job (and with it its pods) and ConfigMap."""
    ns = ["-n", namespace] if namespace else []
    return ["kubectl", *ns, "delete", "job,configmap", "-l", f"{SEARCH_ID_LABEL}={search_id}", "--ignore-not-found"]


def delete(search_id: str, namespace: str | None, echo: Echo) -> bool:
    """Delete the search's Job and ConfigMap with kubectl; without kubectl or cluster access, print the command to
    run instead. Whether they were deleted."""
    cmd = delete_command(search_id, namespace)
    text = shlex.join(cmd)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        echo(f"no kubectl here: delete the search's Job and ConfigMap where you have cluster access with\n  {text}")
        return False
    try:
        res = subprocess.run([kubectl, *cmd[1:]], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        echo(f"kubectl did not answer within 120 s; delete the search's Job and ConfigMap with\n  {text}")
        return False
    if res.returncode != 0:
        echo(f"kubectl could not delete them ({_first_line(res.stderr or res.stdout) or f'exit {res.returncode}'});"
             f" delete the search's Job and ConfigMap with\n  {text}")
        return False
    for line in (res.stdout.strip() or "nothing to delete (already gone)").splitlines():
        echo(line)
    return True


# ---- an adaptive search: its study's trials ----------------------------------------------------------------------
# Worker pods pull trials from one Optuna study; the last worker to see --trials done closes the parent run. When
# workers are gone for good (a failed Job, an exhausted deadline) nobody does: `status` reads the study and `finish`
# logs what the last worker would have (trials table, best value, epochs, plots) and ends the parent.

LOST_TRIAL = "LOST"  # RUNNING in the study, but its worker is gone (a stale heartbeat, or a dead local process)


@dataclass
class StudyState:
    """Where an adaptive search's study stands: each trial's state (Optuna's, with LOST for a RUNNING trial whose
    worker is gone) and, for those that are not done, why."""

    plan: Any  # trainer.launch.adaptive.Plan
    study: Any
    parent_id: str
    parent_status: str
    states: dict[int, str] = field(default_factory=dict)
    why: dict[int, str] = field(default_factory=dict)

    def numbers(self, *states: str) -> list[int]:
        return [n for n, s in self.states.items() if s in states]

    @property
    def done(self) -> list[int]:
        """Trials that count and ended: COMPLETE, PRUNED, or FAIL because their run failed."""
        return self.numbers("COMPLETE", "PRUNED", "FAILED")

    @property
    def missing(self) -> int:
        return max(0, self.plan.trials - len(self.done))

    def counts(self) -> str:
        order = ["COMPLETE", "PRUNED", "RUNNING", "WAITING", LOST_TRIAL, "FAILED"]
        n = {s: len(self.numbers(s)) for s in order}
        return ", ".join(f"{n[s]} {s}" for s in order if n[s] or s == "COMPLETE")


def read_study_state(tracker: Any, p: Any, storage_url: str, parent_run_id: str | None = None) -> StudyState:
    """The study of plan `p` in `storage_url` (which must exist) and the search's parent run (reads only)."""
    from trainer.launch import adaptive

    parent = find_parent(tracker, p, parent_run_id)
    study = adaptive.open_study(p, storage_url, create=False)
    lost = adaptive.gone(study)
    state = StudyState(p, study, parent.info.run_id, parent.info.status)
    for t in study.get_trials(deepcopy=False):
        label = t.state.name
        note = t.user_attrs.get(adaptive.OUTCOME_ATTR, "")
        if label == "RUNNING" and t.number in lost:
            label = LOST_TRIAL
            state.why[t.number] = ("RUNNING in the study but its worker is gone; a worker started again (the "
                                   "Job's pod command) resumes it from its checkpoint")
        elif label == "RUNNING":
            state.why[t.number] = "training"
        elif label == "WAITING":
            state.why[t.number] = "waiting for a worker (a retry of an interrupted trial)"
        elif label == "FAIL" and note == "failed":
            label = "FAILED"  # its run failed: counted (Optuna's FAIL of the other kinds are not)
            run_id = t.user_attrs.get("mlflow_run_id", "")
            error = tracker.client.get_run(run_id).data.tags.get("error", "") if run_id else ""
            state.why[t.number] = f"its run failed: {_first_line(error)}" if error else "its run failed"
        elif label == "FAIL":  # interrupted (retried as another trial), rejected or over budget: not counted
            continue
        state.states[t.number] = label
    return state


def study_report(state: StudyState) -> list[str]:
    """One line per counted trial (state, best validation r, epochs, MLflow run, values), the trials not done and
    why, and a last line of counts."""
    from trainer.launch import adaptive
    from trainer.search import short_value

    table = adaptive.trials_table(state.study)
    keys = list(state.plan.searched_keys)
    header = f"{'trial':>5}  {'state':<9} {'best_val_r':>10} {'epochs':>6}  {'mlflow_run':<32}  " + "  ".join(keys)
    lines = [header]
    for i, number in enumerate(table["trial"]):
        if number not in state.states:
            continue
        value = table["best_val_pearson"][i]
        shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "-"
        values = "  ".join(f"{k}={short_value(table[k][i])}" for k in keys if k in table)
        lines.append(f"{number:>5}  {state.states[number]:<9} {shown:>10} {table['epochs'][i]:>6}  "
                     f"{table['mlflow_run_id'][i] or '-':<32}  {values}")
    for number, why in state.why.items():
        if state.states.get(number) not in ("COMPLETE", "PRUNED"):
            lines.append(f"trial {number}: {why}")
    if state.missing:
        lines.append(f"{state.missing} of {state.plan.trials} trials not done yet")
    lines.append(f"search {state.plan.search_id} ({state.plan.strategy}, {state.plan.trials} trials, study "
                 f"{state.plan.study_name}): {state.counts()}; parent run {state.parent_id} is {state.parent_status}")
    return lines


def finish_study(tracker: Any, state: StudyState, *, plots: bool = True, force: bool = False,
                 echo: Echo = print) -> str:
    """Log the study's summary to the parent run, as the last worker does, and end it FINISHED when --trials are
    done and none failed, else FAILED. Refuses while a worker still trains a trial, unless `force`. Changes nothing
    in the study. Returns the parent's new status."""
    from trainer.launch import adaptive
    from trainer.tracking import FINISHED

    running = state.numbers("RUNNING")
    if running and not force:
        raise UserError(f"search {state.plan.search_id}: {len(running)} trial(s) still training (trial "
                        f"{', '.join(map(str, running[:5]))}); wait until the Job is done, or pass --force to close "
                        "the parent run now")
    ok = not state.missing and not state.numbers("FAILED", LOST_TRIAL, "RUNNING", "WAITING")
    status = FINISHED if ok else "FAILED"
    adaptive._close(state.study, state.plan, tracker, state.parent_id, plots, echo, end=False)
    log = tracker.run_log(state.parent_id)
    _log_summary(log, state.plan, state.parent_id, status, study_report(state)[:-1])
    log.set_tag("trials_done", f"{len(state.done)}/{state.plan.trials}")
    log.set_tag("closed_by", CLOSED_BY)
    tracker.end_parent(state.parent_id, status)
    return status
