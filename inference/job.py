"""Batch inference job: resolve the model (or several versions of it) once, score only what each
model version has not scored yet, commit predictions and quarantine atomically, report accuracy
where labels exist, and where several models disagree."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from deepspark import filesystem, monitoring
from deepspark.config import ConfigError
from deepspark.locks import Lease
from deepspark.monitoring import Verdict
from deepspark.spark import frame_from_pandas
from deepspark.storage import HadoopFS
from inference import monitor
from inference.config import BatchInferenceConfig
from inference.model import ResolvedModel, resolve_and_ship
from inference.state import KEY, SOURCE, PredictionStore
from inference.udf import SCORED_DDL, CounterParam, make_scorer

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counts:
    """Where each input went. Files: listed = skipped by metadata + hashed; hashed = unchanged +
    scored + quarantined. Text records are listed and skipped per file, hashed per record."""

    listed: int = 0  # input files found (a dataset split: its rows)
    skipped: int = 0  # files whose (path, size, mtime) is committed: not read at all
    hashed: int = 0  # inputs read and hashed
    unchanged: int = 0  # hashed, but (path, content hash) is committed: not scored again
    scored: int = 0
    quarantined: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {"inputs_listed": self.listed, "skipped_by_metadata": self.skipped, "inputs_hashed": self.hashed,
                "unchanged_content": self.unchanged, "scored": self.scored, "quarantined": self.quarantined}


@dataclass(frozen=True)
class InferenceResult:
    job_id: str
    model: str
    counts: Counts
    model_loads: int
    seconds: float
    accuracy: float | None
    output: str
    modality: str
    commit: int | None  # the log entry that made this run visible; None when there was nothing new
    per_model: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # version -> scored, quarantined, unchanged
    disagreement: "Disagreement | None" = None  # several models: where their labels differ
    lineage: "Lineage | None" = None  # what the run read, for MLflow's dataset input
    drift: "Drift | None" = None  # monitoring's verdicts against each version's reference

    @property
    def exit_code(self) -> int:
        """3 when `monitor.fail_on_drift` is set and a statistic drifted (a scheduler's signal;
        the run's predictions are committed all the same), else 0."""
        return 3 if self.drift is not None and self.drift.fail_on_drift and self.drift.detected else 0

    @property
    def scored(self) -> int:
        return self.counts.scored

    @property
    def quarantined(self) -> int:
        return self.counts.quarantined

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"batch inference {self.job_id} with {self.model} -> {self.output}"
            + (f" (commit {self.commit})" if self.commit is not None else " (nothing new: no commit)"),
            f"listed {c.listed}: skipped by metadata {c.skipped} (unchanged since committed, not read), "
            f"read and hashed {c.hashed}",
            f"hashed {c.hashed} = scored now {c.scored} + quarantined {c.quarantined} + already scored {c.unchanged}",
            f"{self.seconds:.1f} s, {c.scored / self.seconds if self.seconds else 0:,.0f} rows/s, "
            f"model loaded {self.model_loads} time(s)",
        ]
        if self.accuracy is not None:
            lines.append(f"accuracy against the input's labels: {self.accuracy:.4f}")
        if len(self.per_model) > 1:
            for version, (good, bad, same) in self.per_model.items():
                lines.append(f"  model version {version}: hashed {c.hashed} = scored now {good} + quarantined {bad} "
                             f"+ already scored {same}")
        if self.disagreement is not None:
            d = self.disagreement
            lines.append(f"models disagree on {d.differing} of {d.compared} inputs all of them scored now "
                         f"({d.share:.1%})" + ("; most often: " + ", ".join(f"{a} vs {b} ({n})" for a, b, n in d.top_pairs)
                                               if d.top_pairs else ""))
        if self.drift is not None:
            lines.extend(self.drift.lines())
        return "\n".join(lines)


