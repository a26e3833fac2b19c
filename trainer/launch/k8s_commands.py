"""`retina-trainer k8s`: print the Kubernetes manifests of a search (ConfigMap + Indexed Job) for kubectl, and read
or close a search that ran there (`status`, `finish`).

`render` imports no torch; mlflow only to create the search's parent run, which every pod's child run attaches to
(none with --parent-run-id). `status` and `finish` read the search's runs from the tracking server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import click

from trainer import config
from trainer.errors import TrackingUnavailable, UserError

# MLflow client settings while render talks to the server: an unreachable server is reported in seconds.
RENDER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_DISABLE_TELEMETRY": "true"}
CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


@contextlib.contextmanager
def _tracking_env(uri: str) -> Iterator[None]:
    """Point MLflow at `uri` (and keep its retries short) for the duration of the block, then restore."""
    wanted = {"MLFLOW_TRACKING_URI": uri, **{k: os.environ.get(k, v) for k, v in RENDER_HTTP_ENV.items()}}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def access_error(exc: BaseException, uri: str, source: str, exp_name: str) -> UserError | None:
    """One clear line for a request the tracking server refused for want of credentials (401) or permission
    (403), or None for any other error. MLflow raises these as MlflowException with error_code UNAUTHENTICATED or
    PERMISSION_DENIED (and the Tracker reports a 401 on opening the experiment as a UserError that quotes it)."""
    code = getattr(exc, "error_code", None)
    text = str(exc)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED" or (isinstance(exc, UserError) and "error code 401" in text):
        if user:
            return UserError(f"the MLflow tracking server {uri} (from {source}) refused the credentials of user "
                             f"'{user}' (401 not authenticated): check {CREDENTIALS}")
        return UserError(f"the MLflow tracking server {uri} (from {source}) asks for credentials (401 not "
                         f"authenticated): set {CREDENTIALS} to your account on it")
    if code == "PERMISSION_DENIED" or (isinstance(exc, UserError) and "error code 403" in text):
        return UserError(f"the MLflow tracking server {uri} (from {source}) does not let user '{user or '(none)'}' "
                         f"write to experiment '{exp_name}' (403 permission denied): ask its owner or an admin for "
                         "EDIT permission on it, or choose another exp_name")
    return None


@contextlib.contextmanager
def tracking_errors(uri: str, source: str, exp_name: str, unreachable: str = "") -> Iterator[None]:
    """Turn what a tracking server can answer into one line: unreachable (TrackingUnavailable, exit 3, with
    `unreachable` as the advice), credentials or permissions refused (UserError, exit 2)."""
    try:
        yield
    except TrackingUnavailable:
        advice = unreachable or f"check that it runs and that {source} is the address this machine reaches it at"
        raise TrackingUnavailable(f"the MLflow tracking server {uri} (from {source}) cannot be reached from this "
                                  f"machine; {advice}") from None
    except Exception as exc:
        clear = access_error(exc, uri, source, exp_name)
        if clear is None:
            raise
        raise clear from None


def create_parent_run(search: Any, files: dict[str, dict[str, Any]], uri: str, job: str,
                      n_runs: int | None = None) -> str:
    """Create (or reuse, for a search rendered before) the search's MLflow parent run on the server at `uri`."""
    with _tracking_env(uri):
        from trainer.tracking import Tracker

        tracker = Tracker(search.exp_name)
        run_id, _ = tracker.parent_run(search.search_id, search.exp_name,
                                       len(search.runs) if n_runs is None else n_runs,
                                       list(search.searched_keys), files)
        tracker.client.set_tag(run_id, "launcher", "kubernetes")
        tracker.client.set_tag(run_id, "k8s_job", job)
    return run_id


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """KEY=VALUE options as a dict; one clear line for a malformed or repeated key."""
    out: dict[str, str] = {}
    for text in values:
        key, eq, value = text.partition("=")
        if not eq or not key:
            raise UserError(f"{option} '{text}' is not KEY=VALUE")
        if key in out and out[key] != value:
            raise UserError(f"{option} {key} is given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _load_search(hyperparams: str, hyperranges: str | None) -> tuple[Any, dict[str, dict[str, Any]]]:
    from trainer.search import expand

    s = expand(hyperparams, hyperranges)
    for w in s.warnings:
        click.echo(f"warning: {w}", err=True)
    files = {"hyperparams.json": config.read_json(hyperparams, "hyperparams")}
    if hyperranges:
        files["hyperranges.json"] = config.read_json(hyperranges, "hyperranges")
    return s, files


def _grid_refuses(trials: int | None, prune: str, sampler_seed: int | None, storage: tuple[str, str | None],
                  advice: str) -> None:
    """One line naming the sampled strategies' options given to a grid (`storage`: the option's name and value)."""
    given = [f"--{n}" for n, v in (("trials", trials), ("prune", prune != "none"), ("sampler-seed", sampler_seed),
                                   storage) if v]
    if given:
        raise UserError(f"{', '.join(given)} apply to the sampled strategies; {advice}")


def _load_study(hyperparams: str, hyperranges: str | None, strategy: str, trials: int | None, prune: str,
                sampler_seed: int | None, workers: int, storage_secret: str | None,
                pack: int) -> tuple[Any, dict[str, dict[str, Any]], Any]:
    """An adaptive search's plan as a Search without runs (its id, experiment and keys), its files, its workers."""
    from trainer.launch import adaptive
    from trainer.launch.k8s import StudyWorkers
    from trainer.search import Search

    if pack > 1:
        raise UserError("--pack applies to --strategy grid only; leave it out for a sampled strategy")
    if not storage_secret:
        raise UserError(f"--strategy {strategy} on Kubernetes needs --study-storage-secret SECRET: a Secret whose "
                        "key `url` is the database its workers share (docs/adaptive-search.md says how to make one)")
    p = adaptive.plan(hyperparams, hyperranges, strategy, trials, prune, sampler_seed)
    for w in p.warnings:
        click.echo(f"warning: {w}", err=True)
    files = {"hyperparams.json": config.read_json(hyperparams, "hyperparams"),
             "hyperranges.json": config.read_json(hyperranges, "hyperranges")}
    s = Search(p.search_id, p.exp_name, (), p.searched_keys, p.warnings)
    return s, files, StudyWorkers(strategy, p.trials, prune, p.sampler_seed, workers, storage_secret)


@click.group(context_settings={"max_content_width": 110})
def k8s() -> None:
    """Run a search on Kubernetes: one pod per expanded run, all logging to one MLflow tracking server.

    \b
      retina-trainer k8s render hyperparams.json hyperranges.json \\
          --image registry.example.com/retina-trainer:0.2.0 \\
          --tracking-uri http://mlflow.retina.svc.cluster.local:5000 --gpus 1 | kubectl apply -f -

    See docs/run-on-kubernetes.md for the whole walk-through.
    """


@k8s.command()
@click.argument("hyperparams", type=click.Path(dir_okay=False))
@click.argument("hyperranges", type=click.Path(dir_okay=False), required=False)
@click.option("--image", required=True, help="Trainer image the pods run (built from docker/Dockerfile).")
@click.option("--tracking-uri", required=True,
              help="MLflow tracking server URI as the pods reach it, e.g. http://mlflow.<ns>.svc.cluster.local:5000.")
@click.option("--local-tracking-uri", default=None,
              help="The same server as this machine reaches it (e.g. http://127.0.0.1:5000 through kubectl "
                   "port-forward), used to create the parent run; default: --tracking-uri.")
@click.option("--parent-run-id", default=None,
              help="Attach the runs to this existing MLflow parent run instead of creating one (nothing is "
                   "contacted at render time).")
@click.option("--tracking-secret", default=None, metavar="SECRET",
              help="Secret (type kubernetes.io/basic-auth: keys username, password) whose credentials the pods "
                   "give the tracking server (MLFLOW_TRACKING_USERNAME / _PASSWORD).")
@click.option("--parallelism", type=click.IntRange(min=1), default=4, show_default=True,
              help="Pods running at once (capped at the number of runs).")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True,
              help="GPUs (of --gpu-resource) per pod (0 = CPU only).")
