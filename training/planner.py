"""The capacity planner's shell (`deepspark plan`, `jobs/plan.py`): what `training/capacity.py`
needs, measured on the cluster the training will run on, and its prediction logged next to the
measured figures in MLflow.

- Step compute time and input wait: a finished training run's per-epoch breakdown
  (`plan.from_run`), or short runs of the configured training made now (`plan.measure_steps`
  steps, 2 epochs; the second is read, so graph tracing and warm-up stay out) at each of
  `plan.measure_ranks` (default: one rank alone, and the training's ranks, so as many per host):
  how much ranks sharing a host slow each other is measured, not modelled.
- The hosts the ranks spread over: `plan.hosts`, else 1 on a local master, else the executors'.
- Gradient bytes M: the model's trainable parameters, 4 bytes each (2 with fp16 compression).
- Latency and bandwidth between the ranks: an allreduce probe on `plan.probe_ranks` ranks through
  the training engine, timed at several sizes and fitted with the ring's cost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, NonNegativeFloat, PositiveInt

from deepspark.config import ConfigError, FrozenModel
from training import capacity
from training.config import TrainConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


class PlanSettings(FrozenModel):
    """What to measure and which configurations to predict."""

    from_run: str | None = None  # a finished training run's id to read compute and input wait from
    measure_steps: PositiveInt = 20  # else: short runs of the configured training, 2 epochs of this many steps,
    measure_ranks: list[PositiveInt] | None = None  # at these ranks; None: 1 and the training's (its ranks per host)
    hosts: PositiveInt | None = None  # hosts the ranks spread over; None: 1 on a local master, else the executors'
    probe_ranks: PositiveInt | None = None  # ranks of the allreduce probe; default: horovod.num_proc or the task slots
    probe_sizes_mb: list[float] = Field(default_factory=lambda: [0.25, 1.0, 4.0, 16.0])
    probe_repeats: PositiveInt = 5  # timed allreduces per size (after one untimed), the median kept
    ranks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # N to predict
    servers: list[int] = Field(default_factory=lambda: [1, 2, 4])  # parameter servers k to compare with
    overlap: NonNegativeFloat = 0.0  # share of compute communication hides behind (Keras with Horovod: after the backward pass)
    min_efficiency: NonNegativeFloat = 0.7  # the recommended ranks keep at least this scaling efficiency
    inference_batch: PositiveInt = 1024  # the batch size the roofline places inference at (batch_inference's)


class PlanConfig(TrainConfig):
    plan: PlanSettings = PlanSettings()


@dataclass(frozen=True)
class AllreduceProbe:
    """Runs on every rank (a picklable callable, like `RankTask`): times allreduces of each size;
    rank 0 returns the median seconds per size."""

    engine: str
    sizes_bytes: tuple[int, ...]
    repeats: int

    def __call__(self) -> dict[str, Any] | None:
        from training import engines
        from training.distributed import record_timeline

        record_timeline(False)  # a reused worker may hold a training rank's setting
        collective = engines.load(self.engine).collective()
        seconds = []
        for size in self.sizes_bytes:
            values = np.ones(max(size // 8, 1))  # float64
            collective.allreduce(values, "sum", f"probe{size}warm")
            timed = []
            for i in range(self.repeats):
                started = time.perf_counter()
                collective.allreduce(values, "sum", f"probe{size}_{i}")
                timed.append(time.perf_counter() - started)
            seconds.append(float(np.median(timed)))
        slowest = collective.allreduce(np.array(seconds), "max", "probe_slowest")  # every rank's view, the slowest
        return {"sizes": list(self.sizes_bytes), "seconds": [float(s) for s in slowest]} if collective.rank == 0 else None


@dataclass(frozen=True)
class Measured:
    """One training configuration as measured by its epoch breakdown (rank 0's view)."""

    run_id: str
    ranks: int
    batch_per_rank: int
    steps: int
    backward_passes_per_step: int
    trained_s: float  # the epoch's training steps: compute, input wait and communication
    input_wait_s: float  # per step
    communication_s: float  # per step: time with an allreduce negotiating or in flight (Horovod's timeline)

    @property
    def step_s(self) -> float:
        return self.trained_s / self.steps

    def compute_s(self, grad_bytes: float, link: capacity.Link, overlap: float = 0.0) -> float:
        """A rank's compute per step, as the cost model has it: `capacity.step_s` solved for compute
        at the measured step, input wait and the ring allreduce the link predicts at these ranks.
        (The timeline's communication overlaps the backward pass, which keeps computing while
        early layers' gradients are reduced: taking it all off would undercount compute.)"""
        comm = capacity.ring_allreduce_s(self.ranks, grad_bytes, link) / self.backward_passes_per_step
        busy = self.step_s - self.input_wait_s
        compute = busy  # all of the communication hidden behind compute: step = compute + wait
        if comm > overlap * busy:  # else the part not hidden adds: step = (1 - overlap) compute + wait + comm
            compute = (busy - comm) / (1.0 - overlap) if overlap < 1.0 else busy
        return max(compute, 1e-6)

    @classmethod
    def of_run(cls, run_id: str) -> "Measured":
        """From a run's last logged epoch breakdown."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        run = client.get_run(run_id)
        metrics, params = run.data.metrics, run.data.params
        needed = ("time_compute_s", "time_input_wait_s", "time_negotiation_s", "time_allreduce_s")
        missing = [k for k in needed if k not in metrics]
        if missing:
            raise ConfigError(f"plan.from_run: run {run_id} logged no epoch breakdown ({', '.join(missing)}); "
                              "train it with this version of DeepSpark")
        ranks = int(params.get("resolved.num_proc", 1))
        steps = int(params["resolved.steps_per_epoch"])
        batch = int(params["resolved.global_batch_size"]) // ranks
        passes = int(params.get("horovod.backward_passes_per_step", 1))
        comm = metrics["time_negotiation_s"] + metrics["time_allreduce_s"]
        trained = metrics.get("time_steps_s", metrics["time_compute_s"] + metrics["time_input_wait_s"] + comm)
        return cls(run_id, ranks, batch, steps, passes, trained, metrics["time_input_wait_s"] / steps, comm / steps)


def gradient_bytes(model: Any, compression: str) -> int:
    """Bytes of one gradient exchange: trainable parameters x 4, x 2 with fp16 compression."""
    params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return params * (2 if compression == "fp16" else 4)


def probe(cfg: PlanConfig, engine_ref: str, ranks: int) -> capacity.Link:
    """The allreduce probe on `ranks` ranks through the training engine, fitted to a link."""
    from training import engines

    if ranks < 2:
        raise ConfigError(f"plan.probe_ranks: the allreduce probe needs >= 2 ranks, not {ranks}")
    engine = engines.load(engine_ref)
    sizes = tuple(int(mb * 2**20) for mb in cfg.plan.probe_sizes_mb)
    preflight = getattr(engine, "preflight", None)
    launched = preflight(ranks, cfg) if preflight is not None else cfg
    launched = launched.model_copy(update={"horovod": launched.horovod.model_copy(update={"timeline": False})})
    results = engine.launch(AllreduceProbe(engine_ref, sizes, cfg.plan.probe_repeats), ranks, launched)
    found = next(r for r in results if r)
    link = capacity.fit_link(ranks, found["sizes"], found["seconds"])
    log.info("allreduce probe on %d ranks: %s -> latency %.3g ms, %.3g GB/s", ranks,
             ", ".join(f"{s / 2**20:g} MB {t * 1000:.2f} ms" for s, t in zip(found["sizes"], found["seconds"])),
             link.latency_s * 1000, link.bytes_per_s / 1e9)
    return link


@dataclass(frozen=True)
class CapacityPlan:
    measured: Measured
    link: capacity.Link
    grad_bytes: int
    compute_s: float  # per step and rank, from the measurement (Measured.compute_s)
    predictions: list[capacity.Prediction]
    servers: dict[int, dict[int, float]]  # ranks -> servers -> seconds of one push and pull
    recommended_ranks: int
    backward_passes_per_step: int
    fusion_threshold_mb: int
    rows: int
    overlap: float = 0.0
    roofline: "tuple[Any, list[Any]] | None" = None  # (machine, bounds) from training/roofline.py
    host: capacity.Host = capacity.Host()  # the hosts, and each measured run's compute at its ranks per host

    @property
    def measured_epoch_s(self) -> float:
        """The measured step over a whole epoch of `rows` at the measured ranks: the same scale as
        each prediction's `epoch_s` (the measuring run may have run fewer steps)."""
        m = self.measured
        return capacity.epoch_s(self.rows, m.batch_per_rank, m.ranks, m.step_s)

    def predicted_trained_s(self, ranks: int, steps: int, backward_passes_per_step: int = 1) -> float:
        """Seconds of `steps` training steps at `ranks` (an epoch's steps part, as the breakdown
        measures it)."""
        comm = capacity.ring_allreduce_s(ranks, self.grad_bytes, self.link)
        return steps * capacity.step_s(self.host.compute_s(ranks, self.compute_s), self.measured.input_wait_s, comm,
                                       self.overlap, backward_passes_per_step)

    def summary(self) -> str:
        m = self.measured
        lines = [f"capacity plan from run {m.run_id} ({m.ranks} rank(s), {m.batch_per_rank} rows per rank and step): "
                 f"compute {self.compute_s * 1000:.1f} ms/step, input wait {m.input_wait_s * 1000:.1f} ms/step, "
                 f"gradients {self.grad_bytes / 2**20:.2f} MB, link {self.link.latency_s * 1e6:.0f} us latency, "
                 f"{self.link.bytes_per_s / 1e9:.2f} GB/s",
                 f"{self.host.hosts} host(s); a rank's compute per step measured at "
                 + (", ".join(f"{r} rank(s) per host {c * 1000:.1f} ms" for r, c in sorted(self.host.crowded))
                    or "its run's ranks")
                 + "; predictions at other ranks per host are extrapolated (marked)",
                 f"{'ranks':>6}{'allreduce ms':>14}{'step ms':>10}{'no overlap':>12}{'epoch s':>10}{'efficiency':>12}"
                 + "".join(f"{f'PS k={k} ms':>12}" for k in sorted(next(iter(self.servers.values()), {})))]
        for p in self.predictions:
            lines.append(f"{p.ranks:>6}{p.comm_s * 1000:>14.2f}{p.step_s * 1000:>10.1f}{p.step_no_overlap_s * 1000:>12.1f}"
                         f"{p.epoch_s:>10.2f}{p.efficiency:>12.2f}"
                         + "".join(f"{s * 1000:>12.2f}" for _, s in sorted(self.servers[p.ranks].items()))
                         + ("" if self.host.measured(p.ranks) else "  (extrapolated)"))
        lines.append(f"measured at {m.ranks} rank(s): {m.trained_s:.2f} s for {m.steps} training steps; predicted "
                     f"{self.predicted_trained_s(m.ranks, m.steps):.2f} s")
        if self.roofline is not None:
            machine, bounds = self.roofline
            lines.append(f"roofline of one rank's core(s): {machine.flops_per_s / 1e9:.1f} GFLOP/s, "
                         f"{machine.bytes_per_s / 1e9:.1f} GB/s, ridge {machine.ridge:.1f} FLOPs/byte")
            lines += [f"  {b.mode} at batch {b.batch}: {b.flops / 1e6:.2f} MFLOPs and {b.bytes / 1e6:.2f} MB per sample, "
                      f"{b.intensity:.1f} FLOPs/byte: {b.bound}-bound, at most {b.samples_per_s:,.0f} samples/s"
                      for b in bounds]
        lines.append(f"recommended: horovod.num_proc={self.recommended_ranks} "
                     f"horovod.backward_passes_per_step={self.backward_passes_per_step} "
                     f"horovod.fusion_threshold_mb={self.fusion_threshold_mb}")
        return "\n".join(lines)


def make_plan(measured: Measured, link: capacity.Link, grad_bytes: int, rows: int, settings: PlanSettings,
              hosts: int = 1, calibration: "tuple[Measured, ...]" = ()) -> CapacityPlan:
    """Predictions for every N in `settings.ranks` (and the measured N), the parameter servers'
    exchange times, and the recommendations: the most ranks keeping `min_efficiency`; the fewest
    backward passes per step that bring the recommended ranks' communication under the compute;
    a fusion buffer holding all gradients. A rank's compute per step at N ranks is what `measured`
    and the `calibration` runs show at N's ranks per host over `hosts` (`capacity.Host`)."""
    candidates = sorted({*settings.ranks, measured.ranks})
    spread = capacity.Host(hosts)
    per_host = {spread.ranks_per_host(m.ranks): m.compute_s(grad_bytes, link, settings.overlap)
                for m in (*calibration, measured)}
    host = capacity.Host(hosts, tuple(sorted(per_host.items())))
    compute = host.compute_s(1, 0.0)  # a rank alone on its host (measured, or the nearest point)
    predictions = capacity.predict(candidates, compute, measured.input_wait_s, grad_bytes, link, rows,
                                   measured.batch_per_rank, settings.overlap, host=host)
    servers = {n: {k: capacity.parameter_server_s(n, k, grad_bytes, link) for k in settings.servers}
               for n in candidates}
    ranks = capacity.recommend_ranks(predictions, settings.min_efficiency)
    comm = capacity.ring_allreduce_s(ranks, grad_bytes, link)
    busy = host.compute_s(ranks, compute)  # a rank's compute at the recommended ranks
    passes = max(1, math.ceil(comm / busy)) if comm > busy else 1
    return CapacityPlan(measured, link, grad_bytes, compute, predictions, servers, ranks, passes,
                        capacity.fusion_threshold_mb(grad_bytes), rows, settings.overlap, host=host)


def run_job(spark: "SparkSession", cfg: PlanConfig) -> CapacityPlan:
    """Measure (or read a run), probe the link, predict, and log the plan as an MLflow run."""
    import mlflow

    from deepspark import builders
    from deepspark.spark import task_slots
    from deepspark.tracking import ensure_experiment, job_run
    from training.job import plan as plan_training
    from training.job import run_job as train

    if not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled: the planner reads training runs from MLflow; set it to true")
    ensure_experiment(cfg.tracking)
    probe_ranks = cfg.plan.probe_ranks or cfg.horovod.num_proc or task_slots(spark)
    if probe_ranks < 2:
        raise ConfigError(f"plan.probe_ranks: the allreduce probe needs >= 2 ranks, not {probe_ranks}")
    hosts = cfg.plan.hosts or executor_hosts(spark)
    run_id = cfg.plan.from_run
    calibration: tuple[Measured, ...] = ()
    if run_id is None:
        ranks = cfg.horovod.num_proc or task_slots(spark)
        runs = []
        for measure_ranks in sorted(set(cfg.plan.measure_ranks or [1, ranks])):  # the training's ranks per host
            measuring = TrainConfig.model_validate({
                **cfg.model_dump(exclude={"plan"}), "epochs": 2, "steps_per_epoch": cfg.plan.measure_steps,
                "horovod": {**cfg.horovod.model_dump(), "num_proc": measure_ranks, "elastic": False},
                "registry": {**cfg.registry.model_dump(), "enabled": False},
                "run_name": f"plan: measure {measure_ranks} rank(s)"})
            runs.append(Measured.of_run(str(train(spark, measuring).run_id)))
        *calibration_runs, measured = runs  # the most ranks: the plan's measured run
        calibration = tuple(calibration_runs)
        run_id = measured.run_id
    else:
        measured = Measured.of_run(run_id)
    planned = plan_training(spark, cfg)
    model = builders.build(planned.builder, planned.dataset.record, cfg.model.params)
    grad_bytes = gradient_bytes(model, cfg.horovod.compression)
    link = probe(cfg, planned.engine, probe_ranks)
    result = make_plan(measured, link, grad_bytes, planned.dataset.rows(cfg.data.train_split), cfg.plan, hosts,
                       calibration)
    from training import roofline

    costs = roofline.layer_costs(model)
    machine = executor_machine(spark, cfg.horovod.intra_op_threads)
    bounds = [roofline.bound(costs, machine, cfg.optimizer.batch_size, training=True),
              roofline.bound(costs, machine, cfg.plan.inference_batch, training=False)]
    result = dataclasses.replace(result, roofline=(machine, bounds))
    log.info("%s", result.summary())
    with job_run(cfg.tracking, "plan", cfg, {"deepspark.job": "plan", "plan.from_run": run_id}) as run:
        if run is not None:
            mlflow.log_metrics({"link_latency_s": link.latency_s, "link_bytes_per_s": link.bytes_per_s,
                                "gradient_bytes": grad_bytes, "compute_s_per_step": result.compute_s,
                                "input_wait_s_per_step": measured.input_wait_s,
                                "hosts": hosts, **{f"compute_s_per_step_at_{r}_per_host": c
                                                   for r, c in result.host.crowded},
                                "measured_train_s_per_epoch": measured.trained_s,
                                "measured_epoch_s": result.measured_epoch_s,
                                "recommended_num_proc": result.recommended_ranks,
                                "recommended_backward_passes_per_step": result.backward_passes_per_step,
                                "recommended_fusion_threshold_mb": result.fusion_threshold_mb,
                                "peak_flops_per_s": machine.flops_per_s, "memory_bytes_per_s": machine.bytes_per_s,
                                **{f"{b.mode}_flops_per_byte": b.intensity for b in bounds}})
            mlflow.set_tags({f"roofline.{b.mode}": f"{b.bound}-bound" for b in bounds})
            for p in result.predictions:  # one step per number of ranks, so MLflow charts them over N
                mlflow.log_metrics({"predicted_epoch_s": p.epoch_s, "predicted_step_s": p.step_s,
                                    "predicted_allreduce_s": p.comm_s, "predicted_efficiency": p.efficiency},
                                   step=p.ranks)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "plan.txt")
                with open(path, "w") as fh:
                    fh.write(result.summary() + "\n")
                plot_plan(result, os.path.join(tmp, "predicted_epoch_s.png"))
                roofline.plot(costs, machine, bounds, os.path.join(tmp, "roofline.png"))
                mlflow.log_artifacts(tmp, "plan")
    return result


def executor_machine(spark: "SparkSession", threads: int) -> Any:
    """The roofline's peaks measured where ranks run: in one Spark task, with a rank's threads."""
    from training.roofline import measure_machine  # pickled by reference: the task imports it there

    return spark.sparkContext.parallelize([threads], 1).map(measure_machine).collect()[0]


def executor_hosts(spark: "SparkSession") -> int:
    """The hosts ranks would spread over: 1 on a local master, else the distinct hosts one task
    per slot ran on."""
    import socket

    from deepspark.spark import is_local, task_slots

    if is_local(spark.sparkContext.master or "local"):
        return 1
    slots = task_slots(spark)
    return max(1, spark.sparkContext.parallelize(range(slots), slots).map(lambda _: socket.gethostname())
               .distinct().count())


def plot_plan(result: CapacityPlan, path: str) -> None:
    """Predicted epoch seconds (training steps) over ranks, with the measured point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p.ranks for p in result.predictions], [p.epoch_s for p in result.predictions], "o-", label="predicted")
    ax.plot([result.measured.ranks], [result.measured_epoch_s], "s", color="tab:red", label="measured (its step)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks")
    ax.set_ylabel("seconds of training steps per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
