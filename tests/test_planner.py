"""The capacity planner's shell: a real short training run measured (real local[2] Spark, real
Horovod ranks over gloo, sqlite MLflow), a real allreduce probe on 2 ranks, the plan logged."""

from __future__ import annotations

import pytest

from deepspark.config import ConfigError, load_config
from training.planner import PlanConfig

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def plan_config(dataset, store, *extra):
    return load_config(PlanConfig, "plan", [
        f"data.root={dataset.root}", f"data.name={dataset.name}", *store, "plan.measure_steps=6",
        "optimizer.batch_size=16", "max_eval_rows=100", "plan.probe_sizes_mb=[0.25, 1, 4]", "plan.probe_repeats=3",
        "plan.ranks=[1, 2, 4, 8]", *extra])


def test_the_planner_measures_a_run_probes_the_link_and_logs_its_prediction(spark, fashion_small, mlflow_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.planner import run_job

    result = run_job(spark, plan_config(fashion_small, mlflow_store))
    m = result.measured
    assert (m.ranks, m.steps, m.batch_per_rank) == (2, 6, 16) and result.compute_s > 0 and m.communication_s > 0
    # Measured at 1 rank alone and at 2 sharing the host: a rank's compute at each, the alone one the plan's.
    crowded = dict(result.host.crowded)
    assert sorted(crowded) == [1, 2] and result.compute_s == crowded[1] and result.host.hosts == 1
    assert "1 rank(s) per host" in result.summary()
    # The convnet's trainable parameters, 4 bytes each (what one allreduce moves).
    from deepspark import builders
    from deepspark.datasets import open_dataset

    record = open_dataset(spark, str(fashion_small.root), fashion_small.name).record
    model = builders.build(builders.reference(None, None, record.plugin)[0], record, {})
    assert result.grad_bytes == 4 * model.count_params()
    assert result.link.bytes_per_s > 1e7 and result.link.latency_s >= 0  # loopback: well over 10 MB/s
    comm = {p.ranks: p.comm_s for p in result.predictions}
    assert comm[1] == 0 and comm[2] < comm[4] < comm[8]
    assert [p.efficiency for p in result.predictions] == sorted((p.efficiency for p in result.predictions),
                                                               reverse=True)
    assert result.recommended_ranks in comm and result.fusion_threshold_mb >= 128
    assert "recommended: horovod.num_proc=" in result.summary()

    client = MlflowClient()
    plan_run = mlflow.search_runs(experiment_names=["deepspark"], filter_string="tags.`deepspark.job` = 'plan'",
                                  output_format="list")[0]
    assert plan_run.data.tags["plan.from_run"] == m.run_id  # the measured run, beside its prediction
    history = {x.step: x.value for x in client.get_metric_history(plan_run.info.run_id, "predicted_epoch_s")}
    assert sorted(history) == [1, 2, 4, 8]
    assert plan_run.data.metrics["measured_train_s_per_epoch"] == pytest.approx(m.trained_s)
    assert plan_run.data.metrics["compute_s_per_step_at_2_per_host"] == pytest.approx(crowded[2])
    # the measured step over a whole epoch (the train split at 2 x 16 rows per step), beside predicted_epoch_s
    train_rows = open_dataset(spark, str(fashion_small.root), fashion_small.name).rows("train")
    assert plan_run.data.metrics["measured_epoch_s"] == pytest.approx(-(-train_rows // 32) * m.step_s)
    assert {a.path for a in client.list_artifacts(plan_run.info.run_id, "plan")} == {
        "plan/plan.txt", "plan/predicted_epoch_s.png", "plan/roofline.png"}
    # The roofline: peaks measured on an executor; the convnet trains at batch 16 and infers at 1024.
    assert plan_run.data.metrics["peak_flops_per_s"] > 1e8 and plan_run.data.metrics["memory_bytes_per_s"] > 1e8
    assert plan_run.data.metrics["inference_flops_per_byte"] > plan_run.data.metrics["training_flops_per_byte"]
    assert plan_run.data.tags["roofline.inference"] in ("compute-bound", "memory-bound")
    assert "roofline of one rank's core(s)" in result.summary()

    # A finished run is read instead of measuring again: no new training run.
    trained = len(mlflow.search_runs(experiment_names=["deepspark"], filter_string="tags.`deepspark.job` = 'train'"))
    again = run_job(spark, plan_config(fashion_small, mlflow_store, f"plan.from_run={m.run_id}"))
    assert again.measured == m
    assert len(mlflow.search_runs(experiment_names=["deepspark"],
                                  filter_string="tags.`deepspark.job` = 'train'")) == trained


def test_the_planner_needs_tracking_and_two_probe_ranks(spark, fashion_small, mlflow_store):
    from training.planner import run_job

    with pytest.raises(ConfigError, match="tracking.enabled"):
        run_job(spark, plan_config(fashion_small, ["tracking.enabled=false"]))
    with pytest.raises(ConfigError, match="plan.probe_ranks: the allreduce probe needs >= 2 ranks"):
        run_job(spark, plan_config(fashion_small, mlflow_store, "plan.probe_ranks=1", "horovod.num_proc=1"))
