"""The Horovod seam: launch a picklable function as N ranks on Spark executors (gloo).

Everything Horovod-specific that the driver touches lives here, so another launcher
(TorchDistributor, Ray) replaces this module, not the jobs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from deepspark.config import ConfigError


class RankFailure(RuntimeError):
    """A rank died or raised; the job fails instead of hanging."""


# What a rank needs from the driver's environment: interpreters, libraries and paths, Spark/Hadoop/
# Horovod/TensorFlow/GPU settings, MLflow's tracking settings (credentials included: rank 0 logs
# metrics and checkpoints) and the artifact store's cloud credentials. Nothing else (other tokens,
# passwords, the user's shell) is shipped.
RANK_ENV_NAMES = {"PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHASHSEED", "JAVA_HOME",
                  "LD_LIBRARY_PATH", "CLASSPATH", "GOOGLE_APPLICATION_CREDENTIALS", "VIRTUAL_ENV", "CONDA_PREFIX",
                  # Kerberised HDFS (Petastorm's reads), proxies and CA bundles (MLflow over HTTPS)
                  "KRB5CCNAME", "KRB5_CONFIG", "ARROW_LIBHDFS_DIR", "LIBHDFS_OPTS", "HTTP_PROXY", "HTTPS_PROXY",
                  "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE",
                  "SSL_CERT_DIR"}
RANK_ENV_PREFIXES = ("LC_", "SPARK_", "PYSPARK_", "HADOOP_", "HDFS_", "YARN_", "HOROVOD_", "TF_", "CUDA_", "NVIDIA_",
                     "NCCL_", "OMP_", "KMP_", "MLFLOW_", "AWS_", "AZURE_STORAGE_", "DEEPSPARK_")


def rank_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the driver's environment the Horovod ranks receive (an allow-list)."""
    return {k: v for k, v in environ.items() if k in RANK_ENV_NAMES or k.startswith(RANK_ENV_PREFIXES)}


@dataclass(frozen=True)
class HostInterfaces:
    """What a host running ranks offers Gloo: IPv4 addresses per interface, and the address its
    host name resolves to (Horovod 0.28.1's process-set Gloo context connects to that one, not to
    HOROVOD_GLOO_IFACE's)."""

    host: str  # how Spark names it (SPARK_LOCAL_IP, else the host name)
    host_hash: str  # Horovod's notion of a host (name + namespaces)
    addresses: dict[str, list[str]]
    name_resolves_to: str


def decide_nics(requested: Sequence[str] | None, local_master: bool, driver_address: str,
                driver: dict[str, list[str]], executors: Sequence[HostInterfaces]) -> list[str]:
    """The interfaces Gloo uses between ranks: `horovod.nics`, else `lo` on a local master, else
    the driver's interface holding the address Spark advertises for it (spark.driver.host).
    Raises naming `horovod.nics` when the driver or a rank's host lacks it, or when ranks span
    hosts and a host's name resolves to a loopback address (its ranks would be unreachable)."""
    if requested:
        nics = list(requested)
        origin = "horovod.nics"
    elif local_master:
        return ["lo"]
    else:
        holding = [nic for nic, addrs in driver.items() if driver_address in addrs]
        if not holding:
            raise ConfigError(f"horovod.nics: no interface of the driver holds spark.driver.host {driver_address} "
                              f"(it has {_describe(driver)}); set horovod.nics to an interface every host has")
        nics = holding[:1]
        origin = f"horovod.nics (unset: the driver's interface for spark.driver.host {driver_address})"
    for nic in nics:
        if not driver.get(nic):
            raise ConfigError(f"{origin}: the driver has no IPv4 interface {nic!r} (it has {_describe(driver)})")
        for host in executors:
            if not host.addresses.get(nic):
                common = sorted(set.intersection(*(set(k for k, v in h.addresses.items() if v) for h in executors),
                                                 set(k for k, v in driver.items() if v)) - {"lo"})
                raise ConfigError(f"{origin}: interface {nic!r} is missing on executor host {host.host} (it has "
                                  f"{_describe(host.addresses)}); interfaces every host has: "
                                  f"{', '.join(common) or 'none besides lo'}")
    if len({h.host_hash for h in executors}) > 1:
        for host in executors:
            if host.name_resolves_to.startswith("127.") or host.name_resolves_to == "::1":
                raise ConfigError(f"horovod.nics: ranks span hosts, but on {host.host} the host name resolves to "
                                  f"{host.name_resolves_to}; Horovod 0.28.1's Gloo process sets connect to that "
                                  f"address whatever the interface, so map the name to its {nics[0]} address "
                                  "(DNS or /etc/hosts)")
    return nics


