"""A star of network namespaces around a router, with shaped links and a delay line:

    boot   eth0 10.98.0.2 --veth-- r0 10.98.0.1 \\
    host0  eth0 10.98.1.2 --veth-- r1 10.98.1.1  \\
    host1  eth0 10.98.2.2 --veth-- r2 10.98.2.1   router: forwards between them; TCP to
    host2  eth0 10.98.3.2 --veth-- r3 10.98.3.1  /  ports RELAYED_PORTS is REDIRECTed to
    client eth0 10.98.9.2 --veth-- r9 10.98.9.1 /   the delaying relay (relay.py)

Every link is rate-limited by `tc tbf` at both ends (each direction of each access link),
so host-to-host traffic crosses two shaped links, as over two access lines. When the
profile adds a round trip, the router's relay delays each direction by half of it; the
relay's connection is the one the product's traffic rides, so the hosts and the client run
unchanged. UDP (the DHT) is forwarded, undelayed: discovery is off the measured path.

The `loopback` profile puts every process in one namespace on 127.0.0.1: no emulation,
only isolation (fixed ports cannot collide with anything else on this machine).

Namespace names carry this process's id; `close` (also on failure or Ctrl-C, through
`emulated_network`) stops the processes started here, then deletes the namespaces, which
take their veths, qdiscs and iptables rules with them. A later run deletes what a killed
run left. Needs root, iproute2 and iptables (scripts/setup-netns-deps.sh). Nothing here
sends traffic outside these namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

NAME_PREFIX = "stamen-nb-"
_STALE = re.compile(rf"^{NAME_PREFIX}[a-z0-9]+-(\d+)\b")
COMMAND_TIMEOUT_S = 15.0
REPO_ROOT = Path(__file__).resolve().parents[2]

DHT_PORT = 31337
HOST_BASE_PORT = 31400  # host i listens on HOST_BASE_PORT + i
PROBE_PORT = 31410
RELAYED_PORTS = f"{HOST_BASE_PORT}:{PROBE_PORT}"  # iptables --dport range
RELAY_PORT = 31500
NUM_HOSTS = 3
_LINK_INDEX = {"boot": 0, "host0": 1, "host1": 2, "host2": 3, "client": 9}


class TopologyError(RuntimeError):
    """A command that builds or probes the emulated network failed."""


@dataclass(frozen=True)
class NetworkProfile:
    """One emulated network: a rate for every access link (None: unshaped) and the round
    trip the relay adds between any two peers (0: no relay)."""

    key: str
    label: str
    rate_bit_s: float | None
    rtt_s: float
    loopback: bool = False

    def __post_init__(self) -> None:
        if self.rate_bit_s is not None and self.rate_bit_s <= 0:
            raise ValueError(f"rate must be positive, got {self.rate_bit_s}")
        if self.rtt_s < 0 or (self.loopback and (self.rate_bit_s or self.rtt_s)):
            raise ValueError("rtt must be >= 0, and loopback has no shaping")


PROFILES = {
    p.key: p
    for p in (
        NetworkProfile("1g", "1 Gbit/s, < 5 ms", 1e9, 0.0),
        NetworkProfile("100m", "100 Mbit/s, < 5 ms", 100e6, 0.0),
        NetworkProfile("100m-100ms", "100 Mbit/s, 100 ms RTT", 100e6, 0.100),
        NetworkProfile("loopback", "loopback (no emulation)", None, 0.0, loopback=True),
    )
}


def command(*argv: str, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise TopologyError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why this machine cannot build the namespaces, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed ({package}); run scripts/setup-netns-deps.sh"
    try:
        command("ip", "netns", "list")
    except (TopologyError, OSError) as exc:
        return f"`ip netns` is unavailable: {exc}"
    return None


def delete_namespace(name: str) -> None:
    """Kill what still runs in `name` (children that outlived us), then delete it."""
    pids = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def delete_stale_namespaces() -> None:
    """Namespaces of earlier runs whose process is gone (killed before cleaning up)."""
    for line in command("ip", "netns", "list").stdout.splitlines():
        match = _STALE.match(line)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            delete_namespace(line.split()[0])


@dataclass
class Process:
    """A process started in a namespace, its output in `log_path`."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first match of `pattern` in the log; raises if the process exits first or
        the time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.log(), re.M):
                return match
            if self.popen.poll() is not None:
                raise TopologyError(f"{self.name} exited {self.popen.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise TopologyError(f"{self.name}: no {pattern!r} in {timeout_s:.0f} s:\n{self.tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class EmulatedNetwork:
    """The namespaces of one profile, and the processes started in them."""

    profile: NetworkProfile
    log_dir: Path
    processes: list[Process] = field(default_factory=list)
    _namespaces: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        suffix = os.getpid()
        if self.profile.loopback:
            one = f"{NAME_PREFIX}loop-{suffix}"
            self._namespaces = {role: one for role in (*_LINK_INDEX, "router")}
        else:
            roles = (*_LINK_INDEX, "router")
            self._namespaces = {role: f"{NAME_PREFIX}{role}-{suffix}" for role in roles}

    # -- addresses ----------------------------------------------------------------------

    def namespace(self, role: str) -> str:
        """`boot`, `host0`..`host2`, `client` or `router`."""
        return self._namespaces[role]

    def address(self, role: str) -> str:
        if self.profile.loopback:
            return "127.0.0.1"
        return f"10.98.{_LINK_INDEX[role]}.2"

    def host_listen(self, index: int) -> str:
        return f"{self.address(f'host{index}')}:{HOST_BASE_PORT + index}"

    # -- building -----------------------------------------------------------------------

    def build(self) -> None:
        """1. namespaces, 2. a veth from the router into each, 3. addresses and routes,
        4. tbf at both ends of each veth, 5. the redirect into the relay, and the relay."""
        for namespace in sorted(set(self._namespaces.values())):
            command("ip", "netns", "add", namespace)
            command("ip", "-n", namespace, "link", "set", "lo", "up")
        if self.profile.loopback:
            return
        router = self.namespace("router")
        for role, index in _LINK_INDEX.items():
            inside, outside = self.namespace(role), f"r{index}"
            # Created inside the namespaces: no interface ever appears in the root one.
            command("ip", "-n", router, "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", inside)  # fmt: skip
            for namespace, device, address in (
                (router, outside, f"10.98.{index}.1"),
                (inside, "eth0", f"10.98.{index}.2"),
            ):
                command("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
                command("ip", "-n", namespace, "link", "set", device, "up")
                self._shape(namespace, device)
            command("ip", "-n", inside, "route", "add", "default", "via", f"10.98.{index}.1")
        self.run("router", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        if self.profile.rtt_s > 0:
            self.run("router", "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", RELAYED_PORTS, "-j", "REDIRECT", "--to-ports", str(RELAY_PORT))  # fmt: skip
            relay = self.spawn_python(
                "router", "relay", "benchmarks.network.relay",
                "--listen", f"0.0.0.0:{RELAY_PORT}",
                "--one-way-delay-ms", str(self.profile.rtt_s * 1000 / 2),
            )  # fmt: skip
            relay.wait_for(r"relay ready", timeout_s=30.0)

    def _shape(self, namespace: str, device: str) -> None:
        rate = self.profile.rate_bit_s
        if rate is None:
            return
        # A burst of ~2 ms at the rate (at least 64 KiB, one GSO packet) keeps tbf exact
        # at a 250 Hz tick without dropping large segments; 50 ms of queue before drops.
        burst = max(64 * 1024, int(rate / 8 * 0.002))
        command("ip", "netns", "exec", namespace, "tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "latency", "50ms")  # fmt: skip

    # -- processes ----------------------------------------------------------------------

    def run(self, role: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `role`'s namespace; raises `TopologyError` on failure."""
        return command("ip", "netns", "exec", self.namespace(role), *argv)

    def spawn(
        self, role: str, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> Process:
        """Start `argv` in `role`'s namespace, output to `<log_dir>/<name>.log`."""
        log_path = self.log_dir / f"{name}.log"
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace(role), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=REPO_ROOT,  # `-m benchmarks.network...`
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def spawn_python(
        self, role: str, name: str, module: str, *args: str, env: dict[str, str] | None = None
    ) -> Process:
        return self.spawn(role, name, [sys.executable, "-m", module, *args], env)

    def tails(self) -> str:
        return "\n\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.processes)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        for namespace in sorted(set(self._namespaces.values())):
            delete_namespace(namespace)

    def leftover_namespaces(self) -> set[str]:
        return set(self._namespaces.values()) & set(command("ip", "netns", "list").stdout.split())


@contextmanager
def emulated_network(profile: NetworkProfile, log_dir: Path) -> Iterator[EmulatedNetwork]:
    """Build `profile`'s namespaces; always torn down, also when the build stops half-way."""
    reason = unavailable_reason()
    if reason is not None:
        raise TopologyError(reason)
    delete_stale_namespaces()
    network = EmulatedNetwork(profile, log_dir)
    try:
        network.build()
        yield network
    finally:
        network.close()