@click.option("--gpu-resource", default="nvidia.com/gpu", show_default=True,
              help="The GPU resource to ask for: a whole GPU, or a MIG profile such as nvidia.com/mig-3g.20gb.")
@click.option("--data-pvc", default="retina-data", show_default=True,
              help="PersistentVolumeClaim holding <dataset>/<stim_type>.h5, mounted read-only at /data.")
@click.option("--namespace", default=None, help="Namespace of the objects (default: kubectl's current one).")
@click.option("--name", default=None, help="Job name (default: <exp_name>-<search_id>, made DNS-safe).")
@click.option("--queue", default=None, metavar="LOCALQUEUE",
              help="Kueue LocalQueue to submit to: sets the label kueue.x-k8s.io/queue-name and creates the Job "
                   "suspended, for Kueue to admit.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label on the Job and its pods (repeatable), e.g. a site's cost centre or Kueue "
                   "priority (kueue.x-k8s.io/priority-class=...).")
@click.option("--annotation", "annotations", multiple=True, metavar="KEY=VALUE",
              help="An annotation on the Job and its pods (repeatable).")
@click.option("--node-selector", "node_selector", multiple=True, metavar="KEY=VALUE",
              help="Run only on nodes with this label (repeatable), e.g. nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB.")
@click.option("--toleration", "tolerations", multiple=True, metavar="KEY[=VALUE]:EFFECT",
              help="Tolerate a node taint (repeatable), e.g. dedicated=gpu-lab:NoSchedule; with --gpus the usual "
                   "nvidia.com/gpu taint is tolerated already.")
