"""Start the multi-host test cluster by hand (tests/multihost.py): five network-namespace hosts
with moto's S3 server, a basic-auth MLflow server, a Spark master and two workers; prints how to
submit from the driver host, and removes everything on Ctrl-C.

    sudo .venv/bin/python scripts/multihost_cluster.py       # after scripts/setup.sh --with-cluster
"""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import multihost, netns  # noqa: E402

log = logging.getLogger("multihost")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    why_not = netns.unavailable() or multihost.missing()
    if why_not:
        log.error("cannot start the cluster: %s", why_not)
        return 1
    with tempfile.TemporaryDirectory(prefix="deepspark-multihost-") as work, \
            multihost.MultiHostCluster(Path(work)) as cluster:
        assert cluster.mlflow is not None
        driver = cluster.hosts.hosts["driver"].name
        env = cluster.driver_env()
        exports = " ".join(f"{k}={env[k]}" for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                     "AWS_DEFAULT_REGION", "SPARK_LOCAL_IP", "MLFLOW_TRACKING_USERNAME",
                                                     "MLFLOW_TRACKING_PASSWORD"))
        jars = ",".join(str(multihost.S3A_JARS / jar) for jar in multihost.JARS)
        log.info("master %s (UI %s), tracking %s, store %s; logs in %s", cluster.master_url, cluster.master_ui,
                 cluster.mlflow.url, cluster.s3_endpoint, work)
        log.info("a shell on the driver host:\n  sudo ip netns exec %s env %s PYSPARK_PYTHON=%s bash", driver, exports,
                 sys.executable)
        log.info("then: make dist && spark-submit --master %s --jars %s --py-files dist/deepspark.zip jobs/etl.py ...",
                 cluster.master_url, jars)
        log.info("Ctrl-C stops every process and removes the hosts")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
