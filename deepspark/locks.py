"""One writer at a time per output: an exclusive lock file with an expiring lease.

The lock is a small JSON file created with `HadoopFS.create_exclusive` (atomic on a local disk
and on HDFS). Its holder touches it every `ttl/3` seconds from a daemon thread; a lock not
touched for `ttl` seconds belongs to a dead holder on any host and is taken over by moving it
aside (a rename: of two takers only one succeeds) and creating a fresh one. A holder on this
very host (same boot, same pid namespace) whose process is gone is taken over at once. Expiry
compares the lock's modification time (the holder's clock on a local disk, the NameNode's on
HDFS) with the taker's clock: hosts' clocks must agree to well within `ttl`/3 (NTP does). Before
it commits, a holder calls `check()`, which fails if its lease was lost (expired while it stalled
and taken over), so a stalled writer cannot commit over its successor.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from deepspark.storage import HadoopFS

DEFAULT_TTL_S = 120.0
LOCK_FILE = "_LOCK"  # the lock's name inside the folder it guards


class ConcurrentRunError(RuntimeError):
    """Another run holds the output's lock (the message names it)."""


class LockLostError(RuntimeError):
    """This run's lease expired and another run took the lock over; nothing was committed."""


@dataclass
class Lease:
    """`with Lease(fs, url, job_id).held(force): ...` - exclusive, expiring, heartbeated."""

    fs: HadoopFS
    url: str  # the lock file
    job_id: str
    ttl_s: float = DEFAULT_TTL_S
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lost: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def owner(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(), **_process_space(),
                "since": time.time(), "ttl_s": self.ttl_s, "token": self.token}

    def acquire(self, force: bool = False) -> None:
        """Take the lock, or raise ConcurrentRunError naming its live holder. `force` takes over
        a lock whatever its age (for a holder known to be gone)."""
        for _ in range(3):
            if self.fs.create_exclusive(self.url, json.dumps(self.owner())):
                self._start_heartbeat()
                return
            held = self.holder()
            if not held:  # vanished between our create and read (released): try again
                continue
            if not (force or self._expired(held) or _dead_on_this_host(held)):
                raise ConcurrentRunError(describe(self.url, held))
            self._take_over(held)
        raise ConcurrentRunError(f"{self.url}: the lock changed hands while this run tried to take it over")

    def check(self) -> None:
        """Raise LockLostError unless this run still holds the lock (call before committing)."""
        if self._lost.is_set() or self._read_strict().get("token") != self.token:
            self._lost.set()
            raise LockLostError(f"{self.url}: job {self.job_id} lost its lock (lease expired, another run took "
                                "over); nothing of this run was committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holder().get("token") == self.token:
            self.fs.delete(self.url)

    def holder(self) -> dict[str, Any]:
        """The lock's content, {} when it is absent or unreadable (for messages and takeovers)."""
        return _read_lock(self.fs, self.url, strict=False)

    def _read_strict(self) -> dict[str, Any]:
        """The lock's content, {} when it is absent; other I/O errors propagate (a file system
        hiccup must not read as a lost lease)."""
        return _read_lock(self.fs, self.url, strict=True)

    def _expired(self, held: dict[str, Any]) -> bool:
        touched = self.fs.modified_ms(self.url)
        ttl = float(held.get("ttl_s", self.ttl_s))
        return touched is not None and time.time() - touched / 1000 > ttl

    def _take_over(self, held: dict[str, Any]) -> None:
        """Move the dead holder's lock aside (only one taker's rename succeeds), then retry."""
        aside = f"{self.url}.taken-{uuid.uuid4().hex}"
        if not self.fs.move_file(self.url, aside):
            return  # another taker moved it first; our next create decides
        moved = _read_lock(self.fs, aside, strict=False)
        if moved.get("token") != held.get("token"):  # it was already a fresh lock: put it back
            self.fs.move_file(aside, self.url)
            raise ConcurrentRunError(describe(self.url, moved))
        self.fs.delete(aside)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if self._read_strict().get("token") != self.token:  # gone, or someone else's
                        self._lost.set()
                        return
                    self.fs.touch(self.url)
                except Exception:  # an I/O hiccup: the next beat retries (the lease has 3 beats)
                    continue

        self._thread = threading.Thread(target=beat, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()


def describe(url: str, held: dict[str, Any]) -> str:
    since = held.get("since")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return (f"{url} is locked by job {held.get('job_id')} (pid {held.get('pid')} on {held.get('host')}, since "
            f"{started}; its lease expires {held.get('ttl_s', '?')} s after its last heartbeat); wait for it, or "
            "pass force_unlock=true if that job is gone")


def _read_lock(fs: HadoopFS, url: str, strict: bool) -> dict[str, Any]:
    """A lock file's content; {} when it is absent or half-written, and, unless `strict`, also
    when it cannot be read."""
    try:
        if not fs.exists(url):
            return {}
        return json.loads(fs.read_text(url))
    except json.JSONDecodeError:
        return {}
    except Exception:
        if strict:
            raise
        return {}


def _process_space() -> dict[str, Any]:
    """What makes a pid comparable: the same boot and the same pid namespace (containers sharing a
    host name have their own)."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return {}
    return {"boot_id": boot, "pid_namespace": namespace}


def _dead_on_this_host(held: dict[str, Any]) -> bool:
    """A holder in this host's pid space whose process is gone (elsewhere only the lease can tell)."""
    here = _process_space()
    if held.get("host") != socket.gethostname() or not here or any(held.get(k) != v for k, v in here.items()):
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    try:  # a killed process nobody has reaped yet (a zombie) still answers kill(pid, 0)
        with open(f"/proc/{int(held['pid'])}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False
