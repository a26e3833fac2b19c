"""`retina-trainer k8s`: print the Kubernetes manifests of a search (ConfigMap + Indexed Job) for kubectl.

Imports no torch; mlflow only to create the search's parent run, which every pod's child run attaches to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import click

from trainer import config
from trainer.errors import UserError

# MLflow client settings while render talks to the server: an unreachable server is reported in seconds.
RENDER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_DISABLE_TELEMETRY": "true"}


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


def create_parent_run(search: Any, files: dict[str, dict[str, Any]], uri: str, job: str) -> str:
    """Create (or reuse, for a search rendered before) the search's MLflow parent run on the server at `uri`."""
    with _tracking_env(uri):
        from trainer.tracking import Tracker

        tracker = Tracker(search.exp_name)
        run_id, _ = tracker.parent_run(search.search_id, search.exp_name, len(search.runs),
                                       list(search.searched_keys), files)
        tracker.client.set_tag(run_id, "launcher", "kubernetes")
        tracker.client.set_tag(run_id, "k8s_job", job)
    return run_id


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
@click.option("--parallelism", type=click.IntRange(min=1), default=4, show_default=True,
              help="Pods running at once (capped at the number of runs).")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True,
              help="nvidia.com/gpu per pod (0 = CPU only).")
@click.option("--data-pvc", default="retina-data", show_default=True,
              help="PersistentVolumeClaim holding <dataset>/<stim_type>.h5, mounted read-only at /data.")
@click.option("--namespace", default=None, help="Namespace of the objects (default: kubectl's current one).")
@click.option("--name", default=None, help="Job name (default: <exp_name>-<search_id>, made DNS-safe).")
@click.option("--backoff-limit-per-index", type=click.IntRange(min=0), default=2, show_default=True,
              help="Retries of a failed run (exit 1 or a crash) before its index is marked failed.")
@click.option("--max-failed-indexes", type=click.IntRange(min=0), default=None,
              help="Stop the whole Job once more runs than this have failed (default: run every index).")
@click.option("--cpu", default="2", show_default=True, help="CPU request per pod.")
@click.option("--memory", default="8Gi", show_default=True, help="Memory request and limit per pod.")
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True,
              help="One pod per pack of up to K runs that differ only in optimiser settings, stopping rule and "
                   "seed, trained together on one device (see `search --pack`); 1 = one pod per run.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Whether each run's final evaluation logs plots (about 2 s per run; scores either way).")
def render(hyperparams: str, hyperranges: str | None, image: str, tracking_uri: str,
           local_tracking_uri: str | None, parent_run_id: str | None, parallelism: int, gpus: int, data_pvc: str,
           namespace: str | None, name: str | None, backoff_limit_per_index: int, max_failed_indexes: int | None,
           cpu: str, memory: str, pack: int, plots: bool) -> None:
    """Print the ConfigMap and Indexed Job of a search as YAML for `kubectl apply -f -`.

    Creates the search's MLflow parent run first (or reuses the one of an earlier render of the same search),
    unless --parent-run-id is given. Pod i trains run i of `retina-trainer expand` (with --pack K, pack i); a run
    already FINISHED is skipped, an interrupted one resumes from its checkpoint. Messages go to stderr, YAML to
    stdout.
    """
    from trainer.launch import k8s as k8s_mod
    from trainer.search import expand

    s = expand(hyperparams, hyperranges)
    for w in s.warnings:
        click.echo(f"warning: {w}", err=True)
    files = {"hyperparams.json": config.read_json(hyperparams, "hyperparams")}
    if hyperranges:
        files["hyperranges.json"] = config.read_json(hyperranges, "hyperranges")
    job = name or k8s_mod.job_name(s.exp_name, s.search_id)
    if parent_run_id is None:
        # check everything that needs no server before creating a run on it
        k8s_mod.render(s, files, image=image, tracking_uri=tracking_uri, parent_run_id="pending",
                       parallelism=parallelism, gpus=gpus, data_pvc=data_pvc, namespace=namespace, name=job,
                       backoff_limit_per_index=backoff_limit_per_index, max_failed_indexes=max_failed_indexes,
                       cpu=cpu, memory=memory, pack=pack, plots=plots)
        uri = local_tracking_uri or tracking_uri
        parent_run_id = create_parent_run(s, files, uri, job)
        click.echo(f"parent run {parent_run_id} in experiment '{s.exp_name}' at {uri}", err=True)
    elif not parent_run_id.strip():
        raise UserError("--parent-run-id is empty")
    docs = k8s_mod.render(s, files, image=image, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                          parallelism=parallelism, gpus=gpus, data_pvc=data_pvc, namespace=namespace, name=job,
                          backoff_limit_per_index=backoff_limit_per_index, max_failed_indexes=max_failed_indexes,
                          cpu=cpu, memory=memory, pack=pack, plots=plots)
    click.echo(k8s_mod.to_yaml(docs), nl=False)
    ns = f" -n {namespace}" if namespace else ""
    pods = docs[1]["spec"]["completions"]
    packed = f" in {pods} packs of up to {pack}" if pack > 1 else ""
    click.echo(f"job {job}: {len(s.runs)} runs{packed}, {docs[1]['spec']['parallelism']} pods at a time; watch it "
               f"with\n"
               f"  kubectl{ns} get pods -l {k8s_mod.SEARCH_ID_LABEL}={s.search_id}", err=True)
