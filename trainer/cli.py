"""The `retina-trainer` command line: thin commands that parse, call and print.

Errors a user can cause are printed as one line (`error: ...`) with exit status 2, never a traceback; a search
in which some run failed while training exits 1. Commands
that do not train (`expand`, `params`) import neither torch nor mlflow, so they start fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from trainer import __version__, config
from trainer.errors import ConfigError, RunsFailed, Terminated, UserError


class Main(click.Group):
    """The top-level group: lazy-loads the heavy `data` commands and turns UserError into one clear line."""

    lazy = {"data": ("trainer.data.commands", "data"), "k8s": ("trainer.launch.k8s_commands", "k8s")}
    # Their one-line help for `retina-trainer --help`, which lists them without importing them (a test checks these
    # lines against the commands' own).
    lazy_help = {"data": "Check recordings and create synthetic ones.",
                 "k8s": "Run a search on Kubernetes: one pod per expanded run."}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy:
                rows.append((name, self.lazy_help[name]))
                continue
            cmd = super().get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - max(len(n) for n in
                                                                                     self.list_commands(ctx)))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except Terminated:
            click.echo("terminated (SIGTERM): a run in progress ended KILLED; run the same command again to resume "
                       "it from its latest checkpoint", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted: a run in progress ended KILLED; run the same command again to resume it from "
                       "its latest checkpoint", err=True)
            ctx.exit(130)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _on_sigterm() -> None:
    """Turn SIGTERM into an exception, so the current run checkpoints its state and ends KILLED."""
    import signal

    signal.signal(signal.SIGTERM, _raise_terminated)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="retina-trainer")
def main() -> None:
    """Train CNN models of retinal ganglion cells on h5 recordings; every run is logged to MLflow.

    \b
    A search is hyperparams.json (every setting of a run) plus hyperranges.json (values to search over):
      retina-trainer data synth ~/experiments/data           # a synthetic recording to try things on
      retina-trainer expand hyperparams.json hyperranges.json  # what would run
      retina-trainer search hyperparams.json hyperranges.json  # train and log every run
      mlflow ui                                              # compare the runs
    """


# search and run-index: whether each run does its analyses (its `analysis` setting) after its evaluation
ANALYSIS_OPTION = click.option(
    "--analysis/--no-analysis", default=True, show_default=True, envvar="RETINA_ANALYSIS", show_envvar=True,
    help="Run each run's analyses (receptive fields, retinal phenomena, interneurons, attribution: its `analysis` "
         "setting, docs/analysis.md) after its evaluation; --no-analysis skips them for every run "
         "(`retina-trainer analyze` runs them later).")

# search and run-index: whether each run's final evaluation also draws its plots
PLOTS_OPTION = click.option(
    "--plots/--no-plots", default=True, show_default=True, envvar="RETINA_PLOTS", show_envvar=True,
    help="Log plots with each run's final evaluation (about 2 s per run; scores and the per-cell table are logged "
         "either way; `retina-trainer evaluate` plots any run later).")


def _work_where_mlflow_run_was_called() -> None:
    """`mlflow run <project>` runs the project's command in the project folder: a search there would put mlflow.db
    and its run folders into the source tree (and, with the embedded store, log to another store than the one the
    project's run is in). Under `mlflow run`, work in the folder it was called from instead: relative paths in the
    search (save_root, data_root, the embedded store) are then the caller's."""
    import os
    from pathlib import Path

    import psutil

    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    try:
        caller = next((Path(p.cwd()) for p in psutil.Process().parents()
                       if len(p.cmdline()) > 2 and Path(p.cmdline()[1]).name == "mlflow" and "run" in p.cmdline()),
                      None)
    except (OSError, psutil.Error):
        return
    if caller is None or caller.resolve() == Path.cwd().resolve():
        return
    click.echo(f"mlflow run: working in {caller}, where it was called, not in the project folder {Path.cwd()}",
               err=True)
    os.chdir(caller)


def _warn(warnings: Any) -> None:
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


@main.command()
@click.argument("hyperparams", type=click.Path(dir_okay=False))
@click.argument("hyperranges", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the expanded runs as JSON (for machines).")
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True,
              help="Add a column: the pack each run trains in with `search --pack K` (and the pod of "
                   "`k8s render --pack K`).")
def expand(hyperparams: str, hyperranges: str | None, as_json: bool, pack: int) -> None:
    """List the runs a search would train, in order: run N is the same run on every machine.

    The order is the Cartesian product of the ranges in file order (first key outermost), each combination
    repeated n_repeats times. Nothing is trained; torch and mlflow are not imported.
    """
    from trainer.search import expand as do_expand
    from trainer.search import plan_packs

    s = do_expand(hyperparams, hyperranges)
    _warn(s.warnings)
    pack_of = {r.index: i for i, group in enumerate(plan_packs(s.runs, pack)) for r in group} if pack > 1 else {}
    if as_json:
        out = s.to_dict()
        if pack_of:
            for r in out["runs"]:
                r["pack"] = pack_of[r["index"]]
        click.echo(json.dumps(out, indent=2))
        return
    from trainer.search import plural, short_value

    keys = list(s.searched_keys)
    header = ["run", "config_id", "seed"] + (["pack"] if pack_of else []) + keys + ["name"]
    rows = [[str(r.index), r.config_id, str(r.seed)] + ([str(pack_of[r.index])] if pack_of else [])
            + [short_value(r.searched[k]) for k in keys] + [r.name] for r in s.runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    packs = f" in {plural(len(set(pack_of.values())), 'pack')} of up to {pack}" if pack_of else ""
    click.echo(f"search {s.search_id}: {plural(len(s.runs), 'run')}{packs} in experiment '{s.exp_name}'")
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@main.command()
@click.argument("hyperparams", type=click.Path(dir_okay=False))
@click.argument("hyperranges", type=click.Path(dir_okay=False), required=False)
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding <dataset>/<stim_type>.h5; overrides data_root in hyperparams.json and "
                   "$RETINA_DATA_ROOT (default ~/experiments/data).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar per run.")
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True, envvar="RETINA_PACK",
              show_envvar=True,
              help="Train up to K runs at a time in one process on one batch stream, when they differ only in "
                   "optimiser settings, stopping rule and seed (e.g. lr x l2 x repeats). Each keeps its own "
                   "initial weights, optimizer, early stopping, checkpoints and MLflow run.")
