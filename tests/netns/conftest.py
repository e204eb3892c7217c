"""A home network behind NAT, built from Linux network namespaces, for the netns tests.

    pub  (the "internet")        nat (the home router)              home (a NAT'd host)
    eth0 10.99.1.1  <--veth-->   wan 10.99.1.2 | lan 10.99.2.1  <--veth-->  eth0 10.99.2.2
                                 MASQUERADE out of wan; FORWARD lan->wan, and wan->lan only
                                 for connections that home opened

`pub` routes 10.99.2.0/24 to the router, so a packet from pub to home reaches the NAT and is
dropped there, as an unsolicited packet would be. Everything the tests start runs in one of
these namespaces (`ip netns exec`), so the addresses and fixed ports below touch nothing
outside them; nothing here ever sends traffic off this machine.

The `nat_topology` fixture builds the namespaces, veths and rules, and always tears them down
(processes it started first, then the namespaces, which take their veths with them), even when
the test fails or the build stops half-way. Namespace names carry the pytest process id, so
two runs never collide, and a later run deletes what a killed run left behind.

Needs root, `ip netns` and `iptables` (scripts/setup-netns-deps.sh installs it); without them
every netns test skips with the reason. This module knows namespaces and processes, not what
runs in them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from benchmarks.network.topology import TopologyError
from benchmarks.network.topology import command as _command
from benchmarks.network.topology import delete_namespace as _delete_namespace

from tests.integration.conftest import LOG_TAIL_LINES, ManagedProcess

logger = logging.getLogger(__name__)

PUB_IP = "10.99.1.1"
ROUTER_WAN_IP = "10.99.1.2"
ROUTER_LAN_IP = "10.99.2.1"
HOME_IP = "10.99.2.2"
HOME_SUBNET = "10.99.2.0/24"

DHT_PORT = 31337  # fixed ports: nothing else lives in these namespaces
SIGNALING_PORT = 31338
TURN_PORT = 3478

_NAME_PREFIX = "stamen-nt-"
_STALE = re.compile(rf"^{_NAME_PREFIX}(pub|nat|home)-(\d+)\b")
COMMAND_TIMEOUT_S = 15.0


_active: list[NatTopology] = []  # built and not yet torn down, for failure reports


def netns_unavailable_reason() -> str | None:
    """Why this machine cannot build the topology, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if shutil.which("iptables") is None:
        return "`iptables` is not installed; run scripts/setup-netns-deps.sh (make test-netns)"
    try:
        _command("ip", "netns", "list")
    except (TopologyError, OSError) as exc:
        return f"`ip netns` is unavailable: {exc}"
    return None


def _delete_stale_namespaces() -> None:
    """Namespaces of earlier runs whose pytest process is gone (killed before teardown)."""
    for line in _command("ip", "netns", "list").stdout.splitlines():
        match = _STALE.match(line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _delete_namespace(line.split()[0])


@dataclass
class NatTopology:
    """The three namespaces, and the processes started in them."""

    log_dir: Path
    pub: str = ""
    nat: str = ""
    home: str = ""
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        suffix = os.getpid()
        self.pub, self.nat, self.home = (
            f"{_NAME_PREFIX}{r}-{suffix}" for r in ("pub", "nat", "home")
        )

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.pub, self.nat, self.home

    def run(self, namespace: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `namespace`; raises `TopologyError` on a non-zero exit."""
        return _command("ip", "netns", "exec", namespace, *argv)

    def try_run(
        self, namespace: str, *argv: str, timeout_s: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `namespace`, whatever its exit code."""
        return subprocess.run(
            ["ip", "netns", "exec", namespace, *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def spawn(self, namespace: str, name: str, argv: list[str]) -> ManagedProcess:
        """Start `argv` inside `namespace`, stdout and stderr to `<log_dir>/<name>.log`.
        `ip netns exec` execs `argv` in place, so the Popen is the process itself."""
        log_path = self.log_dir / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=Path(__file__).resolve().parents[2],  # the repo root: `-m tests.netns...`
            )
        process = ManagedProcess(name=name, popen=popen, log_path=log_path)
        self.processes.append(process)
        return process

    def spawn_python(self, namespace: str, name: str, module: str, *args: str) -> ManagedProcess:
        return self.spawn(namespace, name, [sys.executable, "-m", module, *args])

    def build(self) -> None:
        """1. namespaces, 2. veths straight into them, 3. addresses and routes,
        4. the router's forwarding and NAT rules."""
        pub, nat, home = self.namespaces
        for namespace in self.namespaces:
            _command("ip", "netns", "add", namespace)
            _command("ip", "-n", namespace, "link", "set", "lo", "up")
        # Created inside the namespaces, so no interface ever appears in the root one.
        _command(
            "ip",
            "-n",
            nat,
            "link",
            "add",
            "wan",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pub,
        )
        _command(
            "ip",
            "-n",
            nat,
            "link",
            "add",
            "lan",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            home,
        )
        for namespace, device, address in (
            (pub, "eth0", PUB_IP),
            (nat, "wan", ROUTER_WAN_IP),
            (nat, "lan", ROUTER_LAN_IP),
            (home, "eth0", HOME_IP),
        ):
            _command("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _command("ip", "-n", namespace, "link", "set", device, "up")
        _command("ip", "-n", home, "route", "add", "default", "via", ROUTER_LAN_IP)
        _command("ip", "-n", pub, "route", "add", HOME_SUBNET, "via", ROUTER_WAN_IP)
        self.run(nat, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for rule in (
            ("-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"),
            ("-P", "FORWARD", "DROP"),
            ("-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"),
            ("-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"),
        ):  # fmt: skip
            self.run(nat, "iptables", *rule)

    def allow_home_udp_only_to(self, *ports: int) -> None:
        """From here on the router forwards home's UDP to these pub ports only (and their
        replies): no direct UDP path between home and pub peers, so WebRTC must relay."""
        for port in ports:
            self.run(self.nat, "iptables", "-I", "FORWARD", "1", "-i", "lan", "-o", "wan", "-p", "udp", "-d", PUB_IP, "--dport", str(port), "-j", "ACCEPT")  # fmt: skip
        self.run(self.nat, "iptables", "-I", "FORWARD", str(len(ports) + 1), "-i", "lan", "-o", "wan", "-p", "udp", "-j", "DROP")  # fmt: skip

    def forwarded_packets(self) -> str:
        """The router's FORWARD chain with counters, for failure reports."""
        return self.try_run(self.nat, "iptables", "-L", "FORWARD", "-v", "-n").stdout

    def tails(self) -> str:
        return "\n\n".join(f"--- {p.name} ---\n{p.tail(LOG_TAIL_LINES)}" for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            if process.alive:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.popen.wait(10.0)
            except subprocess.TimeoutExpired:
                process.kill()
        for namespace in self.namespaces:
            _delete_namespace(namespace)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for topology in _active:
            report.sections.append(("netns process logs (tails)", topology.tails()))
            report.sections.append(("router FORWARD counters", topology.forwarded_packets()))


@pytest.fixture
def nat_topology(tmp_path: Path) -> Iterator[NatTopology]:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    _delete_stale_namespaces()
    topology = NatTopology(tmp_path)
    _active.append(topology)
    try:
        topology.build()
        yield topology
    finally:
        _active.remove(topology)
        topology.close()
    leftover = set(topology.namespaces) & set(_command("ip", "netns", "list").stdout.split())
    assert not leftover, f"namespaces survived teardown: {leftover}"
