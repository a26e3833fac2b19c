"""The champion rule of `register`, in process against a real local MLflow store (SQLite): which run is the best
one, and when the alias moves, for metrics where higher is better and where lower is."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from trainer import tracking


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One store for the module (creating one takes seconds); each test uses its own experiment and model names."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('rules') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield MlflowClient(uri)
        mlflow.set_tracking_uri(None)


def finished_run(client, exp_id, **metrics):
    run = client.create_run(exp_id, tags={tracking.ROLE: "run"})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
    return client.get_run(run.info.run_id)


def champion(client, name):
    return client.get_model_version_by_alias(name, tracking.CHAMPION).version


@pytest.mark.parametrize("metric, better, best, worse", [
    ("best_val_pearson", "higher", 0.6, 0.2),
    ("val_loss", "lower", -3.0, -1.0),
])
def test_the_champion_moves_only_to_a_better_run(client, tmp_path, metric, better, best, worse):
    """First run: champion. A better one takes the alias; a worse one becomes a new version and the alias stays."""
    name = f"m-{metric}"
    exp = client.create_experiment(f"rules-{metric}", artifact_location=str(tmp_path / "art"))
    middle = (best + worse) / 2
    runs = [finished_run(client, exp, **{metric: v}) for v in (middle, best, worse)]
    first = tracking.register_run(client, runs[0], metric, name)
    assert first["champion_moved"] and champion(client, name) == first["version"]
    second = tracking.register_run(client, runs[1], metric, name)
    assert second["champion_moved"] and second["previous_value"] == middle
    assert champion(client, name) == second["version"]
    third = tracking.register_run(client, runs[2], metric, name)
    assert not third["already"] and third["version"] != second["version"]  # a new version ...
    assert not third["champion_moved"] and champion(client, name) == second["version"]  # ... the alias stays
    again = tracking.register_run(client, runs[2], metric, name)  # already registered: nothing new
    assert again["already"] and again["version"] == third["version"]


@pytest.mark.parametrize("metric, values, pick", [
    ("best_val_pearson", (0.3, 0.7, 0.5), 1),
    ("val_loss", (-2.0, -1.0, -4.0), 2),
])
def test_register_picks_the_best_finished_run_in_the_metrics_direction(client, tmp_path, metric, values, pick):
    exp_name = f"pick-{metric}"
    exp = client.create_experiment(exp_name, artifact_location=str(tmp_path / "art"))
    runs = [finished_run(client, exp, **{metric: v}) for v in values]
    unfinished = client.create_run(exp, tags={tracking.ROLE: "run"})  # better than all, but not FINISHED
    client.log_metric(unfinished.info.run_id, metric, 100.0 if metric == "best_val_pearson" else -100.0)
    out = tracking.register_best(exp_name, metric=metric, name=f"p-{metric}")
    assert out["run_id"] == runs[pick].info.run_id and out["value"] == values[pick]
