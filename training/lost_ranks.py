"""Fail a Horovod run whose rank's host is lost, instead of hanging.

Horovod 0.28.1's Spark driver waits for every rank's exit code on a socket to the rank's task
service. When a host dies without a reset (power, kernel, a cable), that read never returns: the
surviving ranks fail after `horovod.peer_timeout_s`, Spark fails the lost task, yet
`horovod.spark.run` blocks forever. The watch below runs beside it on the driver: once Spark
reports a failed attempt of Horovod's stage (a non-elastic run can never finish then) and the
survivors have had their peer timeout, it shuts this process's connections to the executors'
hosts, so Horovod's waits return and Horovod cancels its Spark job and raises as it does for a
failed rank.

An elastic run (`horovod.spark.run_elastic`) hangs the same way: its driver waits for every
worker's exit code before the survivors may go on. There the watch shuts only the connections to
hosts that no longer answer a new connection, so the lost worker is recorded as failed and the run
goes on without it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


@dataclass
class StageWatch:
    """The pure part: which stage is Horovod's and when its failed attempts make the run lost.

    `observe` takes the active stages' (id, tasks, failed attempts) and the time, and returns
    True once the run is lost and `grace_s` has passed since Spark first reported a failure."""

    num_proc: int
    grace_s: float
    ignored: frozenset[int] = frozenset()  # stages active before the launch
    stage_id: int | None = None
    failed_since: float | None = None
    failed_attempts: int = 0

    def observe(self, stages: Iterable[tuple[int, int, int]], now: float) -> bool:
        for stage_id, tasks, failed in stages:
            if stage_id in self.ignored:
                continue
            if self.stage_id is None and tasks == self.num_proc:
                self.stage_id = stage_id
            if stage_id == self.stage_id:
                self.failed_attempts = max(self.failed_attempts, failed)
        if self.failed_attempts and self.failed_since is None:
            self.failed_since = now
        return self.failed_since is not None and now - self.failed_since >= self.grace_s


def _stages(tracker: Any, known: int | None) -> list[tuple[int, int, int]]:
    ids = set(tracker.getActiveStageIds())
    if known is not None:
        ids.add(known)  # a failed stage leaves the active list; its record stays
    out = []
    for stage_id in ids:
        info = tracker.getStageInfo(stage_id)
        if info is not None:
            out.append((stage_id, info.numTasks, info.numFailedTasks))
    return out


def shut_connections_to(addresses: set[str]) -> int:
    """Shut this process's established TCP connections to `addresses`; a blocked read on one of
    them returns at once (a dead host would never answer). Returns how many were shut."""
    import psutil

    shut = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr or conn.raddr.ip not in addresses:
            continue
        try:
            sock = socket.socket(fileno=os.dup(conn.fd))
        except OSError:
            continue  # closed meanwhile
        try:
            sock.shutdown(socket.SHUT_RDWR)
            shut += 1
        except OSError:
            pass
        finally:
            sock.close()
    return shut


def unreachable(endpoints: Iterable[tuple[str, int]], timeout_s: float = 3.0) -> set[str]:
    """The addresses among `endpoints` (address, port) where a new TCP connection gets no answer
    at all within `timeout_s` (a refusal is an answer: that host is up)."""
    dead, alive = set(), set()
    for address, port in endpoints:
        if address in dead or address in alive:
            continue
        try:
            socket.create_connection((address, port), timeout=timeout_s).close()
            alive.add(address)
        except ConnectionRefusedError:
            alive.add(address)
        except OSError:
            dead.add(address)
    return dead


def connected_endpoints(addresses: set[str]) -> list[tuple[str, int]]:
    """(address, port) of the TCP connections this process opened to `addresses`: their remote
    port is a listening service there (a connection a host opened to us ends on an ephemeral port,
    which a firewall may silently drop a probe to)."""
    import psutil

    connections = psutil.Process().net_connections(kind="tcp")
    listening = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return [(c.raddr.ip, c.raddr.port) for c in connections
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.ip in addresses
            and c.laddr.port not in listening]


def run_watched(run: Callable[[], Any], spark_context: Any, num_proc: int, grace_s: float,
                peer_addresses: set[str], poll_s: float = 1.0, elastic: bool = False) -> Any:
    """`run()` (a `horovod.spark.run` or `run_elastic` call, which must stay on the main thread:
    Horovod installs a signal handler) watched from a thread as the module says. Returns its
    result, or raises its exception (as `LostRank` when Spark had lost one of its tasks)."""
    tracker = spark_context.statusTracker()
    watch = StageWatch(num_proc, grace_s, frozenset(tracker.getActiveStageIds()))
    done = threading.Event()

    def watch_loop() -> None:
        while not done.wait(poll_s):
            if not watch.observe(_stages(tracker, watch.stage_id), time.monotonic()):
                continue
            # Again on every poll: a wait that opens a connection after the first shut gets it too.
            if elastic:
                gone = unreachable(connected_endpoints(peer_addresses))
                shut = shut_connections_to(gone) if gone else 0
                if shut:
                    log.error("Spark lost an attempt of Horovod's tasks and %s answers no more: shut %d "
                              "connection(s) to it, so the elastic run goes on without it", ", ".join(sorted(gone)),
                              shut)
                continue
            shut = shut_connections_to(peer_addresses)
            if shut:
                log.error("Spark lost %d attempt(s) of Horovod's tasks and the ranks did not end within "
                          "%.0f s: a host is gone; shut %d connection(s) to the executors' hosts so Horovod "
                          "stops", watch.failed_attempts, grace_s, shut)

    watcher = threading.Thread(target=watch_loop, name="horovod-lost-rank-watch", daemon=True)
    watcher.start()
    try:
        return run()
    except Exception as exc:
        if watch.failed_since is not None:
            raise LostRank(f"a rank's host was lost (Spark failed {watch.failed_attempts} attempt(s) of Horovod's "
                           f"tasks): {type(exc).__name__}: {exc}") from exc
        raise
    finally:
        done.set()
        watcher.join()


class LostRank(RuntimeError):
    """Spark lost a rank's task (its executor or host) and Horovod was stopped."""