@click.option("--strategy", type=click.Choice(["grid", "random", "tpe"]), default="grid", show_default=True,
              envvar="RETINA_STRATEGY", show_envvar=True,
              help="grid: every combination of hyperranges.json. random, tpe: --trials configurations sampled by "
                   "Optuna (tpe learns which region is good); hyperranges may then give number ranges "
                   "({\"low\": 1e-4, \"high\": 1e-2, \"log\": true}).")
@click.option("--trials", type=click.IntRange(min=1), default=None, envvar="RETINA_TRIALS", show_envvar=True,
              help="How many configurations a sampled strategy trains (the total over reruns and workers).")
@click.option("--prune", type=click.Choice(["none", "median", "asha", "hyperband"]), default="none",
              show_default=True, envvar="RETINA_PRUNE", show_envvar=True,
              help="Stop hopeless trials early on their per-epoch validation r (sampled strategies): median of the "
                   "other trials at the same epoch, ASHA (rungs at 1, 3, 9 ... epochs) or Hyperband. A pruned run "
                   "is FINISHED, tagged pruned, with its best checkpoint so far.")
@click.option("--sampler-seed", type=int, default=None,
              help="Seed of the sampler (default: seed in hyperparams.json); part of the study's identity.")
@click.option("--study-storage", default=None, envvar="RETINA_STUDY_STORAGE", show_envvar=True, metavar="URL",
              help="Optuna storage of a sampled strategy's study (an SQLAlchemy URL); default: optuna.db beside a "
                   "local MLflow store, else in the working folder. Workers that share it share the study.")