@click.option("--priority-class", default=None, help="The pods' PriorityClass.")
@click.option("--image-pull-secret", "image_pull_secrets", multiple=True, metavar="SECRET",
              help="Secret with the registry's credentials (repeatable).")
@click.option("--service-account", default=None,
              help="The pods' ServiceAccount (its API token is not mounted: the pods need none).")
@click.option("--backoff-limit-per-index", type=click.IntRange(min=0), default=2, show_default=True,
              help="Retries of a failed run (exit 1 or 3, or a crash) before its index is marked failed.")
@click.option("--max-failed-indexes", type=click.IntRange(min=0), default=None,
              help="Stop the whole Job once more runs than this have failed (default: run every index).")
@click.option("--ttl", "ttl_s", type=click.IntRange(min=0), default=None, metavar="SECONDS",
              help="Delete the Job and its pods this long after it finished (ttlSecondsAfterFinished); run "
                   "`k8s finish` before then. Default: keep them.")
@click.option("--active-deadline", "active_deadline_s", type=click.IntRange(min=1), default=None, metavar="SECONDS",
              help="Stop the whole Job after this long (activeDeadlineSeconds, counted from its start or admission).")
@click.option("--cpu", default="2", show_default=True, help="CPU request per pod.")
@click.option("--cpu-limit", default=None, help="CPU limit per pod (default: none).")
@click.option("--memory", default="8Gi", show_default=True, help="Memory request and limit per pod.")
@click.option("--scratch-size", "work_size", default="20Gi", show_default=True,
              help="Size limit of the pod's scratch volume /work (working directory and local checkpoints).")
@click.option("--ephemeral-storage", default=None,
              help="Ephemeral-storage request per pod (default: --scratch-size), so a pod lands on a node with room.")
