"""MLflow plumbing: one run per job, opened on the driver, with the resolved config logged.

Default tracking is a sqlite database and a local artifact root under `data/mlflow/`;
any tracking URI works (`tracking.uri=http://host:5000`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from pydantic import BaseModel

from deepspark.config import FrozenModel, config_to_yaml, flatten

if TYPE_CHECKING:
    from mlflow.entities import Run

DEFAULT_DB = "data/mlflow/mlflow.db"
DEFAULT_ARTIFACTS = "data/mlflow/artifacts"


class TrackingSettings(FrozenModel):
    enabled: bool = True
    uri: str | None = None  # default: sqlite database at data/mlflow/mlflow.db
    # Where a new experiment keeps artifacts. Unset: data/mlflow/artifacts beside the default sqlite
    # store; with a tracking server, the server's own root (its --artifacts-destination), which
    # every host reaches through the server, never a folder on the driver's disk.
    artifact_root: str | None = None
    experiment: str = "deepspark"


def tracking_uri(settings: TrackingSettings) -> str:
    """The configured URI, else the project's sqlite store (absolute, so cwd does not matter later)."""
    if settings.uri:
        return settings.uri
    db = os.path.abspath(DEFAULT_DB)
    os.makedirs(os.path.dirname(db), exist_ok=True)
    return f"sqlite:///{db}"


def _is_server(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


# MLflow 3's UI opens an experiment on its GenAI traces overview unless it is tagged as model
# training; DeepSpark's experiments hold training, ETL and inference runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(settings: TrackingSettings) -> str:
    """Point MLflow at the store and return the experiment id, creating it if needed (tagged as a
    model-development experiment, so the MLflow UI opens on its runs)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(settings))
    experiment = mlflow.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        if not EXPERIMENT_KIND.items() <= experiment.tags.items():  # made before the tag existed
            for key, value in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = settings.artifact_root
    if location is None and _is_server(tracking_uri(settings)):
        return mlflow.create_experiment(settings.experiment, tags=EXPERIMENT_KIND)
    location = location or DEFAULT_ARTIFACTS
    if "://" not in location:
        os.makedirs(location, exist_ok=True)
        location = "file://" + os.path.abspath(location)
    return mlflow.create_experiment(settings.experiment, artifact_location=location, tags=EXPERIMENT_KIND)


@contextmanager
def job_run(settings: TrackingSettings, run_name: str, config: BaseModel, tags: dict[str, str] | None = None,
            resume_run_id: str | None = None) -> Iterator["Run | None"]:
    """Open the job's single MLflow run (or nothing when tracking is disabled). With
    `resume_run_id` the existing run is reopened; it ends FAILED if the block raises."""
    if not settings.enabled:
        yield None
        return
    import mlflow

    experiment_id = ensure_experiment(settings)
    if resume_run_id is not None:
        with mlflow.start_run(run_id=resume_run_id) as run:
            mlflow.set_tags({**(tags or {}), "deepspark.resumed": "true"})
            yield run
        return
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        params = flatten(config)
        items = list(params.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict((k, v[:6000]) for k, v in items[start : start + 100]))
        mlflow.log_text(config_to_yaml(config), "config/resolved.yaml")
        yield run


def log_dataset_input(url: str, name: str, digest: str, context: str, tags: dict[str, str] | None = None) -> None:
    """The active run's input as an MLflow dataset (name, source URL, digest): the runs table and
    the run page show what a training or an inference job read."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if url.startswith("file:/") and not url.startswith("file://"):  # Hadoop's file:/a form
        url = url.replace("file:", "file://", 1)
    # MetaDataset is concrete at run time; mlflow's annotations declare its `profile` abstract.
    meta = MetaDataset(resolve_dataset_source(url), name=name, digest=digest)  # type: ignore[abstract]
    mlflow.log_input(meta, context=context, tags=tags)