def _describe(addresses: dict[str, list[str]]) -> str:
    return ", ".join(f"{nic} {'/'.join(a) or '-'}" for nic, a in sorted(addresses.items()))


def local_interfaces() -> dict[str, list[str]]:
    import socket

    import psutil

    return {nic: [a.address for a in addrs if a.family == socket.AF_INET]
            for nic, addrs in psutil.net_if_addrs().items()}


def _probe_host(_: Any) -> Any:
    import socket

    from horovod.runner.common.util.host_hash import host_hash

    try:
        resolved = socket.gethostbyname(socket.gethostname())
    except OSError:
        resolved = "unresolved"
    yield HostInterfaces(os.environ.get("SPARK_LOCAL_IP") or socket.gethostname(), host_hash(),
                         local_interfaces(), resolved)


def _probed_hosts(num_proc: int) -> tuple[Any, bool, list[HostInterfaces]]:
    """(SparkContext, local master?, the hosts of `num_proc` probe tasks: where Horovod's tasks
    will run); no probe on a local master."""
    from pyspark import SparkContext

    sc = SparkContext.getOrCreate()
    local = (sc.master or "").startswith("local")
    executors = [] if local else sc.parallelize(range(num_proc), num_proc).mapPartitions(_probe_host).collect()
    return sc, local, executors


def _decided(num_proc: int, requested: Sequence[str] | None
             ) -> tuple[Any, list[str], list[HostInterfaces], dict[str, list[str]]]:
    """(SparkContext, Gloo's interfaces, the probed executor hosts, the driver's interfaces)."""
    sc, local, executors = _probed_hosts(num_proc)
    driver = local_interfaces()
    nics = decide_nics(requested, local, sc.getConf().get("spark.driver.host", ""), driver, executors)
    return sc, nics, executors, driver


def gloo_interfaces(num_proc: int, requested: Sequence[str] | None) -> list[str]:
    """`decide_nics` on the active SparkContext: on a cluster, `num_proc` probe tasks report their
    hosts' interfaces, before any rank starts."""
    return _decided(num_proc, requested)[1]


def peer_addresses(executors: Sequence[HostInterfaces], driver: dict[str, list[str]]) -> set[str]:
    """The executors' hosts' addresses, less the driver's own and loopback (whose sockets the lost-rank
    watch may shut)."""
    own = {a for addrs in driver.values() for a in addrs}
    return {a for h in executors for addrs in h.addresses.values() for a in addrs
            if a not in own and not a.startswith("127.")}


@dataclass(frozen=True)
class ElasticLimits:
    """An elastic run's bounds: it goes on with as few as `min_num_proc` ranks and fails after
    `reset_limit` membership changes (None: no limit)."""

    min_num_proc: int = 1
    reset_limit: int | None = None


def run_ranks(fn: Callable[[], Any], num_proc: int, start_timeout_s: int, nics: Sequence[str] | None,
              env: dict[str, str] | None = None, elastic: ElasticLimits | None = None) -> list[Any]:
    """Run `fn` on `num_proc` Horovod ranks over gloo, one per Spark task; results by rank. The
    interfaces are checked (or chosen, when `nics` is None) on the hosts first. A rank's host lost
    mid-run fails the run within Spark's detection plus the peer timeout (training/lost_ranks.py);
    with `elastic`, through horovod.spark.run_elastic, the other ranks go on without it instead."""
    import horovod.spark

    from training.lost_ranks import run_watched

    sc, nics, executors, driver = _decided(num_proc, nics)

    rank_env = rank_environment(os.environ)
    rank_env.update({
        "HOROVOD_GLOO_TIMEOUT_SECONDS": "60",  # a dead peer fails collectives within a minute (horovod.peer_timeout_s)
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYTHONUNBUFFERED": "1",
        # pyarrow's legacy-dataset notices and Petastorm's "use make_reader" hint (we read raw
        # columns with make_batch_reader on purpose) are not actionable in a rank's log.
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning:petastorm.reader",
    })
    rank_env.update(env or {})
    # Survivors of a lost host fail after the peer timeout; give them that, plus time to report.
    # Elastic runs shut only connections to hosts that no longer answer, which needs no grace.
    grace_s = 0 if elastic is not None else int(rank_env["HOROVOD_GLOO_TIMEOUT_SECONDS"]) + 15

    def launch() -> list[Any]:
        if elastic is not None:
            return horovod.spark.run_elastic(fn, num_proc=num_proc, min_num_proc=elastic.min_num_proc,
                                             max_num_proc=num_proc, start_timeout=start_timeout_s,
                                             reset_limit=elastic.reset_limit, env=rank_env, verbose=1,
                                             nics=set(nics))
        return horovod.spark.run(fn, num_proc=num_proc, start_timeout=start_timeout_s, use_gloo=True,
                                 nics=set(nics), env=rank_env, verbose=1)

    try:
        return run_watched(launch, sc, num_proc, grace_s, peer_addresses(executors, driver),  # type: ignore[no-any-return]
                           elastic=elastic is not None)
    except Exception as exc:
        raise RankFailure(f"Horovod ranks failed: {type(exc).__name__}: {exc}") from exc