@click.option("--grace-period", "termination_grace_s", type=click.IntRange(min=0), default=120, show_default=True,
              metavar="SECONDS", help="Time a pod has after SIGTERM to checkpoint and end its run KILLED.")
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True,
              help="One pod per pack of up to K runs that differ only in optimiser settings, stopping rule and "
                   "seed, trained together on one device (see `search --pack`); 1 = one pod per run.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Whether each run's final evaluation logs plots (about 2 s per run; scores either way).")
@click.option("--patch", "patch_files", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="A patch (YAML or JSON) applied to the rendered Job, for anything the options do not cover "
                   "(repeatable, applied in order); checked after patching.")
@click.option("--patch-type", type=click.Choice(["strategic", "merge"]), default="strategic", show_default=True,
              help="How --patch files apply: a strategic merge patch (as kubectl patch) or a JSON merge patch.")
@click.option("--strategy", type=click.Choice(["grid", "random", "tpe"]), default="grid", show_default=True,
              help="grid: one pod per run. random, tpe: --workers pods that pull --trials sampled configurations "
                   "from one Optuna study (see `search --strategy`).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Configurations a sampled strategy trains, over all workers.")
@click.option("--prune", type=click.Choice(["none", "median", "asha", "hyperband"]), default="none",
              show_default=True, help="Stop hopeless trials early (sampled strategies; see `search --prune`).")
@click.option("--sampler-seed", type=int, default=None,
              help="Seed of the sampler (default: seed in hyperparams.json).")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Worker pods of a sampled strategy (all run at once).")
@click.option("--study-storage-secret", default=None, metavar="SECRET",
              help="Secret whose key `url` is the study's database URL (e.g. postgresql+psycopg2://USER:PASSWORD@"
                   "postgres:5432/optuna); required by a sampled strategy, whose workers share the study.")
