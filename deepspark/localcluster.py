"""A real Spark standalone cluster and a real MLflow tracking server on this machine, from the
pinned installations: for the cluster tests, the cluster benchmark and trying cluster mode
locally (`make cluster`). Every process is started in its own session and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DISCOVERY_SCRIPT = Path(__file__).resolve().parent.parent / "conf" / "gpu" / "discover_gpus.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, timeout_s: float, procs: Sequence[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args!r:.120} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what is still there."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@dataclass
class Processes:
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)

    def stop(self) -> None:
        _stop(self.procs)


@dataclass
class Cluster(Processes):
    master_url: str = ""
    ui_url: str = ""
    workdir: Path = Path(".")


@dataclass
class MlflowServer(Processes):
    url: str = ""
    username: str = "admin"
    password: str = field(default="", repr=False)

    def client_env(self) -> dict[str, str]:
        """MLflow's standard variables that let a client (a job, an executor) authenticate."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def daemon_environment(host: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A Spark daemon's environment on a host whose address is `host` (Spark binds and advertises
    SPARK_LOCAL_IP); executors inherit it from their worker, as from spark-env.sh."""
    return {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": host,
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable), **(extra or {})}


def master_command(host: str, port: int, ui_port: int) -> list[str]:
    return [str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master", "--host", host,
            "--port", str(port), "--webui-port", str(ui_port)]


def worker_command(host: str, master_url: str, cores: int, memory: str, workdir: Path, ui_port: int) -> list[str]:
    return [str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker", "--host", host,
            "--cores", str(cores), "--memory", memory, "--webui-port", str(ui_port), "--work-dir", str(workdir),
            master_url]


def alive_workers(ui_url: str) -> int:
    with urllib.request.urlopen(f"{ui_url}/json/", timeout=2) as resp:
        return sum(w["state"] == "ALIVE" for w in json.load(resp)["workers"])


def start_standalone(workdir: Path, workers: int = 2, cores: int = 1, memory: str = "3g",
                     fake_gpus: bool = False, timeout_s: float = 90) -> Cluster:
    """Master and workers via the pinned pyspark's `spark-class`; returns once all are ALIVE."""
    port, ui = free_port(), free_port()
    env = daemon_environment("127.0.0.1")
    cluster = Cluster(master_url=f"spark://127.0.0.1:{port}", ui_url=f"http://127.0.0.1:{ui}", workdir=workdir)
    try:
        cluster.procs.append(subprocess.Popen(
            master_command("127.0.0.1", port, ui), env=env, start_new_session=True,
            stdout=open(workdir / "master.log", "w"), stderr=subprocess.STDOUT))
        for i in range(workers):
            worker_env = dict(env)
            if fake_gpus:  # one fake GPU per worker, address i: tests GPU scheduling without GPUs
                worker_env["DEEPSPARK_FAKE_GPUS"] = str(i)
                worker_env["SPARK_WORKER_OPTS"] = (f"-Dspark.worker.resource.gpu.amount=1 "
                                                   f"-Dspark.worker.resource.gpu.discoveryScript={DISCOVERY_SCRIPT}")
            cluster.procs.append(subprocess.Popen(
                worker_command("127.0.0.1", cluster.master_url, cores, memory, workdir / f"worker{i}", free_port()),
                env=worker_env, start_new_session=True,
                stdout=open(workdir / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
        wait_for(lambda: alive_workers(cluster.ui_url) == workers, "standalone cluster", timeout_s, cluster.procs)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def mlflow_server_command(workdir: Path, host: str, port: int, artifacts_destination: str | None = None,
                          ) -> tuple[list[str], dict[str, str], MlflowServer]:
    """`mlflow server --app-name basic-auth` (sqlite backend and user store, artifact serving to
    `artifacts_destination`, a folder under `workdir` by default) with a random admin password:
    anonymous requests get 401. Returns the command, its environment and the server's handle."""
    import secrets

    server = MlflowServer(url=f"http://{host}:{port}", password=secrets.token_urlsafe(16))
    config = workdir / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\nadmin_username = {server.username}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": server.password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth", "--host", host,
               "--port", str(port), "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--serve-artifacts",
               "--artifacts-destination", artifacts_destination or str(workdir / "artifacts"), "--workers", "1",
               # MLflow 3 refuses Host headers other than localhost and private ranges (DNS rebinding)
               "--allowed-hosts", f"{host},{host}:{port},localhost:{port}"]
    return command, env, server


def healthy(url: str) -> bool:
    return bool(urllib.request.urlopen(f"{url}/health", timeout=2).status == 200)


def start_mlflow_server(workdir: Path, timeout_s: float = 120) -> MlflowServer:
    """The basic-auth tracking server (`mlflow_server_command`) on a free loopback port."""
    command, env, server = mlflow_server_command(workdir, "127.0.0.1", free_port())
    server.procs.append(subprocess.Popen(command, env=env, start_new_session=True,
                                         stdout=open(workdir / "server.log", "w"), stderr=subprocess.STDOUT))
    try:
        wait_for(lambda: healthy(server.url), "mlflow server", timeout_s, server.procs)
    except BaseException:
        server.stop()
        raise
    return server


def submit_command(master: str, script: Path, args: Sequence[str] = (), conf: dict[str, str] | None = None,
                   py_files: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a `spark-submit` of this venv on loopback (UI off), for
    callers that run it themselves (e.g. to race or kill it)."""
    settings = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1", "spark.ui.enabled": "false",
                **(conf or {})}
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", master]
    if py_files is not None:
        cmd += ["--py-files", str(py_files)]
    for key, value in settings.items():
        cmd += ["--conf", f"{key}={value}"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "DEEPSPARK_CONF_DIR": os.environ.get("DEEPSPARK_CONF_DIR", str(DISCOVERY_SCRIPT.parent.parent))}
    return [*cmd, str(script), *args], env


def spark_submit(master: str, script: Path, args: Sequence[str] = (), conf: dict[str, str] | None = None,
                 py_files: Path | None = None, cwd: Path | None = None, timeout_s: float = 1800) -> tuple[str, float]:
    """Run `spark-submit` of this venv on loopback; returns (output, seconds), raises with the
    output's tail on a non-zero exit."""
    cmd, env = submit_command(master, script, args, conf, py_files)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"spark-submit {script.name} exited {proc.returncode}:\n{output[-6000:]}")
    return output, time.perf_counter() - started