@dataclass(frozen=True)
class Drift:
    """Each monitored version's verdicts in one window; versions without a reference."""

    verdicts: dict[int, list[Verdict]]
    window: str
    unmonitored: tuple[int, ...] = ()
    fail_on_drift: bool = False
    labels: tuple[str, ...] = ()
    plots: str = "on_drift"

    @property
    def detected(self) -> bool:
        return any(v.drifted for found in self.verdicts.values() for v in found)

    def lines(self) -> list[str]:
        out = [f"drift of model version {version} vs its reference ({self.window} window, "
               f"{max((v.rows for v in found if v.method != 'mmd'), default=0)} rows): {monitoring.summary(found)}"
               for version, found in self.verdicts.items()]
        if self.unmonitored:
            out.append("not monitored: model version(s) " + ", ".join(map(str, self.unmonitored))
                       + " hold no drift reference (logged before monitoring, or with registry.drift_reference_rows=0)")
        return out


@dataclass(frozen=True)
class Lineage:
    """The input a run read, as MLflow dataset lineage: a dataset version (its id as digest), or
    a folder or record file (a digest of its listing: path, size and modification time of each file)."""

    name: str
    url: str
    digest: str

    @classmethod
    def of_listing(cls, root: str, listing: "tuple[tuple[str, int, int], ...]") -> "Lineage":
        import hashlib

        text = "\n".join(f"{p}\t{s}\t{m}" for p, s, m in sorted(listing))
        return cls(root.rstrip("/").rpartition("/")[2] or root, root, hashlib.sha256(text.encode()).hexdigest()[:16])


@dataclass(frozen=True)
class Candidates:
    """The rows to hash and maybe score, with the counts known before scoring."""

    rows: "DataFrame | None"  # path, content_hash, payload or tensor, label_name, malformed, source metadata
    source: str  # files | records | dataset
    root: str | None
    listed: int
    skipped: int
    hashed_in_workers: bool = False  # rows hold no bytes and no hash: the scorer reads and hashes
    # model version -> candidate path -> the hashes it was committed under
    seen: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    lineage: Lineage | None = None


def _candidates(spark: "SparkSession", cfg: BatchInferenceConfig, fs: HadoopFS, model: ResolvedModel,
                committed: "dict[int, DataFrame | None]", tables: "dict[int, pa.Table] | None" = None
                ) -> Candidates:
    """What this run must read: raw input files whose (path, size, mtime) is not committed for
    some model version (the listing's metadata decides, no content is read), or a dataset split's
    rows. Driver-side checks first; errors name the config key. `tables`: the committed rows'
    source and hash columns read by the driver, when it reaches the output (compared without a
    Spark job)."""
    import pandas as pd
    from pyspark.sql import functions as F

    if cfg.input.path is None:
        rows, lineage = _dataset_rows(spark, cfg, model)
        return Candidates(rows, "dataset", None, 0, 0, lineage=lineage)
    from deepspark.inputs import RecordColumns, list_inputs, open_inputs, resolve_input

    plugin = model.record.plugin
    glob = cfg.input.glob or plugin.default_glob
    root, kind = resolve_input(fs, cfg.input.path, "input.path", cfg.input.format, "records" in plugin.input_kinds)
    listing = list_inputs(fs, root, "input.path", kind, glob)
    lineage = Lineage.of_listing(root, listing)
    in_workers = kind == "files" and filesystem.reaches(root)  # else binaryFile + sha2 and a JVM anti-join
    seen: dict[int, dict[str, list[str]]] = {}
    fresh = listing
    if all(c is not None for c in committed.values()) and listing:
        fresh, seen = (_changed_files_read(listing, tables, in_workers) if tables is not None
                       else _changed_files(spark, listing, committed, with_hashes=in_workers))
    elif listing and in_workers and any(c is not None for c in committed.values()):  # one version scored none yet
        seen = _hashes_under(spark, [p for p, _, _ in listing], committed, "source")
    if not fresh:
        return Candidates(None, kind, root, len(listing), len(listing), lineage=lineage)
    inputs = open_inputs(spark, fs, root, "input.path", kind, glob, cfg.files_per_task,
                         RecordColumns(cfg.input.text_column, cfg.input.label_column, label_required=False,
                                       encoding=cfg.input.encoding),
                         listing=fresh, whole=len(fresh) == len(listing), read_in_workers=in_workers)
    meta = frame_from_pandas(spark, pd.DataFrame(fresh, columns=SOURCE))
    rows = inputs.frame.join(F.broadcast(meta), "source", "left")  # left: a row without metadata is still scored
    if inputs.payload_in_workers:  # the scorer reads and hashes, and skips a file committed with its hash
        rows = rows.withColumn("content_hash", F.lit(None).cast("string"))
    else:
        payload = F.coalesce("payload", F.lit("")) if kind == "records" else F.col("payload")
        rows = rows.withColumn("content_hash", F.sha2(payload, 256))  # hashed by the JVM, once
    return Candidates(rows, kind, root, len(listing), len(listing) - len(fresh), inputs.payload_in_workers, seen,
                      lineage)