def render(hyperparams: str, hyperranges: str | None, image: str, tracking_uri: str,
           local_tracking_uri: str | None, parent_run_id: str | None, tracking_secret: str | None, parallelism: int,
           gpus: int, gpu_resource: str, data_pvc: str, namespace: str | None, name: str | None, queue: str | None,
           labels: tuple[str, ...], annotations: tuple[str, ...], node_selector: tuple[str, ...],
           tolerations: tuple[str, ...], priority_class: str | None, image_pull_secrets: tuple[str, ...],
           service_account: str | None, backoff_limit_per_index: int, max_failed_indexes: int | None,
           ttl_s: int | None, active_deadline_s: int | None, cpu: str, cpu_limit: str | None, memory: str,
           work_size: str, ephemeral_storage: str | None, termination_grace_s: int, pack: int, plots: bool,
           patch_files: tuple[str, ...], patch_type: str, strategy: str, trials: int | None, prune: str,
           sampler_seed: int | None, workers: int, study_storage_secret: str | None) -> None:
    """Print the ConfigMap and Indexed Job of a search as YAML for `kubectl apply -f -`.

    Creates the search's MLflow parent run first (or reuses the one of an earlier render of the same search),
    unless --parent-run-id is given. Pod i trains run i of `retina-trainer expand` (with --pack K, pack i); a run
    already FINISHED is skipped, an interrupted one resumes from its checkpoint. Messages go to stderr, YAML to
    stdout. With --strategy random or tpe, --workers pods share one Optuna study in the database of
    --study-storage-secret instead (docs/adaptive-search.md).
    """
    from trainer.launch import k8s as k8s_mod

    study = None
    if strategy == "grid":
        _grid_refuses(trials, prune, sampler_seed, ("study-storage-secret", study_storage_secret),
                      "add --strategy tpe (or random)")
        s, files = _load_search(hyperparams, hyperranges)
    else:
        s, files, study = _load_study(hyperparams, hyperranges, strategy, trials, prune, sampler_seed, workers,
                                      study_storage_secret, pack)
    site = k8s_mod.Site(queue=queue, labels=_pairs(labels, "--label"),
                        annotations=_pairs(annotations, "--annotation"),
                        node_selector=_pairs(node_selector, "--node-selector"),
                        tolerations=[k8s_mod.parse_toleration(t) for t in tolerations],
                        priority_class=priority_class, image_pull_secrets=list(dict.fromkeys(image_pull_secrets)),
                        service_account=service_account, gpu_resource=gpu_resource, ttl_s=ttl_s,
                        active_deadline_s=active_deadline_s, tracking_secret=tracking_secret)
    patches = []
    if patch_files:
        from trainer.launch import k8s_patch

        patches = [(f"--patch {f}", patch_type, k8s_patch.load_patch(f)) for f in patch_files]
    job = name or k8s_mod.job_name(s.exp_name, s.search_id)
    settings = dict(image=image, tracking_uri=tracking_uri, parallelism=parallelism, gpus=gpus, data_pvc=data_pvc,
                    namespace=namespace, name=job, backoff_limit_per_index=backoff_limit_per_index,
                    max_failed_indexes=max_failed_indexes, cpu=cpu, memory=memory, cpu_limit=cpu_limit,
                    work_size=work_size, ephemeral_storage=ephemeral_storage,
                    termination_grace_s=termination_grace_s, pack=pack, plots=plots, site=site, patches=patches,
                    study=study)
    if parent_run_id is None:
        # check everything that needs no server before creating a run on it
        k8s_mod.render(s, files, parent_run_id="pending", **settings)
        uri = local_tracking_uri or tracking_uri
        source = "--local-tracking-uri" if local_tracking_uri else "--tracking-uri"
        ns = f" -n {namespace}" if namespace else ""
        advice = ("forward it (kubectl" + ns + " port-forward svc/mlflow 5000:5000) and pass --local-tracking-uri "
                  "http://127.0.0.1:5000, or pass --parent-run-id ID to render without a server")
        with tracking_errors(uri, source, s.exp_name, advice):
            parent_run_id = create_parent_run(s, files, uri, job, n_runs=study.trials if study else None)
        click.echo(f"parent run {parent_run_id} in experiment '{s.exp_name}' at {uri}", err=True)
    elif not parent_run_id.strip():
        raise UserError("--parent-run-id is empty")
    docs = k8s_mod.render(s, files, parent_run_id=parent_run_id, **settings)
    if patches:
        from trainer.launch import k8s_patch

        note = k8s_patch.validate_schema(docs[1], " ".join(source for source, _, _ in patches))
        if note:
            click.echo(f"warning: {note}", err=True)
    click.echo(k8s_mod.to_yaml(docs), nl=False)
    ns = f" -n {namespace}" if namespace else ""
    pods = docs[1]["spec"]["completions"]
    packed = f" in {pods} packs of up to {pack}" if pack > 1 else ""
    queued = f", submitted suspended to Kueue queue '{queue}'" if queue else ""
    what = f"{study.trials} {strategy} trials by {pods} workers" if study else f"{len(s.runs)} runs{packed}"
    click.echo(f"job {job}: {what}, {docs[1]['spec']['parallelism']} pods at a time{queued}; "
               f"watch it with\n"
               f"  kubectl{ns} get pods -l {k8s_mod.SEARCH_ID_LABEL}={s.search_id}", err=True)


def _tracking_uri_option(f: Any) -> Any:
    return click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", required=True,
                        help="The tracking server as this machine reaches it (e.g. http://127.0.0.1:5000 through "
                             "kubectl port-forward); default: $MLFLOW_TRACKING_URI.")(f)


