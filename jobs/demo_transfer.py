"""spark-submit jobs/demo_transfer.py [key=value ...]: `make demo-transfer`.

A backbone that DeepSpark trains on five Fashion-MNIST classes, transferred to the five others
(50 labelled images each, never seen by the backbone) three ways on the same split and epoch
budget: feature transfer (featurize once, train a head), fine-tuning (all layers, from the
backbone's weights) and training from scratch. Each step is the real job (its own MLflow run), in
one SparkSession; all three register as versions of one model, whose champion is the best.
Overrides (e.g. `epochs=30`) apply to the three target trainings.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import click

RAW = "data/raw/fashion-mnist-transfer"
TARGET_MODEL = "fashion-target"
BACKBONE = "models:/fashion-backbone@champion"
TARGET_EPOCHS = 20


def steps(raw: str = RAW, root: str = "data/datasets", extra: Sequence[str] = (),
          common: Sequence[str] = ()) -> list[tuple[str, str, list[str]]]:
    """(name, job, overrides) in order; `extra` goes to the three target trainings, `common` (e.g.
    tracking.uri=...) to every step."""
    budget = [f"epochs={TARGET_EPOCHS}", "optimizer.batch_size=16", "optimizer.warmup_epochs=0",
              f"registry.model_name={TARGET_MODEL}", *extra]
    plan = [
        ("source data", "etl", [f"input.path={raw}/source", f"output.root={root}", "output.name=fashion-source"]),
        ("backbone", "train", [f"data.root={root}", "data.name=fashion-source", "epochs=8",
                               "registry.model_name=fashion-backbone", "run_name=transfer:backbone"]),
        ("target data", "etl", [f"input.path={raw}/target", f"output.root={root}", "output.name=fashion-target"]),
        ("featurize", "featurize", [f"source.root={root}", "source.name=fashion-target", f"backbone={BACKBONE}",
                                    "layers=[flatten, dense]", f"output.root={root}",
                                    "output.name=fashion-target-features"]),
        # A head is small: one task trains it (no Horovod ranks to start).
        ("feature transfer", "train", [f"data.root={root}", "data.name=fashion-target-features", "model.name=mlp",
                                       "model.params={layer: flatten}", "engine=single", "run_name=transfer:features",
                                       *budget]),
        ("fine-tuning", "train", [f"data.root={root}", "data.name=fashion-target", f"model.init_from={BACKBONE}",
                                  "optimizer.learning_rate=0.0005", "run_name=transfer:finetune", *budget]),
        ("from scratch", "train", [f"data.root={root}", "data.name=fashion-target", "run_name=transfer:scratch",
                                   *budget]),
    ]
    return [(name, job, [*overrides, *common]) for name, job, overrides in plan]


def run_steps(spark: Any, plan: list[tuple[str, str, list[str]]]) -> dict[str, tuple[Any, float]]:
    """Each step's result and wall seconds, in order, in this SparkSession."""
    from deepspark.cli import run_in_session

    done = {}
    for name, job, overrides in plan:
        started = time.perf_counter()
        done[name] = (run_in_session(spark, job, overrides), time.perf_counter() - started)
    return done


def main(argv: Sequence[str]) -> None:
    from deepspark.logs import configure_logging
    from deepspark.spark import SparkSettings, build_session, prefer_installed_pyspark

    configure_logging()
    prefer_installed_pyspark()
    spark = build_session(SparkSettings(app_name="deepspark-demo-transfer"))
    try:
        done = run_steps(spark, steps(extra=argv))
    finally:
        spark.stop()
    lines = ["", "=== DeepSpark transfer demo: five classes the backbone never saw, 45 labelled train images each ==="]
    featurize_s, head_s = done["featurize"][1], done["feature transfer"][1]
    for name, seconds, how in (("feature transfer", featurize_s + head_s, f"(featurize {featurize_s:.1f} + head "
                                                                         f"{head_s:.1f})"),
                               ("fine-tuning", done["fine-tuning"][1], ""), ("from scratch", done["from scratch"][1], "")):
        result = done[name][0]
        lines.append(f"{name:<17} test accuracy {result.test['test_accuracy']:.4f}  {seconds:5.1f} s  "
                     f"{TARGET_MODEL} v{result.model_version} {how}")
    lines.append(f"{TARGET_MODEL}@champion is the best of the three; `make ui` shows every run")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
