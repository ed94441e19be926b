"""Cluster mode, side by side in one run.

(a) Wall time of each job through spark-submit: local[2] against a standalone cluster (master + 2
    workers x 1 core on 127.0.0.1, code shipped as --py-files, tracking on a real `mlflow server`),
    on the same Fashion-MNIST subset.
(b) Between hosts (tests/multihost.py: network-namespace hosts, as root; skipped with the reason
    elsewhere): gloo allreduce bus bandwidth between ranks on w1 and w2 over their data network
    against two ranks on one host over loopback (the same probe, the same sizes); and the marginal
    rates of the ETL (raw files to a dataset) and of batch inference (raw files to predictions) on
    the S3 store against the shared local disk, each the slope between two input sizes (fixed costs
    cancel; they are reported apart).

Usage: python benchmarks/cluster.py [--quick] [--json PATH] [--part a|b]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from deepspark.localcluster import spark_submit, start_mlflow_server, start_standalone  # noqa: E402
from deepspark.packaging import PROJECT_ROOT, build_pyfiles  # noqa: E402
from pipelines.images.demo_data import write_raw_folder  # noqa: E402

JOBS = PROJECT_ROOT / "jobs"
RESOLUTION_S = 1.0  # two spark-submits of the same job differ by about this much


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


PROBE = """
import json, statistics, time
from deepspark.spark import SparkSettings, build_session
from training.distributed import run_ranks
spark = build_session(SparkSettings())
SIZES, REPEATS, NICS = {sizes}, {repeats}, {nics}
def probe():
    import horovod.tensorflow as hvd, tensorflow as tf
    hvd.init()
    out = {{}}
    for mb in SIZES:
        tensor = tf.ones((mb * 1024 * 1024 // 4,), tf.float32)
        hvd.allreduce(tensor, op=hvd.Sum, name=f"warm{{mb}}")
        times = []
        for r in range(REPEATS):
            started = time.perf_counter()
            hvd.allreduce(tensor, op=hvd.Sum, name=f"t{{mb}}_{{r}}").numpy()
            times.append(time.perf_counter() - started)
        out[mb] = statistics.median(times)
    return out
print("PROBE", json.dumps(run_ranks(probe, 2, 120, NICS)[0]))
spark.stop()
"""


def multihost(quick: bool) -> list[dict]:
    """(b): allreduce between hosts vs loopback, ETL and inference on S3 vs local disk (see the docstring)."""
    from tests import multihost as hosts
    from tests import netns

    why_not = netns.unavailable() or hosts.missing()
    if why_not:
        print(f"\n(b) between hosts: skipped ({why_not})")
        return []
    sizes, repeats = ([16, 64], 5) if quick else ([4, 16, 64], 9)
    per_split = (100, 1000) if quick else (200, 3000)
    figures: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pyfiles = build_pyfiles(tmp / "dist")
        started = time.perf_counter()
        with hosts.MultiHostCluster(tmp) as cluster:
            print(f"(b) five hosts up in {time.perf_counter() - started:.0f} s", flush=True)
            bus = {}
            for where, nics, master in (("hosts", ["data0"], None), ("loopback", ["lo"], "local[2]")):
                script = tmp / f"probe_{where}.py"
                script.write_text(PROBE.format(sizes=sizes, repeats=repeats, nics=nics))
                out, took = cluster.submit(script, [], pyfiles, tmp, master=master)
                print(f"(b) allreduce probe on {where}: {took:.0f} s", flush=True)
                seconds = json.loads(out.split("PROBE ", 1)[1].splitlines()[0])
                bus[where] = {mb: mb / 1024 / seconds[str(mb)] for mb in sizes}  # GB/s; 2(n-1)/n = 1 for n = 2
            for bucket in ("raw", "datasets"):
                cluster.make_bucket(bucket)
            etl: dict[str, dict[int, float]] = {"s3": {}, "local": {}}
            for n in per_split:
                raw = tmp / f"raw{n}"
                write_raw_folder(raw, limit=n)
                cluster.upload(raw, f"raw/r{n}")
                for where, source, root in (("local", str(raw), str(tmp / "datasets")),
                                            ("s3", f"s3://raw/r{n}", "s3://datasets")):
                    _, etl[where][n] = cluster.submit(JOBS / "etl.py", [
                        f"input.path={source}", f"output.root={root}", f"output.name=r{n}",
                        "output.row_group_size_mb=0.5", "tracking.enabled=false"], pyfiles, tmp)
                    print(f"(b) ETL of {2 * n} PNGs from {where}: {etl[where][n]:.0f} s", flush=True)
            # Scoring: a small model (any weights score at the same speed), then each size's test PNGs
            assert cluster.mlflow is not None
            tracked = [f"tracking.uri={cluster.mlflow.url}", "tracking.experiment=bench-hosts"]
            cluster.submit(JOBS / "train.py", [f"data.root={tmp / 'datasets'}", f"data.name=r{per_split[0]}",
                                               "epochs=1", "steps_per_epoch=5", "horovod.num_proc=1",
                                               "horovod.nics=[data0]", "registry.model_name=bench-hosts", *tracked],
                           pyfiles, tmp)
            scoring: dict[str, dict[int, float]] = {"s3": {}, "local": {}}
            for n in per_split:
                for where, source, sink in (("local", str(tmp / f"raw{n}" / "test"), str(tmp / f"predictions{n}")),
                                            ("s3", f"s3://raw/r{n}/test", f"s3://datasets/predictions{n}")):
                    _, scoring[where][n] = cluster.submit(JOBS / "batch_inference.py", [
                        f"input.path={source}", f"output.path={sink}", "model_uri=models:/bench-hosts@champion",
                        *tracked], pyfiles, tmp)
                    print(f"(b) inference of {n} PNGs from {where}: {scoring[where][n]:.0f} s", flush=True)
    print("\n(b) between hosts: allreduce of float32 across 2 gloo ranks, bus GB/s")
    print(f"  {'MB':>4}{'w1 <-> w2 (data0)':>20}{'one host (lo)':>16}{'ratio':>8}")
    for mb in sizes:
        ratio = bus["hosts"][mb] / bus["loopback"][mb]
        print(f"  {mb:>4}{bus['hosts'][mb]:>20.2f}{bus['loopback'][mb]:>16.2f}{ratio:>8.2f}")
    largest = sizes[-1]
    figures.append({"name": "multihost_allreduce_over_loopback",
                    "value": round(bus["hosts"][largest] / bus["loopback"][largest], 3), "goal": 0.5, "unit": "ratio"})
    figures.append({"name": f"multihost_allreduce_bus_gbps_{largest}mb", "value": round(bus["hosts"][largest], 3),
                    "goal": None, "unit": "GB/s"})
    small, large = per_split
    figures += marginals("ETL", "etl", etl, {small: 2 * small, large: 2 * large})
    figures += marginals("batch inference", "inference", scoring, {small: small, large: large})
    return figures


def marginals(what: str, key: str, times: dict[str, dict[int, float]], images: dict[int, int]) -> list[dict]:
    """Each source's marginal rate (the slope between the two sizes; fixed costs cancel) and fixed
    cost, and the store's marginal over local disk's, as a table and figures."""
    small, large = sorted(images)
    extra = images[large] - images[small]
    print(f"\n(b) {what} of {images[small]:,} and {images[large]:,} PNGs on the 2 worker hosts: wall s, marginal")
    rate: dict[str, float] = {}
    bounded: set[str] = set()
    figures: list[dict] = []
    for where in ("local", "s3"):
        extra_s = times[where][large] - times[where][small]
        if extra_s < RESOLUTION_S:  # the extra images cost less than run-to-run noise: a lower bound
            extra_s, bounded = RESOLUTION_S, bounded | {where}
        rate[where] = extra / extra_s
        fixed = times[where][small] - images[small] / rate[where]
        print(f"  {where:<6} {times[where][small]:6.1f} s, {times[where][large]:6.1f} s: marginal "
              f"{'>' if where in bounded else ' '}{rate[where]:6.0f} images/s, fixed {fixed:5.1f} s")
        figures.append({"name": f"{key}_marginal_images_per_s_{where}", "value": round(rate[where]), "goal": None,
                        "unit": "images/s (lower bound)" if where in bounded else "images/s"})
    if "local" in bounded:
        print(f"  local's extra {extra:,} images took under {RESOLUTION_S:.0f} s (noise): the ratio is an upper bound")
    figures.append({"name": f"s3_{key}_marginal_over_local", "value": round(rate["s3"] / rate["local"], 3),
                    "goal": 0.7 if key == "etl" else None,
                    "unit": "ratio (upper bound)" if "local" in bounded else "ratio"})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--part", choices=("a", "b"), help="only part (a) or (b); default both")
    args = parser.parse_args()
    figures = [] if args.part == "b" else part_a(args.quick)
    if args.part != "a":
        figures += multihost(args.quick)
    if args.json:
        args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")


def part_a(quick: bool) -> list[dict]:
    """(a): each job through spark-submit, local[2] against the loopback standalone cluster."""
    per_split, steps = (2000, 30) if quick else (10000, 100)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        raw = tmp / "raw"
        write_raw_folder(raw, limit=per_split)
        pyfiles = build_pyfiles(tmp / "dist")
        (tmp / "server").mkdir()
        (tmp / "cluster").mkdir()
        server = start_mlflow_server(tmp / "server")
        os.environ.update(server.client_env())  # the basic-auth server: jobs and ranks authenticate
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
    return figures


if __name__ == "__main__":
    main()
