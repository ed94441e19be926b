"""Horovod's timeline (`HOROVOD_TIMELINE`, written by rank 0) read as seconds of communication per
window of wall-clock time: the part of an epoch's breakdown that Python cannot time, because the
gradients' allreduces run inside the compiled train step. Pure functions on the file's text.

The file is Chrome's trace format, a JSON array that stays open while Horovod writes it:
- per tensor one `pid`, named by a metadata ("M") event; pid 0's metadata holds
  `start_time_since_epoch_in_micros`, the origin of every `ts` (microseconds);
- a "B" event opens an activity by name (NEGOTIATE_ALLREDUCE, ALLREDUCE, and inside it
  MEMCPY_IN_FUSION_BUFFER, GLOO_ALLREDUCE, ...), an "E" event without a name closes that pid's
  innermost open one; "X" events are the ranks' readiness ticks during negotiation.
Negotiation is waiting for every rank to be ready (slow ranks show here); processing (ALLREDUCE,
BROADCAST, ALLGATHER) is moving the bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

NEGOTIATION_PREFIX = "NEGOTIATE_"
PROCESSING = frozenset({"ALLREDUCE", "BROADCAST", "ALLGATHER", "ALLTOALL", "REDUCESCATTER"})


def parse(text: str) -> list[dict[str, Any]]:
    """The events of a timeline file, also one Horovod is still writing (no closing bracket, a
    trailing comma, a last line cut short)."""
    body = text.strip()
    if not body:
        return []
    if body.endswith("]"):
        try:
            events: list[dict[str, Any]] = json.loads(body)
            return events
        except json.JSONDecodeError:
            pass
    body = body.rstrip("]").rstrip().rstrip(",")
    while body:
        try:
            events = json.loads(body + "]")
            return events
        except json.JSONDecodeError:
            cut = body.rfind("},")  # drop the last, incomplete event
            if cut < 0:
                return []
            body = body[:cut + 1]
    return []


def origin_micros(events: Iterable[dict[str, Any]]) -> int | None:
    """Wall-clock microseconds since the Unix epoch at the timeline's ts = 0."""
    for event in events:
        start = event.get("args", {}).get("start_time_since_epoch_in_micros") if event.get("ph") == "M" else None
        if start is not None:
            return int(start)
    return None


@dataclass(frozen=True)
class Span:
    name: str
    start_us: int
    end_us: int


class SpanBuilder:
    """Each tensor's outermost activities, from its B and E events as they come (nested ones are
    parts of them): `spans` holds the complete ones."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._open: dict[Any, list[tuple[str, int]]] = {}

    def take(self, event: dict[str, Any]) -> None:
        phase, pid = event.get("ph"), event.get("pid")
        if phase == "B":
            self._open.setdefault(pid, []).append((str(event.get("name", "")), int(event["ts"])))
        elif phase == "E" and self._open.get(pid):
            name, start = self._open[pid].pop()
            if not self._open[pid]:
                self.spans.append(Span(name, start, int(event["ts"])))


def top_level_spans(events: Iterable[dict[str, Any]]) -> list[Span]:
    """Each tensor's outermost activities, from its B and E events (nested ones are parts of them)."""
    builder = SpanBuilder()
    for event in events:
        builder.take(event)
    return builder.spans


def union_seconds(intervals: Iterable[tuple[int, int]], window: tuple[int, int]) -> float:
    """Seconds of `window` (microseconds) covered by at least one interval: tensors reduced at the
    same time count once."""
    low, high = window
    clipped = sorted((max(a, low), min(b, high)) for a, b in intervals if b > low and a < high)
    covered, end = 0, low
    for start, stop in clipped:
        if stop <= end:
            continue
        covered += stop - max(start, end)
        end = stop
    return covered / 1e6


def communication_seconds(events: list[dict[str, Any]], start_s: float, end_s: float) -> dict[str, float]:
    """Seconds of negotiation and of processing (moving bytes) between two wall-clock times
    (`time.time()`), each counted once however many tensors overlap; {} without an origin."""
    origin = origin_micros(events)
    if origin is None:
        return {}
    window = (int(start_s * 1e6) - origin, int(end_s * 1e6) - origin)
    spans = top_level_spans(events)
    return {
        "negotiation": union_seconds(((s.start_us, s.end_us) for s in spans
                                      if s.name.startswith(NEGOTIATION_PREFIX)), window),
        "processing": union_seconds(((s.start_us, s.end_us) for s in spans if s.name in PROCESSING), window),
    }


class Follower:
    """Reads a timeline file as Horovod appends to it, keeping only the complete spans and each
    tensor's open activities: an epoch's window costs what the epoch wrote, not the whole file
    again. Horovod 0.28 writes events back to back and closes the array after each (`...}]`),
    overwriting that `]` with `,` before the next one; what is read is taken up to the last
    complete event, and the next read starts there."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.origin: int | None = None
        self.built = SpanBuilder()

    def read(self) -> None:
        """Take in the events completed since the last read."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                text = fh.read().decode("latin-1")  # one character per byte: indexes are offsets
        except FileNotFoundError:
            return
        decoder = json.JSONDecoder()
        at, consumed = 0, 0
        while True:
            while at < len(text) and text[at] in "[],\r\n\t ":
                at += 1
            if at >= len(text):
                break
            try:
                event, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                break  # an event still being written: read again from its start
            consumed = at
            if isinstance(event, dict):
                if self.origin is None:
                    self.origin = origin_micros([event])
                self.built.take(event)
        self.offset += consumed

    def seconds(self, start_s: float, end_s: float) -> dict[str, float]:
        """Seconds of processing (moving bytes) and of negotiation only (waiting for every rank,
        not also moving another tensor's bytes) between two wall-clock times; then forgets the
        spans that ended before `start_s`. {} before the file's origin is known."""
        self.read()
        if self.origin is None:
            return {}
        window = (int(start_s * 1e6) - self.origin, int(end_s * 1e6) - self.origin)
        spans = self.built.spans
        processing = [(s.start_us, s.end_us) for s in spans if s.name in PROCESSING]
        talking = processing + [(s.start_us, s.end_us) for s in spans if s.name.startswith(NEGOTIATION_PREFIX)]
        busy, moving = union_seconds(talking, window), union_seconds(processing, window)
        self.built.spans = [s for s in spans if s.end_us > window[0]]
        return {"allreduce": moving, "negotiation": busy - moving}