def _changed_files(spark: "SparkSession", listing: tuple[tuple[str, int, int], ...],
                   committed: "dict[int, DataFrame | None]", with_hashes: bool
                   ) -> tuple[tuple[tuple[str, int, int], ...], dict[int, dict[str, list[str]]]]:
    """Listed files whose (path, size, mtime) some model version has not committed (an anti-join
    per version on the committed rows' narrow metadata columns), and, `with_hashes`, per version
    the content hashes each such path was committed under (a semi-join, only when some file
    changed; the scorer that hashes files itself needs them, the JVM route anti-joins on (path,
    hash) instead)."""
    import pandas as pd
    from pyspark.sql import functions as F

    listed = frame_from_pandas(spark, pd.DataFrame(listing, columns=SOURCE))
    new: set[tuple[str, int, int]] = set()
    for frame in committed.values():
        known = frame.select(*SOURCE).where(F.col("source_size").isNotNull())  # type: ignore[union-attr]
        new.update((r[0], int(r[1]), int(r[2])) for r in listed.join(known, SOURCE, "left_anti").collect())
    fresh = tuple(entry for entry in listing if entry in new)  # in listing order
    if not fresh or not with_hashes:  # the usual hourly run: one anti-join per version, nothing else
        return fresh, {}
    return fresh, _hashes_under(spark, [p for p, _, _ in fresh], committed, "source")


def _changed_files_read(listing: tuple[tuple[str, int, int], ...], tables: "dict[int, pa.Table]",
                        with_hashes: bool) -> tuple[tuple[tuple[str, int, int], ...], dict[int, dict[str, list[str]]]]:
    """`_changed_files` over the committed rows the driver read itself: the same answer, sets
    instead of a Spark anti-join (the no-op hourly run's comparison runs no Spark job)."""
    new: set[tuple[str, int, int]] = set()
    for table in tables.values():
        known = {(path, size, modified) for path, size, modified in zip(
            table["source"].to_pylist(), table["source_size"].to_pylist(), table["source_modified"].to_pylist())
            if size is not None}
        new.update(entry for entry in listing if entry not in known)
    fresh = tuple(entry for entry in listing if entry in new)
    if not fresh or not with_hashes:
        return fresh, {}
    wanted = {path for path, _, _ in fresh}
    seen: dict[int, dict[str, list[str]]] = {}
    for version, table in tables.items():
        found: dict[str, list[str]] = {}
        for path, digest in zip(table["source"].to_pylist(), table["content_hash"].to_pylist()):
            if path in wanted:
                found.setdefault(path, []).append(digest)
        if found:
            seen[version] = found
    return fresh, seen


def _hashes_under(spark: "SparkSession", paths: list[str], committed: "dict[int, DataFrame | None]",
                  column: str) -> dict[int, dict[str, list[str]]]:
    """Per model version, the content hashes each of `paths` was committed under (keyed by the
    committed rows' `column`: `source` for files, `path` for records and dataset rows)."""
    import pandas as pd

    frame = frame_from_pandas(spark, pd.DataFrame({column: paths}))
    seen: dict[int, dict[str, list[str]]] = {}
    for version, rows in committed.items():
        if rows is None:
            continue
        found = seen.setdefault(version, {})
        for path, digest in rows.select(column, "content_hash").join(frame, column, "left_semi").collect():
            found.setdefault(path, []).append(digest)
    return {v: found for v, found in seen.items() if found}


