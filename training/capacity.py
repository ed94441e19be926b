"""The capacity planner's cost model: pure functions from measured inputs to predicted step and
epoch times for N data-parallel ranks. The measuring shell (the allreduce probe, a finished run's
metrics) lives elsewhere; everything here is arithmetic a test can check by hand.

Per step, each rank computes its batch, waits for input it could not prefetch, and exchanges M
bytes of gradients:
- a ring allreduce takes 2(N-1) latency hops and moves 2(N-1)/N x M bytes through each rank's link
  (nccl-tests' "bus bandwidth" is measured on that same 2(N-1)/N factor);
- a parameter server, with its M bytes spread over k servers, sends and receives M on each worker
  and N x M / k on each server: the slower of the two links decides;
- communication overlaps the backward pass (Horovod starts allreducing a layer's gradients as soon
  as they are ready), so only what exceeds the overlappable share of compute adds to the step;
- `backward_passes_per_step` = b exchanges once per b steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Link:
    """A link between ranks from an allreduce probe: per-message latency alpha (seconds) and
    bandwidth beta (bytes per second)."""

    latency_s: float
    bytes_per_s: float


def fit_link(ranks: int, sizes_bytes: Sequence[float], seconds: Sequence[float]) -> Link:
    """The link that explains an allreduce probe: least squares of t = a + b M over the probed
    sizes, then alpha = a / 2(N-1) and beta = 2(N-1) / (N b) from the ring's cost. Needs two or more
    sizes and ranks; a negative intercept (noise at small sizes) is read as no latency."""
    if ranks < 2 or len(set(sizes_bytes)) < 2 or len(sizes_bytes) != len(seconds):
        raise ValueError("fit_link needs >= 2 ranks and times for >= 2 distinct sizes")
    slope, intercept = np.polyfit(np.asarray(sizes_bytes, np.float64), np.asarray(seconds, np.float64), 1)
    if slope <= 0:
        raise ValueError(f"fit_link: time does not grow with size ({slope:.3g} s per byte): probe larger sizes")
    hops = 2 * (ranks - 1)
    return Link(max(float(intercept), 0.0) / hops, hops / (ranks * float(slope)))


def ring_allreduce_s(ranks: int, grad_bytes: float, link: Link) -> float:
    """Seconds of one ring allreduce of `grad_bytes` over `ranks`: 2(N-1) alpha + 2(N-1)/N M/beta
    (0 for one rank)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * link.latency_s + 2 * (ranks - 1) / ranks * grad_bytes / link.bytes_per_s


def parameter_server_s(ranks: int, servers: int, grad_bytes: float, link: Link) -> float:
    """Seconds of one push and pull through `servers` parameter servers: each worker sends and
    receives M, each server N x M / k; both directions cost a latency."""
    if ranks <= 1:
        return 0.0
    busiest = max(grad_bytes, ranks * grad_bytes / servers)
    return 2 * link.latency_s + 2 * busiest / link.bytes_per_s


def bytes_per_epoch(ranks: int, grad_bytes: float, steps: int, scheme: str = "ring") -> float:
    """Bytes on the wire in an epoch of `steps`: a ring 2 M (N-1) K, a parameter server 2 M N K."""
    if scheme == "ring":
        return 2 * grad_bytes * (ranks - 1) * steps
    if scheme == "ps":
        return 2 * grad_bytes * ranks * steps
    raise ValueError(f"scheme: 'ring' or 'ps', not {scheme!r}")


def step_s(compute_s: float, input_wait_s: float, comm_s: float, overlap: float = 0.0,
           backward_passes_per_step: int = 1) -> float:
    """A step's seconds: compute, the input wait, and the communication that does not fit in the
    overlappable share `overlap` (0..1) of compute, exchanged once per `backward_passes_per_step`."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap: a share of compute in [0, 1], not {overlap}")
    exchanged = comm_s / backward_passes_per_step
    return compute_s + input_wait_s + max(0.0, exchanged - overlap * compute_s)


def epoch_s(rows: int, batch_per_rank: int, ranks: int, step_seconds: float) -> float:
    """An epoch of `rows` at `batch_per_rank` rows per rank and step: ceil(rows / (b N)) steps."""
    return math.ceil(rows / (batch_per_rank * ranks)) * step_seconds


def scaling_efficiency(one_rank_step_s: float, n_rank_step_s: float) -> float:
    """Throughput of N ranks over N times one rank's, at a fixed per-rank batch: t1 / tN."""
    return one_rank_step_s / n_rank_step_s


