"""The multi-host test bed itself (tests/netns.py): hosts with their own addresses and loopback,
two networks with differently named interfaces, a host's link taken down, and nothing left behind
(namespaces, links, processes), also when the test body fails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import netns

WHY_NOT = netns.unavailable()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")]

SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 7707))
server.listen()
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    conn.sendall(("hello from " + sys.argv[1] + " to " + peer[0]).encode())
    conn.close()
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 7707), timeout=float(sys.argv[2])) as conn:
        print(conn.recv(200).decode())
except OSError as exc:
    print("unreachable", type(exc).__name__)
"""


def leftovers() -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [n for n in names.split() if n.startswith(netns.PREFIX)] + \
        [line.split(":")[1].strip() for line in links.splitlines() if line.split(":")[1].strip().startswith(netns.PREFIX)]


def test_hosts_reach_each_other_over_their_own_interfaces_and_nothing_is_left():
    with netns.VirtualHosts(networks=(10, 11)) as hosts:
        a = hosts.add("a", {"eth0": (10, 2), "data0": (11, 2)})  # a management and a data network
        b = hosts.add("b", {"ens1": (10, 3), "ens2": (11, 3)})  # the same networks, other interface names
        server = hosts.spawn("a", [sys.executable, "-c", SERVER, a.addresses["data0"]], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        hosts.spawn("a", [sys.executable, "-c", SERVER, "127.0.0.1"])
        got = hosts.run("b", [sys.executable, "-c", CLIENT, a.addresses["data0"], "5"]).stdout.strip()
        assert got == f"hello from {a.addresses['data0']} to {b.addresses['ens2']}"  # from b's own data address
        # b's loopback is its own: a's server on a's 127.0.0.1 is not there
        assert hosts.run("b", [sys.executable, "-c", CLIENT, "127.0.0.1", "2"]).stdout.startswith("unreachable")
        interfaces = hosts.run("a", ["ip", "-o", "addr", "show"]).stdout
        assert "eth0" in interfaces and "data0" in interfaces and "198.18.11.2" in interfaces

        hosts.link_down("a")  # silence, not a reset: the client times out
        assert hosts.run("b", [sys.executable, "-c", CLIENT, a.addresses["data0"], "2"]).stdout.strip() == \
            "unreachable TimeoutError"
        pids = [p.pid for p in hosts.processes]
    assert leftovers() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_everything_is_removed_when_the_test_body_fails():
    with pytest.raises(RuntimeError, match="the test failed"):
        with netns.VirtualHosts(networks=(12,)) as hosts:
            hosts.add("c", {"eth0": (12, 2)})
            hosts.spawn("c", [sys.executable, "-c", "import time; time.sleep(600)"])
            raise RuntimeError("the test failed")
    assert leftovers() == []


def test_leftovers_of_a_killed_run_are_removed_by_name():
    subprocess.run(["ip", "netns", "add", f"{netns.PREFIX}stale1"], check=True)
    subprocess.run(["ip", "link", "add", f"{netns.PREFIX}stale1b", "type", "bridge"], check=True)
    with netns.VirtualHosts(networks=(13,)):
        assert not [n for n in leftovers() if "stale" in n]
    assert leftovers() == []