def _dataset_rows(spark: "SparkSession", cfg: BatchInferenceConfig, model: ResolvedModel
                  ) -> "tuple[DataFrame, Lineage]":
    """A dataset split whose stored tensors match the model's (checked on the driver)."""
    from pyspark.sql import functions as F

    from deepspark.datasets import open_dataset

    try:
        dataset = open_dataset(spark, cfg.input.dataset_root, cfg.input.dataset, cfg.input.dataset_version)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise ConfigError(f"input.dataset: {exc}") from None
    held, wanted = dataset.record, model.record
    if (held.modality, held.spec) != (wanted.modality, wanted.spec):
        raise ConfigError(f"input.dataset: {dataset.name} v={dataset.version} holds {held.modality} "
                          f"{held.spec.dtype} {held.spec.shape} tensors but {model.uri} expects {wanted.modality} "
                          f"{wanted.spec.dtype} {wanted.spec.shape}")
    if (held.state, dict(held.rules)) != (wanted.state, dict(wanted.rules)):
        raise ConfigError(f"input.dataset: {dataset.name} v={dataset.version} was preprocessed with other rules or "
                          f"fitted state (e.g. resize mode, vocabulary) than {model.uri}; score its raw inputs with "
                          "input.path instead")
    try:
        url = dataset.split_url(cfg.input.split)
    except KeyError as exc:
        raise ConfigError(f"input.split: {exc.args[0]}") from None
    rows = (spark.read.parquet(url).select("path", "content_hash", held.spec.column, "label_name")
            .withColumn("source", F.col("path")).withColumn("source_size", F.lit(None).cast("long"))
            .withColumn("source_modified", F.lit(None).cast("long")))
    return rows, Lineage(f"{dataset.name}@v{dataset.version}", dataset.url, dataset.dataset_id)


def resolve_models(spark: "SparkSession", cfg: BatchInferenceConfig, workdir: str) -> list[ResolvedModel]:
    """Every configured URI as one concrete version (a version named twice is scored once); the
    versions must belong to one registered model (the output is keyed by its version) and
    preprocess alike (each input is decoded once for all of them)."""
    models: dict[tuple[str, int], ResolvedModel] = {}  # by name too: `other/1` is not `mine/1` named twice
    for uri in cfg.uris:
        try:
            model = resolve_and_ship(spark, uri, workdir)
        except ConfigError as exc:  # named by the key the user set
            raise ConfigError(str(exc).replace("model_uri:", "model_uris:", 1) if cfg.model_uris else str(exc)) from None
        models.setdefault((model.name, model.version), model)
    chosen = list(models.values())
    first = chosen[0]
    for other in chosen[1:]:
        if other.name != first.name:
            raise ConfigError(f"model_uris: {other.uri} and {first.uri} are different registered models; the output "
                              "is keyed by model version, so score versions of one model per output")
        if other.record != first.record:
            raise ConfigError(f"model_uris: {other.uri} preprocesses its inputs differently from {first.uri} "
                              "(modality, tensor, rules, fitted state or labels); score them in separate jobs")
    return chosen


def run_inference(spark: "SparkSession", cfg: BatchInferenceConfig) -> InferenceResult:
    """Score what each model version has not scored yet and commit it, holding the output's lease."""
    started = time.perf_counter()
    job_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    fs = HadoopFS(spark)
    from deepspark.tracking import ensure_experiment

    ensure_experiment(cfg.tracking)  # the registry lives in the tracking store
    store = PredictionStore.open(fs, cfg.output.path, cfg.output.quarantine_path)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_rows))
    # Shipped files must outlive the job while the SparkContext lives (executors may fetch late).
    workdir = tempfile.mkdtemp(prefix="deepspark-model-")
    models = resolve_models(spark, cfg, workdir)  # concrete versions for the whole job
    if cfg.input.path is None:
        _dataset_rows(spark, cfg, models[0])  # its checks, before taking the lock
    fs.mkdirs(store.url)
    lease = Lease(fs, store.lock_url, job_id, cfg.lock_ttl_s)
    lease.acquire(cfg.force_unlock)
    try:
        lease.check()
        removed = store.vacuum(cfg.output.retain_hours * 3600)  # killed runs' batches; we hold the lock
        if removed:
            log.info("removed %d uncommitted or replaced batch folder(s)", len(removed))
        return _score(spark, cfg, fs, models, store, lease, job_id, started, workdir)
    finally:
        lease.release()


