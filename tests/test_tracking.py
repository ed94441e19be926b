"""The MLflow experiment as a user's `make ui` opens it: a real sqlite store."""

from deepspark.tracking import TrackingSettings, ensure_experiment


def test_experiment_is_tagged_for_model_development_also_when_it_already_existed(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    old = mlflow.create_experiment("older", artifact_location=f"file://{tmp_path / 'a'}")  # as earlier versions did
    settings = {"uri": uri, "artifact_root": str(tmp_path / "artifacts")}
    new = ensure_experiment(TrackingSettings(experiment="fresh", **settings))
    assert ensure_experiment(TrackingSettings(experiment="older", **settings)) == old
    client = mlflow.MlflowClient(uri)
    for experiment_id in (new, old):
        assert client.get_experiment(experiment_id).tags.get("mlflow.experimentKind") == "custom_model_development"
