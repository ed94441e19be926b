"""Model registry: register every trained model as `candidate`; move `champion` only when the
gate metric is at least the current champion's."""

from __future__ import annotations

from dataclasses import dataclass

from training.config import RegistrySettings


@dataclass(frozen=True)
class Promotion:
    version: int
    promoted: bool
    previous_champion: int | None
    previous_metric: float | None
    metric: float

    def summary(self, name: str, settings: RegistrySettings) -> str:
        verdict = (f"now @{settings.champion_alias}" if self.promoted
                   else f"stays @{settings.candidate_alias}; @{settings.champion_alias} remains v{self.previous_champion}")
        against = "" if self.previous_metric is None else f" vs champion {self.previous_metric:.4f}"
        return f"model {name} v{self.version}: {settings.gate_metric} {self.metric:.4f}{against} -> {verdict}"


def promote(settings: RegistrySettings, version: int, metric: float) -> Promotion:
    """Set the candidate alias, then apply the champion gate."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = settings.model_name
    client.set_registered_model_alias(name, settings.candidate_alias, str(version))
    try:
        champion = client.get_model_version_by_alias(name, settings.champion_alias)
    except MlflowException:
        champion = None
    previous_metric = None
    if champion is not None and champion.run_id:
        previous_metric = client.get_run(champion.run_id).data.metrics.get(settings.gate_metric)
    promoted = champion is None or previous_metric is None or metric >= previous_metric + settings.gate_min_delta
    if promoted:
        client.set_registered_model_alias(name, settings.champion_alias, str(version))
    return Promotion(version, promoted, int(champion.version) if champion else None, previous_metric, metric)