def _score(spark, cfg: BatchInferenceConfig, fs: HadoopFS, models: list[ResolvedModel], store: PredictionStore,
           lease: Lease, job_id: str, started: float, workdir: str) -> InferenceResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    model = models[0]
    versions = [m.version for m in models]
    base = store.current()
    committed = {v: None if cfg.full_refresh else store.committed(spark, v, [*KEY, *SOURCE], base) for v in versions}
    read_here = None  # raw files against committed rows the driver reads itself, where it reaches them
    if cfg.input.path is not None and all(c is not None for c in committed.values()):
        read = {v: store.committed_table(v, [*SOURCE, "content_hash"], base) for v in versions}
        if all(t is not None for t in read.values()):
            read_here = {v: t for v, t in read.items() if t is not None}
    plan = _candidates(spark, cfg, fs, model, committed, read_here)
    log.info("%d listed, %d skipped by metadata, in %.1f s", plan.listed, plan.skipped, time.perf_counter() - started)

    def result(counts: Counts, loads: int, accuracy: float | None, commit: int | None,
               per_model: dict[int, tuple[int, int, int]] | None = None,
               disagreement: Disagreement | None = None, drift: Drift | None = None) -> InferenceResult:
        return InferenceResult(job_id, ", ".join(m.uri for m in models), counts, loads,
                               time.perf_counter() - started, accuracy, store.url, model.record.modality, commit,
                               per_model or {}, disagreement, plan.lineage, drift)

    if plan.rows is None:  # a no-op run: no content read, nothing written, no commit
        return result(Counts(plan.listed, plan.skipped), 0, None, _compact(spark, cfg, store, models, lease, job_id))
    # Only a run with something to score reads the references (a no-op run stays as cheap as before).
    references = {m.version: ref for m in models if cfg.monitor.enabled
                  for ref in [monitor.load_reference(m, workdir)] if ref is not None}
    rows = plan.rows
    # Files: one row per listed candidate (known without a pass); records and dataset rows are counted.
    hashed = plan.listed - plan.skipped if plan.source == "files" else rows.count()
    listed = hashed if plan.source == "dataset" else plan.listed
    todo, seen = rows, plan.seen
    known = [c for c in committed.values() if c is not None]
    if len(known) == len(versions) and not plan.hashed_in_workers:  # committed for every version: not again
        common = known[0].select(*KEY)
        for other in known[1:]:
            common = common.join(other.select(*KEY), KEY, "left_semi")
        todo = rows.join(common, KEY, "left_anti")
    if len(versions) > 1 and known and not plan.hashed_in_workers:  # which versions already hold each input
        paths = [r[0] for r in todo.select("path").distinct().collect()]
        seen = _hashes_under(spark, paths, committed, "path")
    loads = spark.sparkContext.accumulator(0)
    shared = spark.sparkContext.broadcast(seen) if seen else None
    pairs = spark.sparkContext.accumulator({}, CounterParam()) if len(versions) > 1 else None
    bin_plan = monitor.BinPlan.of(references, hashed, cfg.monitor.embedding_sample, model.record)
    scorer = make_scorer(models, plan.source, plan.root, cfg.batch_size, cfg.top_k, cfg.intra_op_threads, loads,
                         plan.hashed_in_workers, shared, pairs, bin_plan)
    scored_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stamp = F.lit(scored_at)
    names = F.create_map(*[x for m in models for x in (F.lit(m.version), F.lit(m.run_id))])
    scored = (todo.mapInPandas(scorer, SCORED_DDL)
              .withColumn("model_name", F.lit(model.name)).withColumn("model_run_id", names[F.col("model_version")])
              .withColumn("job_id", F.lit(job_id)).withColumn("scored_at", stamp)
              .persist(StorageLevel.MEMORY_AND_DISK))
    fresh = ~F.col("unchanged")  # unchanged: read and hashed by the scorer, committed before
    ok, failed = F.col("reason").isNull() & fresh, F.col("reason").isNotNull() & fresh
    labelled = ok & F.col("true_label").isNotNull() & F.col("true_label").isin(*model.labels)
    hit = labelled & (F.col("true_label") == F.col("predicted_label"))
    monitored = monitor.aggregations(references) if bin_plan is not None else []
    row = scored.agg(*[  # one pass, no shuffle: counts and accuracy of every model version, drift counts
        F.count(F.when(cond & (F.col("model_version") == v), 1)).alias(f"{name}_{v}") for v in versions
        for name, cond in (("good", ok), ("bad", failed), ("labelled", labelled), ("hits", hit))], *monitored
    ).collect()[0]
    per_model = {v: (int(row[f"good_{v}"]), int(row[f"bad_{v}"]), hashed - int(row[f"good_{v}"]) - int(row[f"bad_{v}"]))
                 for v in versions}
    log.info("candidates read and scored in %.1f s", time.perf_counter() - started)
    n_good, n_bad, n_unchanged = per_model[model.version]
    counts = Counts(listed, plan.skipped, hashed, n_unchanged, n_good, n_bad)
    labelled_first = row[f"labelled_{model.version}"]
    accuracy = row[f"hits_{model.version}"] / labelled_first if labelled_first else None
    disagreement = Disagreement.from_counts(pairs.value) if pairs is not None else None
    judged = {v: ref for v, ref in references.items() if per_model[v][0]}  # versions that scored rows now
    windows: dict[str, dict[int, list[Verdict]]] = {}
    if bin_plan is not None and judged:
        observed = monitor.observed(row, bin_plan, judged, cfg.monitor.embedding_sample)
        thresholds = cfg.monitor.thresholds()
        windows["run"] = {v: seen.judge(judged[v], thresholds) for v, seen in observed.items()}
        if cfg.monitor.window == "cumulative":
            # a full refresh replaces every earlier batch: the window starts again with this run
            prior = {} if cfg.full_refresh else monitor.prior_counts(spark, store, base, list(judged))
            windows["cumulative"] = {v: seen.plus(prior.get(v, {})).judge(judged[v], thresholds)
                                     for v, seen in observed.items()}
        log.info("drift judged in %.1f s", time.perf_counter() - started)
    verdicts = windows.get(cfg.monitor.window, {})
    drift = Drift(verdicts, cfg.monitor.window, tuple(v for v in versions if v not in references),
                  cfg.monitor.fail_on_drift, model.labels, cfg.monitor.plots) if cfg.monitor.enabled else None
    added: dict[int, dict[str, list[str]]] = {v: {} for v in versions}
    # One write job per table for every model version: Spark partitions the rows into
    # model_version=<v>/batch=<job id>/ folders (each version's batch folder, as store.batch_url
    # names it); nothing is visible until the commit below lists them.
    tables = [("predictions", [v for v, (good, _, _) in per_model.items() if good],
               scored.where(ok).drop("reason", "detail", "unchanged", "drift_counts", "embedding")),
              ("quarantine", [v for v, (_, bad, _) in per_model.items() if bad],
               scored.where(failed).select(*KEY, "reason", "detail", *SOURCE, "model_name", "job_id", "scored_at",
                                           "model_version").coalesce(1))]
    if verdicts or any(holding for _, holding, _ in tables):
        store.begin()  # before the first batch lands: an uncommitted batch is never read as a pre-log output's
    for table, holding, frame in tables:  # holding: the versions with rows for this table
        if holding:
            (frame.withColumn("batch", F.lit(job_id)).write.mode("append")
             .partitionBy("model_version", "batch").parquet(store.table_url(table)))
            for version in holding:
                added[version][table] = [job_id]
    if verdicts:  # committed with the predictions it judges
        monitor.write_table(spark, monitor.table(windows, job_id, scored_at),
                            lambda version: store.batch_url("drift", version, job_id))
        for version in verdicts:
            added[version]["drift"] = [job_id]
    scored.unpersist()
    log.info("wrote %d predictions and %d quarantine rows in %.1f s", sum(g for g, _, _ in per_model.values()),
             sum(b for _, b, _ in per_model.values()), time.perf_counter() - started)
    if not any(added.values()) and not cfg.full_refresh:  # every hashed input was unchanged: nothing to commit
        return result(counts, loads.value, accuracy, _compact(spark, cfg, store, models, lease, job_id), per_model,
                      disagreement, drift)
    lease.check()  # a run whose lease was taken over must not commit over its successor
    snap = store.commit(job_id, added if cfg.full_refresh else {v: t for v, t in added.items() if t},
                        cfg.full_refresh, base)
    lease.check()
    store.vacuum(cfg.output.retain_hours * 3600)
    return result(counts, loads.value, accuracy, _compact(spark, cfg, store, models, lease, job_id) or snap.number,
                  per_model, disagreement, drift)


