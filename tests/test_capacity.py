"""The capacity planner's cost model (training/capacity.py) against values computed by hand."""

from __future__ import annotations

import pytest

from training.capacity import (
    Link,
    bytes_per_epoch,
    epoch_s,
    fit_link,
    fusion_threshold_mb,
    parameter_server_s,
    predict,
    recommend_ranks,
    ring_allreduce_s,
    scaling_efficiency,
    step_s,
)

MB = 2**20
LINK = Link(latency_s=1e-4, bytes_per_s=100 * MB)  # 100 us, 100 MB/s


def test_a_ring_allreduce_costs_2_n_minus_1_hops_and_2_n_minus_1_over_n_of_the_bytes():
    assert ring_allreduce_s(1, 40 * MB, LINK) == 0.0
    # N=2: 2 hops of 100 us + 2*1/2 * 40 MB / 100 MB/s = 0.0002 + 0.4
    assert ring_allreduce_s(2, 40 * MB, LINK) == pytest.approx(0.4002)
    # N=4: 6 hops + 2*3/4 * 0.4 s = 0.0006 + 0.6
    assert ring_allreduce_s(4, 40 * MB, LINK) == pytest.approx(0.6006)


def test_a_parameter_server_is_bound_by_the_busier_of_worker_and_server_links():
    # 4 workers, 1 server: the server moves 4 x 40 MB each way: 2 * 1.6 s + 2 latencies
    assert parameter_server_s(4, 1, 40 * MB, LINK) == pytest.approx(3.2002)
    # 4 workers, 4 servers: each server's share equals a worker's 40 MB: 2 * 0.4 s
    assert parameter_server_s(4, 4, 40 * MB, LINK) == pytest.approx(0.8002)
    assert parameter_server_s(4, 8, 40 * MB, LINK) == pytest.approx(0.8002)  # the worker's link bounds it
    assert parameter_server_s(1, 1, 40 * MB, LINK) == 0.0


def test_bytes_per_epoch_are_2_m_n_minus_1_k_for_a_ring_and_2_m_n_k_for_a_parameter_server():
    assert bytes_per_epoch(4, 10, 100) == 2 * 10 * 3 * 100
    assert bytes_per_epoch(4, 10, 100, "ps") == 2 * 10 * 4 * 100
    with pytest.raises(ValueError, match="scheme"):
        bytes_per_epoch(4, 10, 100, "tree")


def test_only_communication_beyond_the_overlappable_compute_adds_to_a_step():
    assert step_s(0.3, 0.05, 0.2) == pytest.approx(0.55)  # no overlap: everything adds up
    assert step_s(0.3, 0.05, 0.2, overlap=0.5) == pytest.approx(0.40)  # 0.15 of the 0.2 s hidden
    assert step_s(0.3, 0.05, 0.1, overlap=0.5) == pytest.approx(0.35)  # all of it hidden
    assert step_s(0.3, 0.0, 0.2, backward_passes_per_step=2) == pytest.approx(0.4)  # half the exchanges
    with pytest.raises(ValueError, match="overlap"):
        step_s(0.3, 0.0, 0.2, overlap=1.5)


def test_epoch_time_rounds_the_steps_up_and_efficiency_is_t1_over_tn():
    assert epoch_s(1000, 64, 2, 0.5) == 8 * 0.5  # ceil(1000 / 128) = 8 steps
    assert scaling_efficiency(0.4, 0.5) == pytest.approx(0.8)


def test_predictions_and_the_recommended_ranks():
    rows = predict([1, 2, 4, 8], compute_s=0.2, input_wait_s=0.0, grad_bytes=20 * MB, link=LINK, rows=64_000,
                   batch_per_rank=64, overlap=0.5)
    by_ranks = {p.ranks: p for p in rows}
    # N=2: comm 0.0002 + 0.2 = 0.2002; 0.1 s hidden: step 0.3002; efficiency 0.2 / 0.3002
    assert by_ranks[2].comm_s == pytest.approx(0.2002)
    assert by_ranks[2].step_s == pytest.approx(0.3002)
    assert by_ranks[2].step_no_overlap_s == pytest.approx(0.4002)
    assert by_ranks[2].efficiency == pytest.approx(0.2 / 0.3002)
    assert by_ranks[2].epoch_s == pytest.approx(500 * 0.3002)  # 64,000 rows / 128 per step
    assert by_ranks[1].efficiency == 1.0
    assert recommend_ranks(rows, 0.6) == 2  # N=4: 0.2 / (0.2 + 0.3006 - 0.1) = 0.4996
    assert recommend_ranks(rows, 0.99) == 1


def test_the_fusion_buffer_holds_all_gradients_but_never_shrinks_below_horovods_default():
    assert fusion_threshold_mb(20 * MB) == 128
    assert fusion_threshold_mb(300.5 * MB) == 301


