"""A Spark cluster of real hosts on one machine (tests/netns.py): every component on its own
host with its own addresses, reached only over the hosts' networks.

    store   eth0 198.18.0.30              moto's S3 server (:9000), basic-auth `mlflow server` (:5000,
                                          artifacts in s3://mlflow/)
    master  eth0 198.18.0.11              Spark standalone master (:7077, UI :8080)
    w1      eth0 198.18.0.21  data0 198.18.1.21   Spark worker, 1 core
    w2      ens5 198.18.0.22  data0 198.18.1.22   Spark worker, 1 core (its management NIC is named otherwise)
    driver  eth0 198.18.0.10  data0 198.18.1.10   spark-submit in client mode

Network 0 (198.18.0.0/24) is the management network, network 1 the data network between the
driver and the workers. Credentials reach processes as the standard variables only: the store's
keys as AWS_* in the daemons' environments (as an instance profile would), MLflow's as
MLFLOW_TRACKING_* in the driver's. Used by tests/test_multihost.py and scripts/multihost_cluster.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from deepspark import localcluster
from tests.netns import VirtualHosts

MOTO_VENV = Path(os.environ.get("DEEPSPARK_MOTO_VENV", Path.home() / ".cache/deepspark/moto-5.2.5"))
S3A_JARS = Path(os.environ.get("DEEPSPARK_S3A_JARS", Path.home() / ".cache/deepspark/s3a-jars"))
JARS = ("hadoop-aws-3.3.1.jar", "aws-java-sdk-bundle-1.11.901.jar")
LAYOUT = {
    "store": {"eth0": (0, 30)},
    "master": {"eth0": (0, 11)},
    "w1": {"eth0": (0, 21), "data0": (1, 21)},
    "w2": {"ens5": (0, 22), "data0": (1, 22)},
    "driver": {"eth0": (0, 10), "data0": (1, 10)},
}
WORKERS = ("w1", "w2")


def missing() -> str | None:
    """What `scripts/setup.sh --with-cluster` has not installed (None when all is there)."""
    if not (MOTO_VENV / "bin" / "moto_server").exists():
        return f"moto's server is not in {MOTO_VENV} (scripts/setup.sh --with-cluster)"
    absent = [jar for jar in JARS if not (S3A_JARS / jar).exists()]
    if absent:
        return f"{', '.join(absent)} not in {S3A_JARS} (scripts/setup.sh --with-cluster)"
    return None


@dataclass
class MultiHostCluster:
    """Start with `with MultiHostCluster(workdir) as cluster:`; everything ends on exit."""

    workdir: Path
    worker_memory: str = "3g"
    hosts: VirtualHosts = field(default_factory=lambda: VirtualHosts(networks=(0, 1)))
    aws: dict[str, str] = field(default_factory=lambda: {
        "AWS_ACCESS_KEY_ID": "deepspark-test", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
        "AWS_DEFAULT_REGION": "us-east-1"})
    mlflow: localcluster.MlflowServer | None = None
    _mlflow_launch: tuple[list[str], dict[str, str]] = field(default_factory=lambda: ([], {}), repr=False)

    def address(self, host: str, nic: str = "") -> str:
        found = self.hosts.hosts[host].addresses
        return found[nic] if nic else next(iter(found.values()))

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.address('store')}:9000"

    @property
    def master_url(self) -> str:
        return f"spark://{self.address('master')}:7077"

    @property
    def master_ui(self) -> str:
        return f"http://{self.address('master')}:8080"

    def store_env(self) -> dict[str, str]:
        """What every process that reads or writes the store has: its endpoint and keys."""
        return {**self.aws, "AWS_ENDPOINT_URL": self.s3_endpoint}

    def __enter__(self) -> "MultiHostCluster":
        self.hosts.__enter__()
        try:
            for name, nics in LAYOUT.items():
                self.hosts.add(name, nics, "data0" if "data0" in nics else None)
            self._start_store()
            self._start_spark()
        except BaseException:
            self.hosts.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.hosts.close()

    def _log(self, name: str):  # type: ignore[no-untyped-def]
        return open(self.workdir / f"{name}.log", "w")

    def _wait(self, check, what: str, procs: Sequence[subprocess.Popen], timeout_s: float = 120) -> None:  # type: ignore[no-untyped-def]
        localcluster.wait_for(check, what, timeout_s, procs)

    def _start_store(self) -> None:
        store = self.address("store")
        moto = self.hosts.spawn("store", [str(MOTO_VENV / "bin" / "moto_server"), "-H", store, "-p", "9000"],
                                env={**os.environ, **self.aws}, stdout=self._log("moto"), stderr=subprocess.STDOUT)
        self._wait(lambda: self._in_host("store", f"import urllib.request; urllib.request.urlopen("
                                                  f"'{self.s3_endpoint}', timeout=2)"), "moto", [moto])
        self.make_bucket("mlflow")
        command, env, server = localcluster.mlflow_server_command(self.workdir, store, 5000, "s3://mlflow/artifacts")
        env.update({**self.aws, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ENDPOINT_URL": self.s3_endpoint})
        self.mlflow = server
        self._mlflow_launch = (command, env)
        self._spawn_mlflow()

    def _spawn_mlflow(self) -> None:
        assert self.mlflow is not None
        command, env = self._mlflow_launch
        self.mlflow.procs.append(self.hosts.spawn("store", command, env=env, stdout=self._log(f"mlflow-{time.time():.0f}"),
                                                  stderr=subprocess.STDOUT))
        url = self.mlflow.url
        self._wait(lambda: self._in_host("driver", f"import urllib.request; urllib.request.urlopen("
                                                   f"'{url}/health', timeout=2)"), "mlflow server", self.mlflow.procs)

    def restart_mlflow(self, down_s: float) -> None:
        """SIGKILL the tracking server (its whole process group), leave it down `down_s`, then start
        it again on the same backend store and artifact store."""
        assert self.mlflow is not None
        for proc in self.mlflow.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.mlflow.procs.clear()
        time.sleep(down_s)
        self._spawn_mlflow()

    def _start_spark(self) -> None:
        master = self.address("master")
        # A worker that stops heartbeating is dropped after 15 s (Spark: 60 s), so a host's death
        # in one test is settled before the next.
        env = localcluster.daemon_environment(master, {"SPARK_MASTER_OPTS": "-Dspark.worker.timeout=15"})
        procs = [self.hosts.spawn("master", localcluster.master_command(master, 7077, 8080), env=env,
                                  stdout=self._log("master"), stderr=subprocess.STDOUT)]
        procs += [self._spawn_worker(name) for name in WORKERS]
        self._wait(lambda: self._in_host("driver", self._alive_probe(len(WORKERS))), "standalone cluster", procs)

    def _spawn_worker(self, name: str) -> subprocess.Popen:
        host = self.address(name)
        env = localcluster.daemon_environment(host, {**self.store_env(), "TF_CPP_MIN_LOG_LEVEL": "2"})
        return self.hosts.spawn(name, localcluster.worker_command(host, self.master_url, 1, self.worker_memory,
                                                                  self.workdir / name, 8081),
                                env=env, stdout=self._log(f"{name}-{time.time():.0f}"), stderr=subprocess.STDOUT)

    def revive(self, name: str) -> None:
        """Bring a worker host that was killed (`hosts.kill_processes`, `hosts.link_down`) back:
        once the master has dropped its dead worker, links up and a new worker started."""
        self._wait(lambda: self._in_host("driver", self._alive_probe(len(WORKERS) - 1)), f"{name}'s worker dropped",
                   [], timeout_s=90)
        self.hosts.link_up(name)
        worker = self._spawn_worker(name)
        self._wait(lambda: self._in_host("driver", self._alive_probe(len(WORKERS))), f"{name}'s worker back",
                   [worker])

    def _alive_probe(self, count: int) -> str:
        return (f"import json, urllib.request; workers = json.load(urllib.request.urlopen('{self.master_ui}/json/', "
                f"timeout=2))['workers']; assert sum(w['state'] == 'ALIVE' for w in workers) == {count}")

    def _in_host(self, host: str, code: str) -> bool:
        return self.hosts.run(host, [sys.executable, "-c", code], timeout=30).returncode == 0

    def store_filesystem(self):  # type: ignore[no-untyped-def]
        """The store through pyarrow, as the test machine sees it (the root namespace is on the bridges)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.s3_endpoint.split("//")[1], scheme="http",
                                 region=self.aws["AWS_DEFAULT_REGION"], access_key=self.aws["AWS_ACCESS_KEY_ID"],
                                 secret_key=self.aws["AWS_SECRET_ACCESS_KEY"])

    def upload(self, local: Path, prefix: str) -> int:
        """Every file under `local` to `prefix` in the store, one stream each (pyarrow's copy_files
        stalls on moto); returns how many."""
        store = self.store_filesystem()
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in files:
            with store.open_output_stream(f"{prefix}/{path.relative_to(local).as_posix()}") as out:
                out.write(path.read_bytes())
        return len(files)

    def make_bucket(self, bucket: str) -> None:
        code = ("import boto3; boto3.client('s3').create_bucket(Bucket=" + repr(bucket) + ")")
        done = self.hosts.run("driver", [sys.executable, "-c", code], timeout=60, env=self.driver_env(False))
        if done.returncode != 0 and "BucketAlreadyOwnedByYou" not in done.stderr:
            raise RuntimeError(f"bucket {bucket}: {done.stderr[-2000:]}")

    def driver_env(self, tracking: bool = True) -> dict[str, str]:
        """The driver host's environment: its own address, the store, MLflow's credentials."""
        env = {**os.environ, **self.store_env(), "SPARK_LOCAL_IP": self.address("driver"),
               "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2",
               "DEEPSPARK_CONF_DIR": str(Path(__file__).resolve().parent.parent / "conf")}
        if tracking and self.mlflow is not None:
            env.update(self.mlflow.client_env())
        return env

    def submit_command(self, script: Path, args: Sequence[str], py_files: Path,
                       conf: dict[str, str] | None = None, master: str | None = None) -> list[str]:
        """The README's standalone command, run on the driver host (`master`: another master, such
        as local[2] for a comparison on the driver host alone)."""
        settings = {"spark.executor.cores": "1", "spark.executor.memory": "2g", "spark.ui.enabled": "false",
                    **(conf or {})}
        cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", master or self.master_url,
               "--jars", ",".join(str(S3A_JARS / jar) for jar in JARS), "--py-files", str(py_files)]
        for key, value in settings.items():
            cmd += ["--conf", f"{key}={value}"]
        return ["ip", "netns", "exec", self.hosts.hosts["driver"].name, *cmd, str(script), *args]

    def run_submit(self, script: Path, args: Sequence[str], py_files: Path, cwd: Path,
                   conf: dict[str, str] | None = None, timeout_s: float = 900,
                   master: str | None = None) -> tuple[int, str, float]:
        """(exit code, output, seconds) of a spark-submit from the driver host."""
        started = time.perf_counter()
        proc = subprocess.run(self.submit_command(script, args, py_files, conf, master), cwd=cwd,
                              env=self.driver_env(),
                              capture_output=True, text=True, timeout=timeout_s)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - started

    def submit(self, script: Path, args: Sequence[str], py_files: Path, cwd: Path,
               conf: dict[str, str] | None = None, timeout_s: float = 900,
               master: str | None = None) -> tuple[str, float]:
        code, output, seconds = self.run_submit(script, args, py_files, cwd, conf, timeout_s, master)
        if code != 0:
            raise RuntimeError(f"spark-submit {script.name} exited {code}:\n{output[-8000:]}")
        return output, seconds

    def bytes_sent(self, host: str, nic: str) -> int:
        """What `host` has sent on its interface `nic` (the kernel's counter inside the host)."""
        done = self.hosts.run(host, ["cat", f"/sys/class/net/{nic}/statistics/tx_bytes"])
        return int(done.stdout.strip())

    def mlflow_get(self, path: str) -> int:
        """The HTTP status of an anonymous GET on the tracking server (from the driver host)."""
        assert self.mlflow is not None
        code = (f"import urllib.request, urllib.error\ntry: print(urllib.request.urlopen('{self.mlflow.url}{path}', "
                "timeout=5).status)\nexcept urllib.error.HTTPError as e: print(e.code)")
        return int(self.hosts.run("driver", [sys.executable, "-c", code]).stdout.strip())
