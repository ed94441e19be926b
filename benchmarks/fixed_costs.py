"""What a new user's first small job costs: fresh `spark-submit` runs of the ETL and of batch
inference on 5 CSV rows, 5 PNG files and 5 WAV files, each with its Spark task and stage counts
(from Spark's event log) and wall time (inference scores the raw inputs with the modality's default
model, untrained and registered in a sqlite store beforehand, not timed), against the fixed-cost
floor of Spark itself on this machine: a plain `spark-submit` of a job that reads the same input
and writes one Parquet file, with the same master, interpreter and flags, importing pyspark the
way our jobs do (`deepspark.spark.prefer_installed_pyspark`: its installed bytecode, not the
sources in spark-submit's zips, compiled again on every run). Ours and the floor alternate, the
order reversed on odd rounds, the best of each kept. And a Python task's fixed cost: 400 empty
Python tasks in a warm SparkContext, with Spark's default worker path and with the JVM jar taken
off it (`deepspark.spark.lighten_python_worker`).

Usage: python benchmarks/fixed_costs.py [--quick] [--json PATH]
  --quick: one run of each job, the floor both before and after the ETL (the better kept); the
  full run takes the best of three of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

FLOOR_JOB = '''
from deepspark.spark import prefer_installed_pyspark
prefer_installed_pyspark()  # as our jobs do (deepspark.cli): pyspark's bytecode, not its sources recompiled
import sys
from pyspark.sql import SparkSession
spark = SparkSession.builder.getOrCreate()
src, fmt, out = sys.argv[1:4]
frame = (spark.read.option("header", "true").csv(src) if fmt == "csv"
         else spark.read.format("binaryFile").load(src))
frame.coalesce(1).write.parquet(out)
spark.stop()
'''

TASKS_JOB = '''
import sys, time
from pyspark.sql import SparkSession
spark = SparkSession.builder.getOrCreate()
sc = spark.sparkContext
lighten = sys.argv[1] == "light"

def task(rows):
    if lighten:
        from deepspark.spark import lighten_python_worker
        lighten_python_worker()
    return [sum(1 for _ in rows)]

sc.parallelize(range(40), 40).mapPartitions(task).collect()  # warm: workers started and lightened
best = float("inf")
for _ in range(3):
    started = time.perf_counter()
    sc.parallelize(range(400), 400).mapPartitions(task).collect()
    best = min(best, time.perf_counter() - started)
print("SECONDS_PER_TASK", best / 400)
spark.stop()
'''


REGISTER_JOB = '''
import json, sys
import mlflow
from deepspark import builders
from deepspark.modality import ModalityRecord
from deepspark.tracking import TrackingSettings, ensure_experiment
from deepspark.serving import log_classifier
manifest, store, artifacts, name, workdir = sys.argv[1:6]
record = ModalityRecord.from_dict(json.load(open(manifest)))
experiment = ensure_experiment(TrackingSettings(uri=store, artifact_root=artifacts))
builder, _ = builders.reference(None, None, record.plugin)
with mlflow.start_run(experiment_id=experiment, run_name=name):
    log_classifier(builders.build(builder, record, {}), record, name, workdir, builder=builder)
'''


def env() -> dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT)}


def submit(script: Path, args: list[str], events: Path) -> tuple[float, int, int, str]:
    """(wall seconds, tasks, stages, stdout) of one fresh spark-submit on local[2]."""
    events.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]",
           "--conf", "spark.ui.enabled=false", "--conf", "spark.eventLog.enabled=true",
           "--conf", f"spark.eventLog.dir=file://{events}",
           "--driver-java-options", f"-Dlog4j2.configurationFile=file:{PROJECT / 'conf' / 'log4j2.properties'}",
           str(script), *args]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=PROJECT, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {args} failed:\n{done.stderr[-3000:]}")
    tasks = stages = 0
    for log in events.iterdir():
        for line in log.read_text().splitlines():
            event = json.loads(line).get("Event")
            tasks += event == "SparkListenerTaskEnd"
            stages += event == "SparkListenerStageCompleted"
    return seconds, tasks, stages, done.stdout


def make_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """5 CSV rows, 5 PNG files, 5 WAV files: (input path, profile) per modality."""
    import csv

    import soundfile as sf
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    text = root / "reviews.csv"
    with open(text, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i, (words, label) in enumerate([("a witty moving film", "fresh"), ("dull and tedious", "rotten"),
                                            ("superb cast", "fresh"), ("flat plot", "rotten"),
                                            ("fine story", "fresh")]):
            writer.writerow([f"{words} {i}", label])
    rng = np.random.default_rng(0)
    for i in range(5):
        label = "a" if i % 2 else "b"
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "images" / label / f"{i}.png")
        (root / "audio" / label).mkdir(parents=True, exist_ok=True)
        tone = 0.3 * np.sin(2 * np.pi * (300 + 50 * i) * np.arange(16000) / 16000)
        sf.write(root / "audio" / label / f"{i}.wav", tone.astype(np.float32), 16000)
    return {"text": (text, "text"), "image": (root / "images", "image"), "audio": (root / "audio", "audio")}


def etl_args(modality: str, path: Path, out: Path) -> list[str]:
    profile = [] if modality == "image" else ["--profile", modality]
    extra = {"text": ["input.label_column=label", "input.labels=[fresh, rotten]"], "image": [], "audio": []}[modality]
    return [*profile, f"input.path={path}", f"output.root={out}", "output.name=small", "tracking.enabled=false",
            "input.split_fractions={train: 0.6, test: 0.4}", *extra]


def register_untrained(manifest: Path, store: str, artifacts: Path, name: str, workdir: Path) -> str:
    """The modality's default model, untrained, registered with the small dataset's record: what
    batch inference loads and runs is the same as for a trained one (not timed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "register.py"
    script.write_text(REGISTER_JOB)
    done = subprocess.run([sys.executable, str(script), str(manifest), store, str(artifacts), name, str(workdir)],
                          env=env(), capture_output=True, text=True, cwd=PROJECT, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"registering {name} failed:\n{done.stderr[-3000:]}")
    return f"models:/{name}/1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    figures: list[dict] = []
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        inputs = make_inputs(tmp / "raw")
        floor_script = tmp / "floor.py"
        floor_script.write_text(FLOOR_JOB)
        store = f"sqlite:///{tmp / 'mlflow.db'}"
        for modality, (path, _) in inputs.items():
            runs, floors, infers = [], [], []
            fmt = "csv" if modality == "text" else "files"
            # ours, the floor; the floor, ours; ...: drift and who goes first hit both alike. With one
            # round (--quick), the floor runs both before and after ours.
            order = [(who, str(r)) for r in range(repeats) for who in (("ours", "floor") if r % 2 == 0 else
                                                                        ("floor", "ours"))]
            if repeats == 1:
                order.insert(0, ("floor", "before"))
            for who, r in order:
                if who == "ours":
                    out = tmp / f"etl-{modality}-{r}"
                    runs.append(submit(PROJECT / "jobs" / "etl.py", etl_args(modality, path, out),
                                       tmp / f"ev-{modality}-{r}"))
                else:
                    floors.append(submit(floor_script, [str(path), fmt, str(tmp / f"floor-{modality}-{r}")],
                                         tmp / f"ev-floor-{modality}-{r}"))
            model_uri = register_untrained(tmp / f"etl-{modality}-0" / "small" / "v=1" / "manifest.json", store,
                                           tmp / "artifacts", f"small-{modality}", tmp / f"model-{modality}")
            for r in range(repeats):
                infers.append(submit(PROJECT / "jobs" / "batch_inference.py",
                                     [f"model_uri={model_uri}", f"input.path={path}", f"tracking.uri={store}",
                                      f"output.path={tmp / f'pred-{modality}-{r}'}"], tmp / f"ev-infer-{modality}-{r}"))
            ours, floor, infer = min(runs), min(floors), min(infers)
            for job, (seconds, tasks, stages, _) in ((f"ETL, 5 {modality} inputs", ours),
                                                     (f"batch inference, 5 {modality} inputs", infer)):
                rows.append((job, f"{seconds:.1f} s", f"{tasks} tasks / {stages} stages",
                             f"floor {floor[0]:.1f} s, {floor[1]} tasks: {seconds / floor[0]:.2f}x"))
            figures += [
                {"name": f"etl_small_{modality}_seconds", "value": round(ours[0], 2), "goal": None, "unit": "s"},
                {"name": f"etl_small_{modality}_tasks", "value": ours[1], "goal": 40, "unit": "tasks"},
                {"name": f"etl_small_{modality}_over_floor", "value": round(ours[0] / floor[0], 3),
                 "goal": 2.0 if modality in ("text", "image") else None, "unit": "ratio"},
                {"name": f"spark_floor_{modality}_seconds", "value": round(floor[0], 2), "goal": None, "unit": "s"},
                {"name": f"inference_small_{modality}_seconds", "value": round(infer[0], 2), "goal": None, "unit": "s"},
                {"name": f"inference_small_{modality}_tasks", "value": infer[1], "goal": 40, "unit": "tasks"},
                {"name": f"inference_small_{modality}_over_floor", "value": round(infer[0] / floor[0], 3), "goal": None,
                 "unit": "ratio"},
            ]
        tasks_script = tmp / "tasks.py"
        tasks_script.write_text(TASKS_JOB)
        per_task = {}
        for mode in ("default", "light"):
            _, _, _, out = submit(tasks_script, [mode], tmp / f"ev-tasks-{mode}")
            per_task[mode] = float(out.split("SECONDS_PER_TASK")[1].split()[0])
        rows.append(("a Python task's fixed cost", f"{per_task['light'] * 1e3:.1f} ms (jar off the path)",
                     f"{per_task['default'] * 1e3:.1f} ms (Spark's path)",
                     f"{per_task['light'] / per_task['default']:.2f}x"))
        figures += [{"name": "python_task_ms_default_path", "value": round(per_task["default"] * 1e3, 2), "goal": None,
                     "unit": "ms"},
                    {"name": "python_task_ms_light", "value": round(per_task["light"] * 1e3, 2), "goal": None,
                     "unit": "ms"}]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'job':<{width}}  {'ours':>12}  {'tasks':<22}  against")
    for job, ours_s, tasks, against in rows:
        print(f"{job:<{width}}  {ours_s:>12}  {tasks:<22}  {against}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2))


if __name__ == "__main__":
    main()
