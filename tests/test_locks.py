"""The lease on a real Hadoop local file system (through the JVM, as jobs use it): exclusive,
kept alive by its heartbeat, expiring when its holder stops, refusing a commit once lost."""

from __future__ import annotations

import json
import time

import pytest

from deepspark.locks import ConcurrentRunError, Lease, LockLostError
from deepspark.storage import HadoopFS, to_url

pytestmark = pytest.mark.spark


def test_the_heartbeat_keeps_a_long_job_s_lock_and_a_stopped_one_expires(spark, tmp_path):
    fs = HadoopFS(spark)
    url = to_url(str(tmp_path / "_LOCK"))
    first = Lease(fs, url, "first", ttl_s=0.6)
    first.acquire()
    time.sleep(1.5)  # 2.5 lease lengths: only the heartbeat keeps it
    with pytest.raises(ConcurrentRunError, match="locked by job first"):
        Lease(fs, url, "second", ttl_s=0.6).acquire()
    first._stop.set()  # the holder hangs (its heartbeat stops) without releasing
    first._thread.join()
    time.sleep(1.0)
    second = Lease(fs, url, "second", ttl_s=0.6)
    second.acquire()  # expired: taken over
    assert json.loads((tmp_path / "_LOCK").read_text())["job_id"] == "second"
    with pytest.raises(LockLostError, match="first lost its lock"):
        first.check()  # the stalled holder must not commit now
    second.check()
    first.release()  # does not remove the successor's lock
    assert (tmp_path / "_LOCK").exists()
    second.release()
    assert not (tmp_path / "_LOCK").exists()


def test_exclusive_create_has_one_winner(spark, tmp_path):
    fs = HadoopFS(spark)
    url = to_url(str(tmp_path / "entry.json"))
    assert fs.create_exclusive(url, "a") is True
    assert fs.create_exclusive(url, "b") is False
    assert (tmp_path / "entry.json").read_text() == "a"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