def record_timeline(enabled: bool) -> None:
    """Before the collective starts in a rank: where Horovod records its timeline (rank 0 writes
    it), a new file in this executor's temp folder; or nowhere (a reused Python worker may hold an
    earlier rank's setting)."""
    if enabled:
        import tempfile
        import uuid

        os.environ["HOROVOD_TIMELINE"] = os.path.join(tempfile.gettempdir(), f"deepspark-timeline-{uuid.uuid4().hex}.json")
    else:
        os.environ.pop("HOROVOD_TIMELINE", None)


def timeline_file() -> str | None:
    """The file Horovod's timeline goes to in this rank (`record_timeline`)."""
    path = os.environ.get("HOROVOD_TIMELINE")
    return path if path and path != "DYNAMIC" else None


def remove_timeline() -> None:
    """Delete this rank's timeline file, if Horovod wrote one (it goes on writing to the unlinked
    file until it shuts down)."""
    path = timeline_file()
    if path is not None:
        try:
            os.remove(path)
        except OSError:
            pass


def available_gpu() -> str | None:
    """The GPU address Spark assigned to this task, if any (inside a rank)."""
    try:
        from horovod.spark.task import get_available_devices

        addresses = get_available_devices()
    except Exception:
        return None
    return str(addresses[0]) if addresses else None


class HorovodCollective:
    """The trainer seam's Collective over Horovod (training/trainer.py): `start()` inside a rank
    runs `hvd.init()`; every other Horovod call a rank makes goes through this object. Rank and
    size are read when asked: an elastic run changes them at each reset."""

    def __init__(self, hvd: Any) -> None:
        self._hvd = hvd

    @property
    def rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def size(self) -> int:
        return int(self._hvd.size())

    @property
    def local_rank(self) -> int:
        return int(self._hvd.local_rank())

    @classmethod
    def start(cls) -> "HorovodCollective":
        import horovod.tensorflow.keras as hvd

        hvd.init()
        return cls(hvd)

    def distributed_optimizer(self, optimizer: Any, cfg: Any) -> Any:
        """Horovod's DistributedOptimizer with the config's compression and local aggregation."""
        hvd, settings = self._hvd, cfg.horovod
        compression = hvd.Compression.fp16 if settings.compression == "fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(optimizer, compression=compression,
                                        backward_passes_per_step=settings.backward_passes_per_step,
                                        average_aggregated_gradients=True)

    def fit_callbacks(self, broadcast: bool = True) -> list[Any]:
        """Rank 0's variables broadcast at the start (unless an elastic state's sync does it) and
        the epoch's training metrics averaged."""
        averaged = [self._hvd.callbacks.MetricAverageCallback()]
        return [self._hvd.callbacks.BroadcastGlobalVariablesCallback(0), *averaged] if broadcast else averaged

    def elastic_state(self, model: Any, **progress: Any) -> Any:
        """Horovod elastic state holding the model's and its built optimizer's variables and
        `progress` (plain values: epoch, batch): committed, restored on a failed collective and
        synchronised from rank 0 at each reset."""
        from training.elastic import KerasModelState

        return KerasModelState(model, **progress)

    def run_elastic(self, train: Callable[[Any], Any], state: Any) -> Any:
        """`train(state)` under Horovod's elastic loop: a failed collective restores the last commit,
        a change of hosts re-initialises Horovod (new rank and size), then `train` runs again."""
        import horovod.tensorflow.keras as hvd

        return hvd.elastic.run(train)(state)

    def allreduce(self, values: Any, op: str, name: str) -> Any:
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        reduce_op = {"sum": hvd_tf.Sum, "max": hvd_tf.Max}[op]
        return hvd_tf.allreduce(tf.constant(values, tf.float64), op=reduce_op, name=name).numpy()