def _read(ctx: click.Context, hyperparams: str, hyperranges: str | None, tracking_uri: str,
          parent_run_id: str | None, sampled: dict[str, Any]) -> tuple[Any, Any, str]:
    """The search, a Tracker on its (existing) experiment, and its state (a grid's runs, or a sampled strategy's
    study); what the server answers in one line."""
    from trainer.launch import finish as finish_mod

    strategy, storage = sampled["strategy"], sampled["study_storage"]
    if strategy == "grid":
        _grid_refuses(sampled["trials"], sampled["prune"], sampled["sampler_seed"], ("study-storage", storage),
                      "add the --strategy the search was rendered with")
        s, _ = _load_search(hyperparams, hyperranges)
    else:
        from trainer.launch import adaptive

        s = adaptive.plan(hyperparams, hyperranges, strategy, sampled["trials"], sampled["prune"],
                          sampled["sampler_seed"])
        if not storage:
            raise UserError(f"--strategy {strategy} needs --study-storage URL (or ${adaptive.STORAGE_ENV}): the "
                            "database of the study, as this machine reaches it (e.g. postgresql://USER:PASSWORD@"
                            "127.0.0.1:5432/optuna through kubectl port-forward svc/postgres 5432:5432)")
    from_env = ctx.get_parameter_source("tracking_uri") == click.core.ParameterSource.ENVIRONMENT
    source = "MLFLOW_TRACKING_URI" if from_env else "--tracking-uri"
    with _tracking_env(tracking_uri), tracking_errors(tracking_uri, source, s.exp_name):
        tracker = finish_mod.read_tracker(s.exp_name)
        if strategy == "grid":
            state = finish_mod.read_state(tracker, s, parent_run_id)
        else:
            state = finish_mod.read_study_state(tracker, s, storage, parent_run_id)
    return tracker, state, source


def _sampled_options(f: Any) -> Any:
    """The options that name a sampled strategy's study, as `render` took them."""
    for option in reversed([
        click.option("--strategy", type=click.Choice(["grid", "random", "tpe"]), default="grid", show_default=True,
                     help="The strategy the search was rendered with."),
        click.option("--trials", type=click.IntRange(min=1), default=None,
                     help="A sampled strategy's --trials, as rendered."),
        click.option("--prune", type=click.Choice(["none", "median", "asha", "hyperband"]), default="none",
                     show_default=True, help="A sampled strategy's --prune, as rendered."),
        click.option("--sampler-seed", type=int, default=None, help="A sampled strategy's --sampler-seed, as rendered "
                     "(the render command printed it in the pods' command)."),
        click.option("--study-storage", envvar="RETINA_STUDY_STORAGE", default=None, metavar="URL",
                     help="A sampled strategy's study database as this machine reaches it (the URL of the Secret "
                          "of --study-storage-secret, with a forwarded host); default: $RETINA_STUDY_STORAGE."),
    ]):
        f = option(f)
    return f


@k8s.command()
@click.argument("hyperparams", type=click.Path(dir_okay=False))
@click.argument("hyperranges", type=click.Path(dir_okay=False), required=False)
@_tracking_uri_option
@click.option("--parent-run-id", default=None, help="The search's parent run (default: the one render created).")
@_sampled_options
@click.pass_context
def status(ctx: click.Context, hyperparams: str, hyperranges: str | None, tracking_uri: str,
           parent_run_id: str | None, **sampled: Any) -> None:
    """Print where every run of a Kubernetes search stands, from MLflow (changes nothing).

    One row per run: FINISHED, RUNNING (a pod trains it), FAILED or KILLED (with the reason below the table), LOST
    (RUNNING in MLflow but its pod is gone) or PENDING (not started yet). A sampled strategy (--strategy tpe or
    random, with the options it was rendered with and --study-storage): one row per trial of its study, COMPLETE,
    PRUNED, RUNNING, WAITING (to be resumed), LOST (its worker is gone) or FAILED.
    """
    _, state, _ = _read(ctx, hyperparams, hyperranges, tracking_uri, parent_run_id, sampled)
    from trainer.launch import finish as finish_mod

    lines = finish_mod.report(state) if sampled["strategy"] == "grid" else finish_mod.study_report(state)
    click.echo("\n".join(lines))


@k8s.command()
@click.argument("hyperparams", type=click.Path(dir_okay=False))
@click.argument("hyperranges", type=click.Path(dir_okay=False), required=False)
@_tracking_uri_option
@click.option("--parent-run-id", default=None, help="The search's parent run (default: the one render created).")
@click.option("--force", is_flag=True, help="Close the parent run even while pods still train runs.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Log the search plot (best validation r against each searched hyperparameter; a sampled "
                   "strategy: its optimisation history and parameter importances).")
