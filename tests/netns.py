"""Hosts on one machine for multi-host tests: each host a Linux network namespace with its own
loopback and its own addresses, joined by bridges in the root namespace. Addresses are in
198.18.0.0/15 (reserved for network benchmarking: neither private nor public), so traffic goes
only to hosts the test made. Everything made is named with one prefix per run and removed by
name and PID on exit, also when the test fails; leftovers of a killed run are removed first.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

PREFIX = "dsn"  # every namespace, bridge and veth this module makes starts with it
NETWORK = "198.18"
ETC_NETNS = Path("/etc/netns")  # per-namespace files `ip netns exec` mounts over /etc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}probe{os.getpid() % 10000}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"`ip` from iproute2 is missing or hangs ({exc})"
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def remove_leftovers() -> None:
    """Namespaces and links of earlier runs that were killed before their clean-up (by name)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            _kill_in(name)
            _ip("netns", "del", name, check=False)
    for etc in ETC_NETNS.glob(f"{PREFIX}*"):
        shutil.rmtree(etc, ignore_errors=True)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            _ip("link", "del", name, check=False)


def _kill_in(namespace: str) -> None:
    for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Host:
    name: str  # the namespace
    addresses: dict[str, str]  # interface inside the namespace -> address
    veths: list[str] = field(default_factory=list)  # root-side ends

    @property
    def address(self) -> str:
        return next(iter(self.addresses.values()))


@dataclass
class VirtualHosts:
    """Bridges `networks` (index -> 198.18.<index>.0/24, the root namespace at .1), hosts on them."""

    networks: Sequence[int] = (0,)
    run_id: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}")
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def bridge(self, network: int) -> str:
        return f"{PREFIX}{self.run_id}b{network}"

    def __enter__(self) -> "VirtualHosts":
        remove_leftovers()
        try:
            for network in self.networks:
                bridge = self.bridge(network)
                _ip("link", "add", bridge, "type", "bridge")
                _ip("addr", "add", f"{NETWORK}.{network}.1/24", "dev", bridge)
                _ip("link", "set", bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, name: str, nics: dict[str, tuple[int, int]], name_resolves_to: str | None = None) -> Host:
        """A host with interfaces `nics`: name inside the host -> (network, last address byte).
        Inside it, the machine's host name resolves to the address of `name_resolves_to` (default:
        the first interface), as a cluster's DNS would, not to Debian's 127.0.1.1: `ip netns exec`
        mounts /etc/netns/<namespace>/hosts over /etc/hosts."""
        namespace = f"{PREFIX}{self.run_id}{name}"
        _ip("netns", "add", namespace)
        host = Host(namespace, {})
        self.hosts[name] = host
        _ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        for i, (inner, (network, last)) in enumerate(nics.items()):
            outer = f"{PREFIX}{self.run_id}{name}{i}"[:15]
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", namespace)
            host.veths.append(outer)
            _ip("link", "set", outer, "master", self.bridge(network))
            _ip("link", "set", outer, "up")
            address = f"{NETWORK}.{network}.{last}"
            _ip("netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", inner)
            _ip("netns", "exec", namespace, "ip", "link", "set", inner, "up")
            host.addresses[inner] = address
        etc = ETC_NETNS / namespace
        etc.mkdir(parents=True, exist_ok=True)
        own = host.addresses[name_resolves_to] if name_resolves_to else host.address
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{own} {socket.gethostname()}\n")
        return host

    def spawn(self, name: str, argv: Sequence[str], **popen: object) -> subprocess.Popen:
        """A process on host `name`, in its own process group; killed on exit."""
        process = subprocess.Popen(["ip", "netns", "exec", self.hosts[name].name, *argv],
                                   start_new_session=True, **popen)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def run(self, name: str, argv: Sequence[str], timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.hosts[name].name, *argv], capture_output=True, text=True,
                              timeout=timeout, env=env)

    def kill_processes(self, name: str) -> None:
        """SIGKILL every process running on host `name` (a host's sudden death)."""
        _kill_in(self.hosts[name].name)

    def link_down(self, name: str) -> None:
        """Take a host off every network (its root-side ends down): peers get no reset, only silence."""
        for veth in self.hosts[name].veths:
            _ip("link", "set", veth, "down")

    def link_up(self, name: str) -> None:
        """Put a host back on its networks (after `link_down`)."""
        for veth in self.hosts[name].veths:
            _ip("link", "set", veth, "up")

    def close(self) -> None:
        """Kill every process started here (by process group, then whatever else runs in the
        namespaces), remove the namespaces and the bridges."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=30)
        for host in self.hosts.values():
            _kill_in(host.name)
            _ip("netns", "del", host.name, check=False)
            shutil.rmtree(ETC_NETNS / host.name, ignore_errors=True)
            for veth in host.veths:
                _ip("link", "del", veth, check=False)
        for network in self.networks:
            _ip("link", "del", self.bridge(network), check=False)
