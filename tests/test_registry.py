"""The champion gate on a real sqlite MLflow registry (no Spark, no training: the gate reads only
the registered versions' runs): `champion` moves only when the new test accuracy is at least the
champion's plus `registry.gate_min_delta`; `candidate` always moves."""

from __future__ import annotations

import pytest

from training.config import RegistrySettings
from training.registry import promote

NAME = "gated"


@pytest.fixture()
def registry(tmp_path):
    """A fresh sqlite registry as the process's tracking URI (restored afterwards), and a function
    that registers a version whose run logged `test_accuracy`."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("gate", artifact_location=f"file://{tmp_path / 'artifacts'}")
    client.create_registered_model(NAME)

    def register(accuracy: float) -> int:
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "test_accuracy", accuracy)
        client.set_terminated(run.info.run_id)
        return int(client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run.info.run_id).version)

    yield register, client
    mlflow.set_tracking_uri(previous)


def aliases(client) -> tuple[int, int]:
    return (int(client.get_model_version_by_alias(NAME, "candidate").version),
            int(client.get_model_version_by_alias(NAME, "champion").version))


def test_the_gate_promotes_an_equal_model_and_never_a_worse_one(registry):
    register, client = registry
    settings = RegistrySettings(model_name=NAME)
    first = register(0.5)
    assert promote(settings, first, 0.5).promoted  # no champion yet
    equal = register(0.5)
    promotion = promote(settings, equal, 0.5)  # "at least the champion's": a tie moves the alias
    assert promotion.promoted and (promotion.previous_champion, promotion.previous_metric) == (first, 0.5)
    assert aliases(client) == (equal, equal)
    worse = register(0.4999)
    assert not promote(settings, worse, 0.4999).promoted
    assert aliases(client) == (worse, equal)  # candidate moves, champion stays


def test_the_minimum_delta_is_added_to_the_champions_metric(registry):
    register, client = registry
    settings = RegistrySettings(model_name=NAME, gate_min_delta=0.25)
    champion = register(0.5)
    promote(settings, champion, 0.5)
    short = register(0.74)
    assert not promote(settings, short, 0.74).promoted  # better, but not by the delta
    assert aliases(client) == (short, champion)
    enough = register(0.75)  # 0.5 + 0.25 exactly
    assert promote(settings, enough, 0.75).promoted
    assert aliases(client) == (enough, enough)
