"""The search's store: where model state hops between workers, never through the driver.

A folder every executor and the driver reach through pyarrow.fs (a local or NFS disk, HDFS, s3,
gs). Each file has one writer and appears whole (written beside, then moved into place), so a
reader sees a unit's marker only after its state:

    trials.json                      the configurations, their child runs, the partition count
    m<trial>/unit-<k>.ckpt           model and optimizer state after the trial's k-th unit
    m<trial>/unit-<k>.json           the unit's marker: epoch, partition, samples, metrics
    ctl/<attempt>/w<p>/<seq>.json    the driver's assignments to hopper p (one folder per attempt,
                                     so a resumed search never reads a killed one's messages)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from deepspark import filesystem
from deepspark.filesystem import reaches

TRIALS = "trials.json"


@dataclass
class Backoff:
    """How long to wait before looking at the store again: 1 ms, then twice as long each time up
    to `cap_s`, so an answer that comes quickly (the driver's next order, a few ms after a
    marker) is seen quickly, and a long wait costs a remote store few requests."""

    cap_s: float
    pause: float = 0.001

    def sleep(self) -> None:
        time.sleep(self.pause)
        self.pause = min(self.cap_s, 2 * self.pause)

    def reset(self) -> None:
        """Something happened: the next answer may be due soon."""
        self.pause = 0.001


def unit_name(trial: int, index: int, suffix: str) -> str:
    return f"m{trial:03d}/unit-{index:05d}.{suffix}"


@dataclass(frozen=True)
class Store:
    """The search's folder: names inside it, over `deepspark.filesystem`'s files (pyarrow.fs,
    written whole by one rename)."""

    url: str  # the search's folder

    @staticmethod
    def check(url: str) -> None:
        if not reaches(url):
            raise ValueError(f"{url}: pyarrow.fs does not reach this URL from Python")

    def _url(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        filesystem.write_atomic(self._url(rel), data)

    def read(self, rel: str) -> bytes:
        return filesystem.read_bytes(self._url(rel))

    def exists(self, rel: str) -> bool:
        return filesystem.is_file(self._url(rel))

    def wait_for(self, rel: str, poll_s: float) -> float:
        """Block until `rel` exists (looking with a `Backoff` up to `poll_s`): seconds waited."""
        started, backoff = time.perf_counter(), Backoff(poll_s)
        while not self.exists(rel):
            backoff.sleep()
        return time.perf_counter() - started

    def delete(self, rel: str) -> None:
        filesystem.delete_file(self._url(rel))

    def write_json(self, rel: str, value: Any) -> None:
        self.write(rel, json.dumps(value, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read(rel))

    def markers(self, trial: int) -> list[dict[str, Any]]:
        """Every finished unit of a trial, in order (a gap ends the list: later files are from a
        unit whose predecessor never finished, which cannot happen with one writer per unit)."""
        names = [n for n in filesystem.file_names(self._url(f"m{trial:03d}"))
                 if n.endswith(".json") and n.startswith("unit-")]
        out = []
        for expected, name in enumerate(names):
            if name != f"unit-{expected:05d}.json":
                break
            out.append(self.read_json(f"m{trial:03d}/{name}"))
        return out
