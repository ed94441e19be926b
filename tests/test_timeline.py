"""Reading Horovod's timeline (training/timeline.py) on a file in the format Horovod 0.28.1 writes
(its events' shapes taken from a real 2-rank run here), with values computed by hand."""

from __future__ import annotations

import json

import pytest

from training.timeline import communication_seconds, origin_micros, parse, top_level_spans, union_seconds

ORIGIN = 1_796_653_605_000_000  # microseconds since the Unix epoch at ts = 0

EVENTS = [
    {"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": ORIGIN}},
    {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "DistributedAdam_Allreduce/HorovodAllreduce_grads_0"}},
    {"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 100, "pid": 1},
    {"ph": "X", "name": "0", "ts": 101, "pid": 1, "dur": 0},
    {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "DistributedAdam_Allreduce/HorovodAllreduce_grads_1"}},
    {"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 120, "pid": 2},
    {"ph": "X", "name": "1", "ts": 149, "pid": 1, "dur": 0},
    {"ph": "E", "ts": 150, "pid": 1},
    {"ph": "B", "name": "ALLREDUCE", "ts": 160, "pid": 1},
    {"ph": "B", "name": "MEMCPY_IN_FUSION_BUFFER", "ts": 161, "pid": 1},
    {"ph": "E", "ts": 170, "pid": 1},
    {"ph": "E", "ts": 170, "pid": 2},
    {"ph": "B", "name": "GLOO_ALLREDUCE", "ts": 171, "pid": 1},
    {"ph": "E", "ts": 290, "pid": 1},
    {"ph": "B", "name": "ALLREDUCE", "ts": 200, "pid": 2},
    {"ph": "E", "ts": 300, "pid": 1, "args": {"dtype": "float32", "shape": "[10]"}},
    {"ph": "E", "ts": 400, "pid": 2, "args": {"dtype": "float32", "shape": "[32, 64]"}},
    {"ph": "B", "name": "NEGOTIATE_BROADCAST", "ts": 1000, "pid": 3},
    {"ph": "E", "ts": 1010, "pid": 3},
    {"ph": "B", "name": "BROADCAST", "ts": 1010, "pid": 3},
    {"ph": "E", "ts": 1050, "pid": 3},
]


def horovod_text(events: list[dict]) -> str:
    """The file as Horovod writes it: '[', then events separated by commas and newlines."""
    return "[\n" + ",\n".join(json.dumps(e) for e in events) + "]"


def test_a_finished_and_an_unfinished_file_parse_to_their_complete_events():
    text = horovod_text(EVENTS)
    assert parse(text) == EVENTS
    assert parse(text[:-1] + ",\n") == EVENTS  # still being written: no closing bracket yet
    cut = text[: text.index('"ts": 1050')]  # the last event cut short
    assert parse(cut) == EVENTS[:-1]
    assert parse("") == [] and parse("[\n") == []


def test_only_each_tensors_outermost_activities_count():
    spans = {(s.name, s.start_us, s.end_us) for s in top_level_spans(EVENTS)}
    assert spans == {("NEGOTIATE_ALLREDUCE", 100, 150), ("NEGOTIATE_ALLREDUCE", 120, 170), ("ALLREDUCE", 160, 300),
                     ("ALLREDUCE", 200, 400), ("NEGOTIATE_BROADCAST", 1000, 1010), ("BROADCAST", 1010, 1050)}


def test_overlapping_tensors_count_once_and_the_window_clips():
    assert union_seconds([(100, 150), (120, 170)], (0, 10_000)) == pytest.approx(70e-6)
    assert union_seconds([(160, 300), (200, 400)], (250, 350)) == pytest.approx(100e-6)
    assert union_seconds([(0, 10), (20, 30)], (40, 50)) == 0.0


def test_communication_between_two_wall_clock_times():
    assert origin_micros(EVENTS) == ORIGIN
    start = ORIGIN / 1e6
    # negotiation [100,150] u [120,170] + [1000,1010]; processing [160,300] u [200,400] + [1010,1050]
    assert communication_seconds(EVENTS, start, start + 0.01) == pytest.approx(
        {"negotiation": 80e-6, "processing": 280e-6}, abs=2e-6)
    # a window after the allreduces holds only the broadcast
    assert communication_seconds(EVENTS, start + 900e-6, start + 0.01) == pytest.approx(
        {"negotiation": 10e-6, "processing": 40e-6}, abs=2e-6)
    assert communication_seconds(EVENTS[1:], start, start + 1) == {}  # no origin: nothing to say


def test_a_follower_reads_horovods_file_as_it_grows(tmp_path):
    """Horovod 0.28 writes events back to back and closes the array after each one (`...}]`),
    overwriting the `]` with `,` before the next: a reader sees a complete array, or one whose
    last event is cut short."""
    from training.timeline import Follower

    path = tmp_path / "timeline.json"
    text = "[" + ",".join(json.dumps(e) for e in EVENTS) + "]"
    half = text.index('{"ph": "B", "name": "ALLREDUCE", "ts": 200')
    path.write_text(text[: half + 20])  # the first tensor done, the second's allreduce being written
    follower = Follower(str(path))
    start = ORIGIN / 1e6
    # complete so far: the two negotiations [100,150] u [120,170]; no allreduce has ended yet
    assert follower.seconds(start, start + 0.01) == pytest.approx({"allreduce": 0.0, "negotiation": 70e-6},
                                                                   abs=2e-6)
    path.write_text(text)  # the rest, and the closing bracket
    # [160,400] and [1010,1050] moving bytes; negotiation [100,160] and [1000,1010], not the
    # 160-170 it shares with the first tensor's allreduce
    assert follower.seconds(start, start + 0.01) == pytest.approx({"allreduce": 280e-6, "negotiation": 70e-6},
                                                                   abs=2e-6)
    assert follower.offset == len(text) - 1  # up to the last complete event; the bracket is read again
    assert Follower(str(tmp_path / "none.json")).seconds(start, start + 1) == {}
