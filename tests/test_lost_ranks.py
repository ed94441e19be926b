"""The lost-rank watch (training/lost_ranks.py): when Spark fails an attempt of Horovod's stage it
gives the survivors their grace, then unblocks reads on connections to the executors' hosts. The
multi-host test kills a real host; these check the parts without Spark."""

import socket
import threading

import pytest

from training.distributed import HostInterfaces, peer_addresses
from training.lost_ranks import StageWatch, shut_connections_to


def test_the_run_is_lost_only_after_a_failed_attempt_of_its_own_stage_and_the_grace():
    watch = StageWatch(num_proc=2, grace_s=30, ignored=frozenset({3}))
    assert not watch.observe([(3, 2, 5)], now=0)  # a stage that was running before the launch
    assert not watch.observe([(4, 2, 0)], now=1)  # Horovod's stage, healthy
    assert watch.stage_id == 4
    assert not watch.observe([(4, 2, 0), (5, 2, 1)], now=2)  # another stage's failure is not ours
    assert not watch.observe([(4, 2, 1)], now=10)  # lost: the grace starts
    assert not watch.observe([(4, 2, 1)], now=39)
    assert watch.observe([(4, 2, 2)], now=40)
    assert watch.failed_attempts == 2


def test_a_healthy_run_is_never_lost():
    watch = StageWatch(num_proc=2, grace_s=0)
    assert not any(watch.observe([(7, 2, 0)], now=t) for t in range(100))


def test_the_watch_shuts_connections_to_the_executors_hosts_but_not_the_drivers():
    driver = {"lo": ["127.0.0.1"], "eth0": ["198.18.0.10"]}
    w1 = HostInterfaces("198.18.0.21", "w1", {"lo": ["127.0.0.1"], "data0": ["198.18.1.21"]}, "198.18.1.21")
    on_driver = HostInterfaces("198.18.0.10", "d", {"eth0": ["198.18.0.10"]}, "198.18.0.10")
    assert peer_addresses([w1, on_driver], driver) == {"198.18.1.21"}


@pytest.mark.timeout(30)
def test_shutting_a_connection_returns_a_read_blocked_on_a_silent_peer():
    """A peer that accepts and then never answers (a dead host, to the reader) blocks recv
    forever; the shut makes it return. 127.0.0.2: nothing else in this process talks to it."""
    server = socket.create_server(("127.0.0.2", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.recv(1)), daemon=True)
    reader.start()
    reader.join(1)
    assert reader.is_alive()  # blocked: the peer says nothing
    assert shut_connections_to({"127.0.0.2"}) == 1  # our client (the accepted end talks to 127.0.0.1)
    reader.join(5)
    assert not reader.is_alive() and got == [b""]
    for s in (client, peer, server):
        s.close()