def test_a_probe_made_by_the_model_gives_its_link_back():
    sizes = [1 * MB, 4 * MB, 16 * MB, 64 * MB]
    for ranks in (2, 4):
        seconds = [ring_allreduce_s(ranks, m, LINK) for m in sizes]
        link = fit_link(ranks, sizes, seconds)
        assert link.latency_s == pytest.approx(LINK.latency_s, rel=1e-6)
        assert link.bytes_per_s == pytest.approx(LINK.bytes_per_s, rel=1e-6)
    with pytest.raises(ValueError, match="distinct sizes"):
        fit_link(2, [MB, MB], [0.1, 0.1])
    with pytest.raises(ValueError, match="does not grow"):
        fit_link(2, [MB, 2 * MB], [0.2, 0.1])


def test_the_planner_reads_compute_off_a_measured_step_by_solving_the_model():
    from training.planner import Measured, PlanSettings, make_plan

    link = Link(0.001, 1e9)
    measured = Measured("run", ranks=2, batch_per_rank=64, steps=10, backward_passes_per_step=1, trained_s=1.0,
                        input_wait_s=0.01, communication_s=0.05)  # 0.1 s per step
    # ring at 2 ranks: 2 x 1 ms + 4 MB / 1 GB/s = 6 ms; no overlap: compute = 100 - 10 - 6 ms
    assert measured.compute_s(4e6, link) == pytest.approx(0.084)
    # half of compute can hide 6 ms entirely: compute is the whole busy time
    assert measured.compute_s(4e6, link, overlap=0.5) == pytest.approx(0.09)
    # 80 MB (82 ms) cannot hide: step = 0.5 c + wait + comm, so c = (90 - 82) / 0.5 ms
    compute = measured.compute_s(80e6, link, overlap=0.5)
    assert compute == pytest.approx(0.016)
    assert step_s(compute, 0.01, ring_allreduce_s(2, 80e6, link), overlap=0.5) == pytest.approx(0.1)
    plan = make_plan(measured, link, 4_000_000, rows=6400, settings=PlanSettings(ranks=[1, 2, 4]))
    assert plan.predicted_trained_s(2, 10) == pytest.approx(1.0)  # the measured configuration, reproduced
    assert plan.fusion_threshold_mb == 128 and plan.backward_passes_per_step == 1


def test_a_ranks_compute_follows_what_was_measured_at_each_number_of_ranks_per_host():
    from training.capacity import Host

    host = Host(hosts=2, crowded=((1, 0.10), (2, 0.14), (4, 0.30)))
    assert [host.ranks_per_host(n) for n in (1, 2, 3, 4, 8)] == [1, 1, 2, 2, 4]
    assert host.compute_s(2, 9.9) == pytest.approx(0.10)  # 1 per host: measured
    assert host.compute_s(6, 9.9) == pytest.approx(0.22)  # 3 per host: halfway between 2 and 4
    assert host.compute_s(16, 9.9) == pytest.approx(0.62)  # 8 per host: the last two points' line
    assert host.measured(8) and not host.measured(16)
    # a crowded point a little under the alone one (noise): more ranks never compute faster than it
    assert Host(crowded=((1, 0.10), (2, 0.09))).compute_s(4, 9.9) == pytest.approx(0.09)
    assert Host(crowded=((2, 0.14),)).compute_s(1, 9.9) == 0.14  # one point: that point
    assert Host().compute_s(64, 0.05) == 0.05  # nothing measured: the default
    rows = predict([1, 2, 4], 0.05, 0.0, 0.0, Link(0.0, 1e9), 6400, 64, 0.0,
                   host=Host(1, ((1, 0.05), (2, 0.08))))
    assert [p.step_s for p in rows] == pytest.approx([0.05, 0.08, 0.14])
    assert [p.efficiency for p in rows] == pytest.approx([1.0, 0.05 / 0.08, 0.05 / 0.14])


def test_a_plan_predicts_from_the_compute_measured_at_each_ranks_per_host():
    from training.planner import Measured, PlanSettings, make_plan

    link = Link(0.0, 1e9)  # 4 MB: 4 ms per allreduce at 2 ranks
    alone = Measured("one", ranks=1, batch_per_rank=64, steps=10, backward_passes_per_step=1, trained_s=0.5,
                     input_wait_s=0.0, communication_s=0.0)  # 50 ms per step
    shared = Measured("two", ranks=2, batch_per_rank=64, steps=10, backward_passes_per_step=1, trained_s=0.9,
                      input_wait_s=0.0, communication_s=0.0)  # 90 ms: 86 ms of compute and the 4 ms allreduce
    plan = make_plan(shared, link, 4_000_000, 6400, PlanSettings(ranks=[1, 2]), hosts=1, calibration=(alone,))
    assert plan.compute_s == pytest.approx(0.05)
    assert plan.predicted_trained_s(1, 10) == pytest.approx(0.5)
    assert plan.predicted_trained_s(2, 10) == pytest.approx(0.9)
    assert plan.predicted_trained_s(2, 10, backward_passes_per_step=2) == pytest.approx(0.88)  # 86 + 4 / 2 ms
    # 4 ranks on one host: past the measured 2, the line through 1 and 2 ranks per host (+36 ms each)
    assert make_plan(shared, link, 4_000_000, 6400, PlanSettings(ranks=[4]), calibration=(alone,),
                     hosts=1).host.compute_s(4, 9.9) == pytest.approx(0.086 + 0.036 * 2)  # 1 host: 4 per host
