"""The Horovod seam: launch a picklable function as N ranks on Spark executors (gloo).

Everything Horovod-specific that the driver touches lives here, so another launcher
(TorchDistributor, Ray) replaces this module, not the jobs.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence


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


def run_ranks(fn: Callable[[], Any], num_proc: int, start_timeout_s: int, nics: Sequence[str] | None,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn` on `num_proc` Horovod ranks over gloo, one per Spark task; results by rank."""
    import horovod.spark

    rank_env = rank_environment(os.environ)
    rank_env.update({
        "HOROVOD_GLOO_TIMEOUT_SECONDS": "60",  # a dead peer fails collectives within a minute
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYTHONUNBUFFERED": "1",
        # pyarrow's legacy-dataset notices and Petastorm's "use make_reader" hint (we read raw
        # columns with make_batch_reader on purpose) are not actionable in a rank's log.
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning:petastorm.reader",
    })
    rank_env.update(env or {})
    try:
        return horovod.spark.run(
            fn, num_proc=num_proc, start_timeout=start_timeout_s, use_gloo=True,
            nics=set(nics) if nics else None, env=rank_env, verbose=1,
        )
    except Exception as exc:
        raise RankFailure(f"Horovod ranks failed: {type(exc).__name__}: {exc}") from exc


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
    runs `hvd.init()`; every other Horovod call a rank makes goes through this object."""

    def __init__(self, hvd: Any) -> None:
        self._hvd = hvd
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()

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

    def fit_callbacks(self) -> list[Any]:
        return [self._hvd.callbacks.BroadcastGlobalVariablesCallback(0), self._hvd.callbacks.MetricAverageCallback()]

    def allreduce(self, values: Any, op: str, name: str) -> Any:
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        reduce_op = {"sum": hvd_tf.Sum, "max": hvd_tf.Max}[op]
        return hvd_tf.allreduce(tf.constant(values, tf.float64), op=reduce_op, name=name).numpy()