@click.option("--delete", is_flag=True,
              help="Then delete the search's Job and ConfigMap with kubectl (without cluster access: print the "
                   "command).")
@click.option("--namespace", default=None, help="Namespace of the Job and ConfigMap, for --delete.")
@_sampled_options
@click.pass_context
def finish(ctx: click.Context, hyperparams: str, hyperranges: str | None, tracking_uri: str,
           parent_run_id: str | None, force: bool, plots: bool, delete: bool, namespace: str | None,
           **sampled: Any) -> None:
    """Close a Kubernetes search: log its summary table and plot to the parent run and end it FINISHED (every run
    finished) or FAILED (naming the runs that did not; exit 1).

    Run it once the Job is done (`kubectl wait --for=condition=complete` or `=failed`); it refuses while a pod
    still trains a run, unless --force. Running it again is safe (a run fixed and rerun since moves the parent to
    FINISHED). Reads and writes MLflow only; --delete also removes the Job and ConfigMap. A sampled strategy
    (with the options it was rendered with and --study-storage): the study's trials table, best value and plots,
    FINISHED once --trials are done and none failed; the study itself is left as it is.
    """
    from trainer.errors import RunsFailed
    from trainer.launch import finish as finish_mod
    from trainer.launch.k8s import is_dns_label

    if namespace is not None and not is_dns_label(namespace):
        raise UserError(f"--namespace '{namespace}' is not a valid Kubernetes name (lower case letters, digits and "
                        "'-', at most 63 characters)")
    tracker, state, source = _read(ctx, hyperparams, hyperranges, tracking_uri, parent_run_id, sampled)
    grid = sampled["strategy"] == "grid"
    search_id = state.search.search_id if grid else state.plan.search_id
    exp_name = state.search.exp_name if grid else state.plan.exp_name
    with _tracking_env(tracking_uri), tracking_errors(tracking_uri, source, exp_name):
        if grid:
            new_status = finish_mod.finish(tracker, state, plots=plots, force=force)
        else:
            new_status = finish_mod.finish_study(tracker, state, plots=plots, force=force,
                                                 echo=lambda line: click.echo(line, err=True))
    lines = finish_mod.report(state) if grid else finish_mod.study_report(state)
    click.echo("\n".join(lines[:-1]))
    what = "summary table" + (" and plot" if plots and grid else " and plots" if plots else "")
    click.echo(f"parent run {state.parent_id} of search {search_id} ended {new_status}, with the {what} logged to "
               "it", err=True)
    if delete:
        finish_mod.delete(search_id, namespace, lambda line: click.echo(line, err=True))
    if new_status == "FINISHED":
        return
    if grid:
        names = "; ".join(f"run {r.spec.index} {r.spec.name} ({state.why.get(r.spec.index, r.status)})"
                          for r in state.unfinished[:5])
        more = f"; and {len(state.unfinished) - 5} more" if len(state.unfinished) > 5 else ""
        raise RunsFailed(f"{len(state.unfinished)} of {len(state.outcome.runs)} runs of search "
                         f"{search_id} did not finish: {names}{more}")
    bad = [n for n, s in state.states.items() if s not in ("COMPLETE", "PRUNED")]
    names = "; ".join(f"trial {n} ({state.why.get(n, state.states[n])})" for n in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    resumable = state.missing or state.numbers(finish_mod.LOST_TRIAL, "WAITING", "RUNNING")
    advice = ("start a worker again (the Job's pod command) to go on" if resumable else
              "a failed trial counts against --trials (rerun it with a larger --trials to sample more)")
    raise RunsFailed(f"{len(state.done)} of {state.plan.trials} trials of search {search_id} are done"
                     f"{': ' + names + more if names else ''}; {advice}")
