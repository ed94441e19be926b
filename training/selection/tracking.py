"""MLflow for a search: one parent run (the job's run: config, space, budget, leaderboard, plots)
and one child run per configuration (its training config as params, per-epoch metrics, its final
model). The winner is registered and goes through the same champion gate as `jobs/train.py`.
The store's `trials.json` ties child runs to configurations, so a resumed search reopens them."""

from __future__ import annotations

import logging
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np

from deepspark import builders
from deepspark.builders import short_name
from deepspark.config import ConfigError, flatten
from deepspark.tracking import TrackingSettings, ensure_experiment
from training.selection.store import TRIALS, Store, unit_name

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlflow.entities import Run

    from training.selection.config import SelectConfig
    from training.selection.job import Progress, SearchPlan

STORE_TAG = "deepspark.selection.store"
EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "epoch_seconds")


class SearchTracker:
    def __init__(self, cfg: "SelectConfig", run: "Run | None", plan: "SearchPlan", store: Store,
                 resumed: dict[str, Any] | None) -> None:
        self.cfg, self.run, self.plan, self.store = cfg, run, plan, store
        self.child_ids: dict[int, str | None] = {int(k): v for k, v in (resumed or {}).get("child_ids", {}).items()}
        self.logged: dict[int, set[int]] = {}

    @staticmethod
    def stored_search(settings: TrackingSettings, parent_id: str) -> dict[str, Any]:
        """The configurations, store and child runs of the search whose parent run is `parent_id`."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        ensure_experiment(settings)
        try:
            run = MlflowClient().get_run(parent_id)
        except MlflowException:
            raise ConfigError(f"resume={parent_id}: no such MLflow run") from None
        if STORE_TAG not in run.data.tags:
            raise ConfigError(f"resume={parent_id}: not a model-selection run (no {STORE_TAG} tag)")
        store = Store(run.data.tags[STORE_TAG])
        return {**store.read_json(TRIALS), "store": store.url}

    @property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient()

    def start(self, units_per_epoch: int) -> None:
        """Child runs for every configuration, then `trials.json`, then the parent's store tag."""
        import mlflow

        parent = self.run.info.run_id if self.run else None
        for trial in self.plan.trials:
            if self.run is None:
                self.child_ids[trial.index] = None
                continue
            tags = {"mlflow.parentRunId": self.run.info.run_id, "deepspark.job": "select_models.trial",
                    "deepspark.selection.trial": str(trial.index),
                    "deepspark.selection.searched": ",".join(sorted(self.plan.params[trial.index]))}
            child = self.client.create_run(self.run.info.experiment_id, tags=tags,
                                           run_name=f"trial-{trial.index:02d}:{short_name(trial.builder)}")
            params = {**flatten(trial.cfg), "resolved.model_builder": trial.builder,
                      "resolved.steps_per_epoch": str(trial.steps_per_epoch)}
            items = sorted(params.items())
            from mlflow.entities import Param

            for start in range(0, len(items), 100):
                self.client.log_batch(child.info.run_id, params=[Param(k, v[:6000]) for k, v in items[start:start + 100]])
            self.child_ids[trial.index] = child.info.run_id
        self.store.write_json(TRIALS, {"params": self.plan.params, "child_ids": self.child_ids,
                                       "units_per_epoch": units_per_epoch, "workers": self.plan.workers,
                                       "execution": self.cfg.execution.method,
                                       "search_id": parent or self.store.url.rstrip("/").rpartition("/")[2]})
        if self.run:
            mlflow.set_tags({STORE_TAG: self.store.url, "deepspark.selection.configurations": str(len(self.plan.trials)),
                             "deepspark.selection.rungs": ",".join(map(str, self.plan.rungs))})
            mlflow.log_dict({"space": self.cfg.search.space, "method": self.cfg.search.method,
                             "configurations": self.plan.params}, "search/space.json")

    def catch_up(self, progress: "Progress") -> None:
        """On a resume, log the epochs whose markers landed after the killed driver last logged."""
        for trial in self.plan.trials:
            run_id = self.child_ids.get(trial.index)
            if run_id is None:
                continue
            if self.cfg.resume:
                self.client.update_run(run_id, "RUNNING")
            done = {m.step for m in self.client.get_metric_history(run_id, "samples_per_s")}
            self.logged[trial.index] = done
            for epoch, metrics in enumerate(progress.epochs(trial.index)):
                if epoch not in done:
                    self.log_epoch(trial.index, epoch, metrics)

    def interrupted(self) -> None:
        """A stage failed: the child runs end FAILED with their parent (a resume reopens them)."""
        for run_id in self.child_ids.values():
            if run_id is not None:
                self.client.set_terminated(run_id, "FAILED")

    def log_epoch(self, trial: int, epoch: int, metrics: dict[str, float]) -> None:
        run_id = self.child_ids.get(trial)
        log.info("trial %d epoch %d: %s", trial, epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if run_id is None or epoch in self.logged.setdefault(trial, set()):
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        self.logged[trial].add(epoch)

    def final_model(self, trial: int, units: int) -> Any:
        """The configuration's model holding the state of its last unit, built on the driver."""
        from training.trainer import Solo, compiled_model, load_state

        spec = self.plan.trials[trial]
        model = compiled_model(spec.cfg, self.plan.dataset.record, spec.builder, spec.steps_per_epoch, Solo())[0]
        load_state(self.store.read(unit_name(trial, units - 1, "ckpt")), model)
        return model

    def finish(self, progress: "Progress", leaderboard: list[dict[str, Any]], winner: int, stopped: dict[int, int],
               seconds: float) -> tuple[dict[str, float], str]:
        """Test the winner, log every final model (registering the winner), the leaderboard and its
        plots; apply the champion gate; end the child runs."""
        import mlflow

        from deepspark.serving import log_classifier
        from training.data import ShardSpec, strided_rows
        from training.trainer import Solo, evaluate

        dataset, cfg = self.plan.dataset, self.cfg
        record = dataset.record
        model = self.final_model(winner, len(progress.markers[winner]))
        test_split = cfg.data.test_split
        test: dict[str, float] = {}
        reference = None
        if test_split in dataset.manifest["splits"]:
            rows = strided_rows(ShardSpec(dataset.split_url(test_split), record.spec, record.modality),
                                None if cfg.max_eval_rows is None
                                else max(cfg.max_eval_rows, cfg.registry.drift_reference_rows))
            evaluated = rows if cfg.max_eval_rows is None else (rows[0][: cfg.max_eval_rows], rows[1][: cfg.max_eval_rows])
            test = evaluate(model, *evaluated, len(record.labels), cfg.eval_batch_size, "test_", Solo())[0]
            reference = rows[0][: cfg.registry.drift_reference_rows] if cfg.registry.drift_reference_rows else None
        if self.run is None:
            return test, ""
        registry_line, version = "", None
        for row in leaderboard:
            trial, run_id = row["trial"], row["run_id"]
            is_winner = trial == winner
            final = model if is_winner else self.final_model(trial, len(progress.markers[trial]))
            with mlflow.start_run(run_id=run_id, nested=True):
                with tempfile.TemporaryDirectory() as tmp:
                    registered = cfg.registry.model_name if is_winner and cfg.registry.enabled else None
                    builder = self.plan.trials[trial].builder
                    info = log_classifier(final, record, registered, tmp, builder=builder,
                                          user_code=builders.user_code(builder),
                                          reference_inputs=reference if is_winner else None)
                metrics = {"final_val_accuracy": row["val_accuracy"], "final_val_loss": row["val_loss"],
                           "best_val_accuracy": row["best_val_accuracy"], "epochs_trained": row["epochs"]}
                if is_winner:
                    metrics.update(test)
                    version = int(info.registered_model_version) if info.registered_model_version else None
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
                mlflow.set_tags({"deepspark.selection.winner": str(is_winner).lower(),
                                 **({"deepspark.selection.stopped_at_epoch": str(stopped[trial])} if trial in stopped else {})})
        self._log_leaderboard(progress, leaderboard, winner, seconds)
        mlflow.log_metrics({"winner_trial": winner, "search_seconds": seconds,
                            **{f"winner_{k}": v for k, v in test.items()}})
        mlflow.set_tag("deepspark.selection.winner_run_id", str(self.child_ids.get(winner)))
        if version is not None and test:
            from training.registry import promote

            promotion = promote(cfg.registry, version, test[cfg.registry.gate_metric])
            registry_line = promotion.summary(cfg.registry.model_name, cfg.registry)
        return test, registry_line

    def _log_leaderboard(self, progress: "Progress", leaderboard: list[dict[str, Any]], winner: int,
                         seconds: float) -> None:
        import os

        import mlflow
        import pandas as pd

        from training.selection import plots
        from training.selection.space import parse_space

        table = pd.DataFrame([{"trial": r["trial"], **{f"param.{k}": v for k, v in r["params"].items()},
                               **{k: v for k, v in r.items() if k not in ("params", "trial")},
                               "winner": r["trial"] == winner} for r in leaderboard])
        mlflow.log_table(table, "search/leaderboard.json")
        metric = "val_accuracy"
        curves = {t.index: [e.get(metric, np.nan) for e in progress.epochs(t.index)] for t in self.plan.trials}
        log_keys = {d.key for d in parse_space(self.cfg.search.space) if d.kind.endswith("loguniform")}
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(os.path.join(tmp, "leaderboard.csv"), index=False)
            plots.validation_curves(curves, metric, winner, os.path.join(tmp, "validation_curves.png"))
            plots.hyperparameters(leaderboard, metric, log_keys, os.path.join(tmp, "hyperparameters.png"))
            mlflow.log_artifacts(tmp, "search")