@click.option("--parent-run-id", envvar="RETINA_PARENT_RUN_ID", default=None, show_envvar=True,
              help="Attach the trials to this parent run (a Kubernetes worker of `k8s render --strategy`); "
                   "sampled strategies only.")
@PLOTS_OPTION
@ANALYSIS_OPTION
def search(hyperparams: str, hyperranges: str | None, data_root: str | None, progress: bool, pack: int,
           strategy: str, trials: int | None, prune: str, sampler_seed: int | None, study_storage: str | None,
           parent_run_id: str | None, plots: bool, analysis: bool) -> None:
    """Train every run of a search and log each to MLflow as a child of one search run.

    Logs to $MLFLOW_TRACKING_URI when set, else to the embedded store in the working directory (open it with
    `mlflow ui`). Runs already FINISHED with the same configuration are skipped; an interrupted run resumes from
    its latest checkpoint. Exits 2 on bad input (before anything trains), 1 if any run failed.

    With --pack K, runs that may share a forward pass (same recording, architecture, batch size, loss, precision
    and device; no prune, retinotopic_loop or compile) train K at a time as one vectorised model: on a GPU this
    keeps the device busy with small models. Packed runs share the batch order and the noise layers' random
    stream; otherwise each trains as it would alone.

    With --strategy random or tpe, an Optuna study samples --trials configurations (see docs/adaptive-search.md);
    rerunning the same command resumes the study, and processes given the same --study-storage share it.
    """
    if strategy != "grid":
        _search_sampled(hyperparams, hyperranges, data_root, progress, pack, strategy, trials, prune, sampler_seed,
                        study_storage, parent_run_id, plots, analysis)
        return
    given = [f"--{n}" for n, v in (("trials", trials), ("prune", prune != "none"), ("sampler-seed", sampler_seed),
                                   ("parent-run-id", parent_run_id)) if v]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to the sampled strategies; add --strategy tpe (or random), or "
                          "leave them out for a grid search")
    from trainer.search import expand as do_expand
    from trainer.search import without_analysis

    s = do_expand(hyperparams, hyperranges)
    _warn(s.warnings)
    if not analysis:
        s = without_analysis(s)
    files = {"hyperparams.json": config.read_json(hyperparams, "hyperparams")}
    if hyperranges:
        files["hyperranges.json"] = config.read_json(hyperranges, "hyperranges")
    _work_where_mlflow_run_was_called()

    from trainer.launch.local import run_search, summary_table

    _on_sigterm()
    outcome = run_search(s, data_root=data_root, echo=lambda m: click.echo(m, err=True), progress=progress,
                         files=files, pack=pack, plots=plots)
    click.echo(summary_table(outcome))
    click.echo(f"parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    if outcome.failed:
        raise RunsFailed(f"{len(outcome.failed)} of {len(outcome.runs)} runs did not finish: "
                        + ", ".join(f"run {r.spec.index} ({r.error or r.status})" for r in outcome.failed))


def _search_sampled(hyperparams: str, hyperranges: str | None, data_root: str | None, progress: bool, pack: int,
                    strategy: str, trials: int | None, prune: str, sampler_seed: int | None,
                    study_storage: str | None, parent_run_id: str | None, plots: bool, analysis: bool) -> None:
    """`search --strategy random|tpe`: this process is one worker of the plan's Optuna study."""
    import dataclasses

    from trainer.launch import adaptive

    if pack > 1:
        raise ConfigError("--pack applies to --strategy grid only: a sampled strategy trains one trial at a time "
                          "(its pruner judges each run's epochs); leave out --pack or use --strategy grid")
    plan = adaptive.plan(hyperparams, hyperranges, strategy, trials, prune, sampler_seed)
    _warn(list(plan.warnings))
    if not analysis:  # not part of the study's identity (analysis is not an identity key)
        plan = dataclasses.replace(plan, base={**plan.base, "analysis": "none"})
    files = {"hyperparams.json": config.read_json(hyperparams, "hyperparams")}
    if hyperranges:
        files["hyperranges.json"] = config.read_json(hyperranges, "hyperranges")
    _work_where_mlflow_run_was_called()

    from trainer.launch.local import summary_table

    _on_sigterm()
    outcome = adaptive.run_study(plan, data_root=data_root, echo=lambda m: click.echo(m, err=True),
                                 progress=progress, plots=plots, storage=study_storage, parent_id=parent_run_id,
                                 files=files)
    click.echo(summary_table(outcome))
    click.echo(f"parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    if outcome.failed:
        raise RunsFailed(f"{len(outcome.failed)} of {len(outcome.runs)} trials did not finish: "
                        + ", ".join(f"trial {r.spec.index} ({r.error or r.status})" for r in outcome.failed))


@main.command("run-index")
@click.argument("hyperparams", type=click.Path(dir_okay=False))
@click.argument("hyperranges", type=click.Path(dir_okay=False), required=False)
@click.option("--index", type=int, envvar="JOB_COMPLETION_INDEX", required=True, show_envvar=True,
              help="Which run of the expanded search to train (the Indexed Job's completion index).")
@click.option("--parent-run-id", envvar="RETINA_PARENT_RUN_ID", required=True, show_envvar=True,
              help="MLflow run id of the search's parent run (made by `retina-trainer k8s render`).")
@click.option("--data-root", type=click.Path(file_okay=False), envvar="RETINA_DATA_ROOT", default=None,
              show_envvar=True, help="Folder holding <dataset>/<stim_type>.h5.")
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True,
              help="INDEX numbers packs of up to K runs (as `k8s render --pack K` and `search --pack K` group "
                   "them), and the pack's runs train together on one batch stream.")
@PLOTS_OPTION
@ANALYSIS_OPTION
def run_index(hyperparams: str, hyperranges: str | None, index: int, parent_run_id: str,
              data_root: str | None, pack: int, plots: bool, analysis: bool) -> None:
    """Train one run of a search (or one pack of runs): the pod command of a Kubernetes Indexed Job.

    Expands the same files as `expand`, takes run number INDEX (with --pack K, pack number INDEX), and trains it
    as an MLflow child of the parent run: skipped if already FINISHED, resumed from its latest checkpoint if it
    was interrupted. On SIGTERM the run ends KILLED (exit 143) and its latest epoch checkpoint is what the next
    attempt resumes from. Exits 2 on bad input or when every failed run failed for a reason a retry cannot fix,
    1 on an unexpected failure.
    """
    from trainer.search import expand as do_expand
    from trainer.search import without_analysis

    s = do_expand(hyperparams, hyperranges)
    _warn(s.warnings)
    if not analysis:
        s = without_analysis(s)
    from trainer.launch.local import run_index as do_run_index

    _on_sigterm()
    outcomes = do_run_index(s, index, parent_run_id, data_root=data_root, echo=lambda m: click.echo(m, err=True),
                            pack=pack, plots=plots)
    for o in outcomes:
        click.echo(f"run {o.spec.index} {o.spec.name}: {o.status} (mlflow run {o.run_id}, best val r "
                   f"{o.best_val_pearson:.3f}, test r {o.test_pearson:.3f})")
    failed = [o for o in outcomes if o.status == "FAILED"]
    if failed:
        message = "; ".join(f"run {o.spec.index} failed: {o.error}" for o in failed)
        if all(o.user_error for o in failed):
            raise UserError(message)
        raise RunsFailed(message)


@main.command()
@click.argument("target")
@click.option("--metric", default="best_val_pearson", show_default=True,
              help="Summary metric that picks the best run (higher is better; lower for names ending in 'loss').")
@click.option("--name", default=None, help="Registered model name (default: the experiment's name).")
def register(target: str, metric: str, name: str | None) -> None:
    """Register the best FINISHED run of TARGET (an exp_name, a search id or a parent run id) as a new model
    version, and move the alias `champion` to it only if it beats the current champion on the same metric.

    The version is the run's MLflow Model (pytorch flavor: raw stimulus frames (T, H, W) in, rates (T - history,
    n_cells) out), which `mlflow.pyfunc.load_model`, `mlflow.pytorch.load_model` and `mlflow models serve -m
    models:/NAME@champion` take; `retina-trainer predict`/`evaluate` and `trainer.inference.load_model` use the
    run's best.pt. A run registered already is left as it is.
    """
    from trainer.tracking import register_best

    r = register_best(target, metric=metric, name=name)
    if r["already"]:
        click.echo(f"run {r['run_id']} (best of {r['searched']}) is already version {r['version']} of {r['name']}; "
                   "nothing registered")
        return
    value = f"{r['value']:.4f}" if r["value"] is not None else "n/a"
    click.echo(f"registered {r['name']} version {r['version']} from run {r['run_id']} ({r['metric']} = {value}, the "
               f"best of {r['searched']})")
    if not r["servable"]:
        click.echo("note: this run predates MLflow Models in retina-trainer (0.2): predict and evaluate load it, "
                   "MLflow cannot serve it; train it again to serve it", err=True)
    if r["champion_moved"]:
        was = f" (was version {r['previous_champion']})" if r["previous_champion"] else ""
        click.echo(f"alias champion -> version {r['version']}{was}")
    else:
        click.echo(f"alias champion stays on version {r['previous_champion']} ({r['metric']} = "
                   f"{r['previous_value']:.4f} is not beaten)")


@main.command()
@click.argument("model")
@click.option("--recording", type=click.Path(dir_okay=False), default=None,
              help="Recording to score on (default: the file the model's run was trained on, as its MLflow dataset "
                   "input records it; else <data root>/<dataset>/<stim_type>.h5).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Data root for the default recording (else data_root of the model's config, "
                   "$RETINA_DATA_ROOT, ~/experiments/data).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to write per_cell.csv and the plots (predictions, filters) to.")
@click.option("--force", is_flag=True, help="Replace the files of an earlier evaluation in --out.")
def evaluate(model: str, recording: str | None, data_root: str | None, out: str | None, force: bool) -> None:
    """Score MODEL on a recording's test split: per cell and averaged, Pearson r against the trial-averaged test
    rate; with test repeats, reliability, FEVE and CC_norm; on synthetic recordings, r against the true rates.

    MODEL is a checkpoint file, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a run id. Definitions:
    docs/metrics.md. Every run is also evaluated this way on its best checkpoint when it finishes.
    """
    from pathlib import Path

    from trainer.data.recording import load_data
    from trainer.evaluation.report import REPORT_FILES, evaluate_predictions, write_report
    from trainer.inference import load_model

    if out and not force:
        existing = [p.name for p in Path(out).glob("*") if p.name in REPORT_FILES]
        if existing:
            raise UserError(f"{out} already holds {', '.join(sorted(existing))} of an earlier evaluation; pass "
                            "--force to replace them or choose another --out")
    loaded = load_model(model)
    cfg = loaded.config
    path = _recording_for(loaded, recording, data_root, "the scores are of this file")
    data = load_data(path, cells=loaded.cell_ids, img_shape=cfg["img_shape"], val_frac=cfg["val_frac"],
                     val_size=cfg.get("val_size", 0))
    pred = loaded.predict(data.test.stimulus).astype("float64")
    ev = evaluate_predictions(pred, data)
    click.echo(f"{loaded.source} (epoch {loaded.epoch}) on {path}: {ev.repeats_note}")
    click.echo(ev.table.rstrip())
    if out:
        write_report(ev, pred, data, loaded.model, [], Path(out))
        click.echo(f"wrote {', '.join(str(p) for _, p in ev.files)}")


def _recording_for(loaded: Any, recording: str | None, data_root: str | None, what: str) -> Any:
    """The recording to score or analyse a model on: `recording` as given, else the file the model's run was
    trained on (its MLflow dataset input) when it is there and no data root is given, else <data root>/<dataset>/
    <stim_type>.h5 (which may not exist). A file other than the one the run trained on is warned about."""
    from pathlib import Path

    from trainer.data.recording import recording_path, resolve_data_root

    cfg = loaded.config
    trained_on = None
    if loaded.run_id:
        from trainer.tracking import recorded_recording

        trained_on = recorded_recording(loaded.run_id)
    if recording:
        path = Path(recording)
    elif trained_on is not None and Path(trained_on[0]).is_file() and data_root is None:
        path = Path(trained_on[0])
    else:
        path = recording_path(resolve_data_root(data_root or cfg["data_root"]), cfg["dataset"], cfg["stim_type"])
    if trained_on is not None and path.is_file():
        from trainer.data.recording import recording_digest

        digest = recording_digest(path)
        if digest != trained_on[1]:
            click.echo(f"warning: {path} is not the file run {loaded.run_id} was trained on (digest {digest}; it "
                       f"trained on {trained_on[0]}, digest {trained_on[1]}): {what}", err=True)
    return path


@main.command()
@click.argument("model")
@click.option("--recording", type=click.Path(dir_okay=False), default=None,
              help="Recording the model was trained on, for the ground truth of a synthetic one, the attribution's "
                   "stimulus and the interneurons beside it (default: as for evaluate; without one, those parts "
                   "use white noise or are skipped).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Data root for the default recording (as for evaluate).")
@click.option("--interneurons", multiple=True, type=click.Path(), metavar="FILE_OR_DIR",
              help="Interneuron recordings in the original's layout (an h5 file per cell type with group boxes, or "
                   "a folder of them); repeatable. Default: the folder interneurons/ beside the recording.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the files (receptive_fields.h5, phenomena.json, interneurons.csv, attribution.json, "
                   "analysis.json, plots). Default: none for a model from MLflow (the files are logged to its run), "
                   "<checkpoint folder>/analysis for a checkpoint file.")
@click.option("--only", default=None, metavar="NAMES",
              help="Comma-separated analyses to run: receptive_fields, phenomena, interneurons, attribution, or "
                   "single phenomena (e.g. oms,osr). Default: all that apply to the model.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N, mps.")
@click.option("--no-plots", "no_plots", is_flag=True, help="Write the data files only.")
@click.option("--force", is_flag=True, help="Replace the files of an earlier analysis in --out.")
def analyze(model: str, recording: str | None, data_root: str | None, interneurons: tuple[str, ...],
            out: str | None, only: str | None, device: str, no_plots: bool, force: bool) -> None:
    """Run the analyses the original ran after training on MODEL: receptive fields (STAs), the retinal
    phenomena, hidden units against recorded interneurons (with an untrained control) and attribution.

    MODEL is a checkpoint file, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a run id. A model from
    MLflow gets the metrics (analysis_*) and files (analysis/, plots/analysis/) logged to its run. What each
    analysis computes: docs/analysis.md. Every run of a search does the same at its end (`analysis` setting).
    """
    from pathlib import Path

    from trainer import analysis

    names = analysis.parse_only(only) if only else list(analysis.PARTS)
    required = frozenset(names if only else ()) | (frozenset({"interneurons"}) if interneurons and
                                                   "interneurons" in names else frozenset())
    from trainer.analysis.run import FILES
    from trainer.inference import load_model
    from trainer.training.trainer import resolve_device

    loaded = load_model(model)
    target = Path(out) if out else None if loaded.run_id else Path(model).parent / "analysis"
    if target is not None and not force:
        existing = sorted(p.name for p in target.glob("*") if p.name in FILES) if target.is_dir() else []
        if existing:
            raise UserError(f"{target} already holds {', '.join(existing)} of an earlier analysis; pass --force to "
                            "replace them or choose another --out")
    path = _recording_for(loaded, recording, data_root, "the analysis is of the model on this file")
    if recording and not path.is_file():
        raise UserError(f"recording not found: {path}")
    rec = path if path.is_file() else None
    if rec is None:
        click.echo(f"note: no recording at {path}: receptive fields are not compared with a ground truth and the "
                   "attribution uses white noise (give --recording)", err=True)
    loaded.model.to(resolve_device(device))
    _analyze_into(loaded, target, names, required, rec, [Path(p) for p in interneurons], not no_plots)


def _analyze_into(loaded: Any, target: Any, names: list[str], required: frozenset[str], rec: Any,
                  interneurons: list[Any], plots: bool) -> None:
    """Analyse into a temporary folder; log to the model's run; only then move the files into `target`, so that a
    failure leaves neither a half-written folder nor a half-logged run."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from trainer.analysis.run import FILES, Model
    from trainer.analysis.run import analyze as do_analyze

    parent = target.parent if target is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".analysis.", dir=parent))
    try:
        report = do_analyze(Model(loaded.model, loaded.config, loaded.cell_ids, loaded.mean, loaded.std), tmp,
                            names, recording=rec, interneurons=interneurons or None, required=required,
                            plots=plots, source=loaded.source, echo=lambda m: click.echo(m, err=True))
        if loaded.run_id:
            from trainer.tracking import log_evaluation

            log_evaluation(loaded.run_id, report.metrics, report.files)
        written = []
        if target is not None:
            target.mkdir(parents=True, exist_ok=True)
            for old in target.glob("*"):
                if old.name in FILES and old.is_file():
                    old.unlink()  # an earlier analysis's file this one does not replace
            for _, f in report.files:
                os.replace(f, target / f.name)
                written.append(target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, why in report.skipped.items():
        click.echo(f"note: {name} skipped: {why}", err=True)
    width = max(len(k) for k in report.metrics)
    for key in sorted(report.metrics):
        click.echo(f"{key.ljust(width)}  {report.metrics[key]:.4g}")
    if written:
        click.echo(f"wrote {len(written)} files to {target}")
    if loaded.run_id:
        click.echo(f"logged to MLflow run {loaded.run_id}")


@main.command()
@click.argument("model")
@click.argument("recording", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def predict(model: str, recording: str, out: str, force: bool) -> None:
    """Write the predicted firing rates of MODEL for every group (train, test) of RECORDING to OUT (h5).

    MODEL is a checkpoint file, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a run id. OUT holds
    <group>/firing_rate (n_cells, T - history) in the recording's units and <group>/time, the time of each
    predicted bin (the frame after each window); attributes name the model, cells and history.
    """
    from trainer.inference import load_model, write_predictions

    path = write_predictions(load_model(model), recording, out, force=force)
    click.echo(f"wrote {path}")


@main.command("import")
@click.argument("path", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to write best.pt to (default: imported/<the checkpoint's folder name>).")
@click.option("--force", is_flag=True, help="Replace <out>/best.pt if it exists.")
@click.option("--recording", type=click.Path(dir_okay=False), default=None,
              help="Recording the model was trained on: the import scores it on our validation and test splits "
                   "(best_val_pearson, test_pearson_at_best).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Data root holding <dataset>/<stim_type>.h5 of the checkpoint's hyperparameters, to score on "
                   "(as --recording).")
@click.option("--register", "register_as", metavar="NAME", default=None,
              help="Also log it as an MLflow run and register it as a new version of model NAME (the alias "
                   "champion moves as with `register`, on best_val_pearson: our validation r, scored only with "
                   "--recording or --data-root; the original's val_acc is logged as original_val_acc).")
@click.option("--experiment", default="imported", show_default=True,
              help="MLflow experiment of the run --register logs.")
def import_model(path: str, out: str | None, force: bool, recording: str | None, data_root: str | None,
                 register_as: str | None, experiment: str) -> None:
    """Convert a model trained with the original torchdeepretina into a retina-trainer checkpoint.

    PATH is one of its test_epoch_<N>.pt (or .pth) files or a run folder (then its newest checkpoint that still
    holds model_state_dict). BNCNN, LinearStackedBNCNN and VaryModel (with or without convgc), RetinotopicModel
    and LN are imported: the architecture comes from the checkpoint's hyps (or the folder's
    hyperparams.json), the weights are checked against it shape by shape, the stimulus normalisation is its
    norm_stats, and the imported model computes what the original computed (with convgc, the original's clamped
    read-out position; RetinotopicModel's one-hot maps as learnt). The original's epoch N (counted from 0) is
    epoch N + 1 here. Use the result with `evaluate`, `predict` or `trainer.inference.load_model`. Nothing of the
    file's code is run: only tensors, numbers and containers are unpickled (torch's weights-only rules).
    """
    from trainer.importer import import_checkpoint, run_metrics

    done = import_checkpoint(path, out=out, force=force, recording=recording, data_root=data_root)
    for note in done.notes:
        click.echo(f"note: {note}", err=True)
    st = done.state
    orig = st["imported_from"]
    val = f", val r {st['best_val_pearson']:.3f} on our split" if st["best_val_pearson"] == st["best_val_pearson"] \
        else ""
    if orig.get("val_acc") is not None:
        val += f", original val_acc {orig['val_acc']:.3f}"
    was = f", the original's epoch {orig['epoch']}" if orig.get("epoch") is not None else ""
    click.echo(f"imported {st['model_type']} (epoch {st['epoch']}{was}, {st['n_cells']} cells{val}) from "
               f"{done.source} -> {done.path}")
    if register_as is None:
        return
    if st["best_val_pearson"] != st["best_val_pearson"]:
        click.echo("note: not scored on a recording (give --recording or --data-root): the run has no "
                   "best_val_pearson, so it takes the champion alias only where there is none", err=True)
    from trainer.tracking import log_imported

    r = log_imported(done.path, st["config"], st["imported_from"], run_metrics(st), experiment=experiment,
                     register_as=register_as, run_name=f"import-{done.path.parent.name}")
    click.echo(f"logged run {r['run_id']} in experiment '{r['experiment']}' of {r['tracking_uri']}")
    reg = r["registered"]
    click.echo(f"registered {reg['name']} version {reg['version']} from run {reg['run_id']}")
    if reg["champion_moved"]:
        was = f" (was version {reg['previous_champion']})" if reg["previous_champion"] else ""
        click.echo(f"alias champion -> version {reg['version']}{was}")
    else:
        click.echo(f"alias champion stays on version {reg['previous_champion']}")


@main.command()
@click.option("--markdown", is_flag=True, help="Print a Markdown table (the README's reference is made with it).")
def params(markdown: bool) -> None:
    """List every hyperparameter: name, type, default and what it does."""
    if markdown:
        click.echo("| key | type | default | what it does | differs from the original |")
        click.echo("|---|---|---|---|---|")
    section = None
    for p in config.SCHEMA:
        default = json.dumps(p.default)
        what = p.help + (f" One of: {', '.join(p.choices)}." if p.choices else "")
        if markdown:
            click.echo(f"| `{p.name}` | {p.kind} | `{default}` | {what} | {p.original} |")
            continue
        if p.section != section:
            section = p.section
            click.echo(f"\n[{section}]")
        click.echo(f"  {p.name} ({p.kind}, default {default})\n      {what}")
    if not markdown:
        aliases = ", ".join(f"{a} (= {b})" for a, (b, _) in config.ALIASES.items())
        click.echo(f"\nAccepted from the original trainer: {aliases}; ignored with a warning where they change "
                   f"nothing here: {', '.join(config.LEGACY_NOOP)}. See docs/differences.md.")


def seed_form(argv: list[str]) -> list[str]:
    """Accept the original's `python -m trainer hyperparams.json [hyperranges.json]` as the `search` command."""
    if argv and argv[0].endswith(".json"):
        return ["search", *argv]
    return argv


def run() -> None:
    """Entry point for `python -m trainer`."""
    main(args=seed_form(sys.argv[1:]), prog_name="retina-trainer")
