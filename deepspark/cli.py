"""Command-line entry points: every job is `<job> [--profile P] [key=value ...]`.

`jobs/*.py` (for spark-submit) and the `deepspark` console script both land here, so a
job behaves the same whichever way it is started. Heavy modules load only when a job runs.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import click

from deepspark.config import ConfigError, load_config
from deepspark.logs import configure_logging


@dataclass(frozen=True)
class JobSpec:
    config: str  # "module:Class" of the job's frozen config
    runner: str  # "module:function" taking (spark, config), or (config) when needs_spark is False
    needs_spark: bool = True


JOBS: dict[str, JobSpec] = {
    "etl": JobSpec("pipelines.config:EtlConfig", "pipelines.etl:run_job"),
    "featurize": JobSpec("pipelines.config:FeaturizeConfig", "pipelines.featurize:run_job"),
    "train": JobSpec("training.config:TrainConfig", "training.job:run_job"),
    "select_models": JobSpec("training.selection.config:SelectConfig", "training.selection.job:run_job"),
    "batch_inference": JobSpec("inference.config:BatchInferenceConfig", "inference.job:run_job"),
    "plan": JobSpec("training.planner:PlanConfig", "training.planner:run_job"),
    "demo_data": JobSpec("pipelines.demo_data:DemoDataConfig", "pipelines.demo_data:run_job", False),
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def run_in_session(spark: Any, job: str, overrides: Sequence[str], profile: str | None = None) -> Any:
    """One Spark job, its config resolved as on the command line, run in an existing session
    (a demo or a benchmark chaining jobs in one SparkSession); its result."""
    spec = JOBS[job]
    return _load(spec.runner)(spark, load_config(_load(spec.config), job, overrides, profile))


def run_job(job: str, profile: str | None, overrides: Sequence[str]) -> Any:
    """Resolve the config (failing before Spark starts), build the session, run, print the summary."""
    spec = JOBS[job]
    try:
        cfg = load_config(_load(spec.config), job, overrides, profile)
    except ConfigError as exc:
        raise click.UsageError(f"{job}: {exc}") from None
    if not spec.needs_spark:
        result = _load(spec.runner)(cfg)
    else:
        from deepspark.spark import build_session, prefer_installed_pyspark

        prefer_installed_pyspark()
        spark = build_session(cfg.spark)
        try:
            result = _load(spec.runner)(spark, cfg)
        except ConfigError as exc:
            raise click.UsageError(f"{job}: {exc}") from None
        finally:
            spark.stop()
    summary = getattr(result, "summary", None)
    click.echo(summary() if callable(summary) else str(result))
    code = int(getattr(result, "exit_code", 0))
    if code:  # the job ran and committed, with something to signal to a scheduler (e.g. drift)
        raise click.exceptions.Exit(code)
    return result


def job_command(job: str) -> click.Command:
    """A click command for one job, shared by jobs/*.py and the `deepspark` group."""

    @click.command(name=job.replace("_", "-"), context_settings={"ignore_unknown_options": True})
    @click.option("--profile", default=None, help="config profile: a folder under conf/")
    @click.argument("overrides", nargs=-1)
    def command(profile: str | None, overrides: tuple[str, ...]) -> None:
        """Run the job; overrides are key=value with dotted keys, e.g. image.height=32."""
        configure_logging()
        # py4j reports (at INFO, on the root logger) a connection it then retries successfully
        # when Horovod drives Spark from another thread: noise, not an error.
        for noisy in ("petastorm", "pyarrow"):  # legacy-dataset API notices, not actionable by users
            warnings.filterwarnings("ignore", category=FutureWarning, module=noisy)
        run_job(job, profile, overrides)

    return command


@click.group()
def main() -> None:
    """DeepSpark jobs."""


for _name in JOBS:
    main.add_command(job_command(_name))

if __name__ == "__main__":
    main(sys.argv[1:])