@dataclass(frozen=True)
class Prediction:
    ranks: int
    comm_s: float
    step_s: float
    step_no_overlap_s: float
    epoch_s: float
    efficiency: float


@dataclass(frozen=True)
class Host:
    """Where ranks run: `hosts` machines, the ranks spread evenly over them, and a rank's compute
    per step as measured with r ranks on one host (`crowded`: (r, seconds) pairs). Ranks on one
    host share its cores, caches and memory bandwidth, so each computes slower the more of them
    there are; how much slower is measured, not modelled. Between measured r the line through
    them; past the last, the line through the last two, never below the last; with one point,
    that point."""

    hosts: int = 1
    crowded: tuple[tuple[int, float], ...] = ()

    def ranks_per_host(self, ranks: int) -> int:
        return math.ceil(ranks / self.hosts)

    def compute_s(self, ranks: int, default: float) -> float:
        """A rank's compute per step at `ranks` ranks (`default` when nothing was measured)."""
        points = sorted(dict(self.crowded).items())
        if not points:
            return default
        r = self.ranks_per_host(ranks)
        if len(points) == 1 or r <= points[0][0]:
            return points[0][1]
        (r0, c0), (r1, c1) = next(((a, b) for a, b in zip(points, points[1:]) if r <= b[0]), points[-2:])
        line = c0 + (c1 - c0) * (r - r0) / (r1 - r0)
        # Past the last point, more ranks on a host never make each faster (noise could slope the line down).
        return max(line, points[-1][1]) if r > points[-1][0] else max(line, 1e-6)

    def measured(self, ranks: int) -> bool:
        """Whether `ranks` fall within the measured ranks per host (else extrapolated)."""
        return bool(self.crowded) and min(r for r, _ in self.crowded) <= self.ranks_per_host(ranks) <= max(
            r for r, _ in self.crowded)


def predict(candidates: Iterable[int], compute_s: float, input_wait_s: float, grad_bytes: float, link: Link,
            rows: int, batch_per_rank: int, overlap: float, backward_passes_per_step: int = 1,
            host: Host = Host()) -> list[Prediction]:
    """Ring-allreduce predictions for each number of ranks in `candidates`: a rank's compute per
    step is `compute_s`, or what `host` measured at that many ranks per host."""
    base = step_s(host.compute_s(1, compute_s), input_wait_s, 0.0)
    out = []
    for n in sorted(set(candidates)):
        comm = ring_allreduce_s(n, grad_bytes, link)
        compute = host.compute_s(n, compute_s)
        step = step_s(compute, input_wait_s, comm, overlap, backward_passes_per_step)
        out.append(Prediction(n, comm, step, step_s(compute, input_wait_s, comm, 0.0, backward_passes_per_step),
                              epoch_s(rows, batch_per_rank, n, step), scaling_efficiency(base, step)))
    return out


def recommend_ranks(predictions: Iterable[Prediction], min_efficiency: float = 0.7) -> int:
    """The most ranks whose scaling efficiency is at least `min_efficiency` (one rank otherwise):
    more ranks past that point buy little epoch time for their cost."""
    fit = [p.ranks for p in predictions if p.efficiency >= min_efficiency]
    return max(fit) if fit else 1


def fusion_threshold_mb(grad_bytes: float, default_mb: int = 128) -> int:
    """Horovod's fusion buffer large enough to send the gradients in one allreduce, but no smaller
    than Horovod's default (a larger buffer only costs memory)."""
    return max(default_mb, math.ceil(grad_bytes / 2**20))