@dataclass(frozen=True)
class Disagreement:
    """Where the models' predicted labels differ, over the inputs every model scored in this run."""

    compared: int
    differing: int
    top_pairs: list[tuple[str, str, int]]  # (first model's label, another's, count), most frequent first

    @property
    def share(self) -> float:
        return self.differing / self.compared if self.compared else 0.0

    @classmethod
    def from_counts(cls, counts: dict, top: int = 5) -> "Disagreement":
        pairs = sorted(((a, b, n) for key, n in counts.items() if isinstance(key, tuple) for a, b in [key]),
                       key=lambda p: (-p[2], p[0], p[1]))
        return cls(int(counts.get("compared", 0)), int(counts.get("differing", 0)), pairs[:top])


def _compact(spark: "SparkSession", cfg: BatchInferenceConfig, store: PredictionStore, models: list[ResolvedModel],
             lease: Lease, job_id: str) -> int | None:
    """With `compact=true`, rewrite each model version's batches as one (the last commit's number)."""
    if not cfg.compact:
        return None
    number = None
    for model in models:
        snap = store.compact(spark, model.version, job_id, store.current(), lease.check)
        if snap is None:
            continue
        lease.check()
        store.vacuum(cfg.output.retain_hours * 3600)
        number = snap.number
    return number


