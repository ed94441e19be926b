"""Wall time of each job through spark-submit: local[2] against a standalone cluster
(master + 2 workers x 1 core on 127.0.0.1, code shipped as --py-files, tracking on a real
`mlflow server`), on the same Fashion-MNIST subset, side by side in one run.

Usage: python benchmarks/cluster.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from deepspark.localcluster import spark_submit, start_mlflow_server, start_standalone  # noqa: E402
from deepspark.packaging import PROJECT_ROOT, build_pyfiles  # noqa: E402
from pipelines.images.demo_data import write_raw_folder  # noqa: E402

JOBS = PROJECT_ROOT / "jobs"


def run_all(master: str, tracking: str, raw: Path, out: Path, pyfiles: Path | None, steps: int) -> dict[str, float]:
    common = [f"tracking.uri={tracking}", f"tracking.experiment=bench-{'local' if master.startswith('local') else 'cluster'}"]
    conf = {"spark.executor.cores": "1", "spark.executor.memory": "2g"} if not master.startswith("local") else {}
    times = {}
    _, times["etl"] = spark_submit(master, JOBS / "etl.py", [
        f"input.path={raw}", f"output.root={out}", "output.name=fm", "output.row_group_size_mb=0.5", *common],
        conf, pyfiles, out)
    _, times["train"] = spark_submit(master, JOBS / "train.py", [
        f"data.root={out}", "data.name=fm", "epochs=2", f"steps_per_epoch={steps}", "horovod.nics=[lo]",
        f"registry.model_name=fm-{out.name}", *common], conf, pyfiles, out)
    _, times["batch_inference"] = spark_submit(master, JOBS / "batch_inference.py", [
        f"input.path={raw / 'test'}", f"output.path={out / 'predictions'}", f"model_uri=models:/fm-{out.name}@champion",
        *common], conf, pyfiles, out)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    per_split, steps = (2000, 30) if args.quick else (10000, 100)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        raw = tmp / "raw"
        write_raw_folder(raw, limit=per_split)
        pyfiles = build_pyfiles(tmp / "dist")
        (tmp / "server").mkdir()
        (tmp / "cluster").mkdir()
        server = start_mlflow_server(tmp / "server")
        try:
            (tmp / "local").mkdir()
            local = run_all("local[2]", server.url, raw, tmp / "local", None, steps)
            cluster = start_standalone(tmp / "cluster", workers=2)
            try:
                (tmp / "standalone").mkdir()
                standalone = run_all(cluster.master_url, server.url, raw, tmp / "standalone", pyfiles, steps)
            finally:
                cluster.stop()
        finally:
            server.stop()
    print(f"\nspark-submit wall time, {2 * per_split:,} images, training 2 epochs x {steps} steps x 2 ranks")
    print(f"{'job':<18}{'local[2] s':>12}{'standalone s':>14}{'ratio':>8}")
    figures = []
    for job in local:
        ratio = standalone[job] / local[job]
        print(f"{job:<18}{local[job]:>12.1f}{standalone[job]:>14.1f}{ratio:>8.2f}")
        figures += [{"name": f"{job}_seconds_local", "value": round(local[job], 1), "goal": None, "unit": "s"},
                    {"name": f"{job}_seconds_standalone", "value": round(standalone[job], 1), "goal": None, "unit": "s"}]
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