def _log_drift(drift: Drift) -> dict[str, float]:
    """Its metrics (the first version's as `drift_<statistic>`, the others' as
    `v<n>_drift_<statistic>`); plots of the judged versions as run artifacts (`drift/`), as
    `monitor.plots` says."""
    import mlflow

    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (version, found) in enumerate(drift.verdicts.items()):
            metrics.update(monitoring.as_metrics(found, "drift_" if i == 0 else f"v{version}_drift_"))
            if drift.plots == "always" or (drift.plots == "on_drift" and any(v.drifted for v in found)):
                monitor.plot(found, drift.labels, f"model version {version}: {monitoring.summary(found)}"[:120],
                             f"{tmp}/v{version}_{drift.window}.png")
        if os.listdir(tmp):
            mlflow.log_artifacts(tmp, "drift")
    return metrics


def run_job(spark: "SparkSession", cfg: BatchInferenceConfig) -> InferenceResult:
    """The job, with its MLflow run (counts, throughput, model version, accuracy)."""
    from deepspark.tracking import job_run

    with job_run(cfg.tracking, "batch-inference", cfg, tags={"deepspark.job": "batch_inference"}) as run:
        result = run_inference(spark, cfg)
        if run is not None:
            import mlflow

            mlflow.set_tags({"model.uri": result.model, "inference.job_id": result.job_id,
                             "deepspark.modality": result.modality})
            metrics = {**result.counts.as_metrics(), "model_loads": result.model_loads, "seconds": result.seconds}
            if result.accuracy is not None:
                metrics["accuracy"] = result.accuracy
            if len(result.per_model) > 1:
                for version, (good, bad, same) in result.per_model.items():
                    metrics.update({f"v{version}_scored": good, f"v{version}_quarantined": bad,
                                    f"v{version}_unchanged_content": same})
            if result.disagreement is not None:
                metrics.update(models_compared=result.disagreement.compared,
                               models_disagree=result.disagreement.differing,
                               models_disagree_share=result.disagreement.share)
            if result.drift is not None:
                metrics.update(_log_drift(result.drift))
            mlflow.log_metrics(metrics)
            if result.lineage is not None:
                from deepspark.tracking import log_dataset_input

                log_dataset_input(result.lineage.url, result.lineage.name, result.lineage.digest, "inference")
    return result
