"""A swarm on an emulated network: the real `swarm-bootstrap` and three `swarm-host`
processes in their namespaces, the probe of the links, and the client driver in the client
namespace. Start-up order: bootstrap, hosts (each waits until it serves its span), probe.

Every process gets `threads` torch threads and OMP_WAIT_POLICY=PASSIVE: the hosts share
this machine's cores, and a host whose OpenMP threads keep spinning after its step slows
the next host down (measured in benchmarks/swarm_speed.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.network.topology import (
    DHT_PORT,
    NUM_HOSTS,
    PROBE_PORT,
    EmulatedNetwork,
    TopologyError,
)

START_TIMEOUT_S = 180.0
DRIVER_TIMEOUT_S = 3600.0
_BOOTSTRAP_READY = r"swarm-bootstrap ready: dht=(\S+)"
_HOST_READY = r"serving blocks \[(\d+), (\d+)\) of (\S+) as (\S+) at (.+)$"


@dataclass(frozen=True)
class LinkMeasurement:
    """What the emulation gives between the client and the first host, through the relay."""

    rtt_s: float
    upload_bit_s: float


def split_blocks(num_blocks: int, num_hosts: int = NUM_HOSTS) -> list[tuple[int, int]]:
    """Contiguous spans as even as possible: 30 over 3 is 10/10/10."""
    if not 0 < num_hosts <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {num_hosts} hosts")
    bounds = [round(i * num_blocks / num_hosts) for i in range(num_hosts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def start_swarm(network: EmulatedNetwork, checkpoint: Path, num_blocks: int, threads: int) -> str:
    """Bootstrap + one host per span; returns the DHT address clients join through."""
    boot = network.spawn_python(
        "boot", "bootstrap", "stamen.swarm_core.bootstrap_cli",
        "--listen", f"{network.address('boot')}:{DHT_PORT}", "--no-signaling",
        env=_env(1),
    )  # fmt: skip
    dht = boot.wait_for(_BOOTSTRAP_READY, START_TIMEOUT_S).group(1)
    hosts = []
    for index, (start, end) in enumerate(split_blocks(num_blocks)):
        hosts.append(
            network.spawn_python(
                f"host{index}", f"host{index}", "stamen.swarm_core.host.cli", str(checkpoint),
                "--blocks", f"{start}:{end}",
                "--listen", f"tcp://{network.host_listen(index)}",
                "--initial-peers", dht,
                "--dht-listen", f"{network.address(f'host{index}')}:0",
                "--announce-interval-s", "5",
                env=_env(threads),
            )
        )  # fmt: skip
    for host in hosts:
        host.wait_for(_HOST_READY, START_TIMEOUT_S)
    return dht


def probe_links(network: EmulatedNetwork, bulk_mb: float) -> LinkMeasurement:
    """Round trip and upload bandwidth from the client to host0's namespace."""
    address = network.address("host0")
    server = network.spawn_python(
        "host0", "probe", "benchmarks.network.probe", "serve",
        "--host", address, "--port", str(PROBE_PORT),
    )  # fmt: skip
    try:
        server.wait_for("probe ready", 30.0)
        result = network.run(
            "client", sys.executable, "-m", "benchmarks.network.probe", "measure",
            "--host", address, "--port", str(PROBE_PORT), "--bulk-mb", str(bulk_mb),
        )  # fmt: skip
    finally:
        server.stop()
        network.processes.remove(server)
    values = json.loads(result.stdout.strip().splitlines()[-1])
    return LinkMeasurement(float(values["rtt_s"]), float(values["upload_bit_s"]))


def run_driver(
    network: EmulatedNetwork, checkpoint: Path, dht: str, args: Sequence[str]
) -> dict[str, Any]:
    """The client driver (benchmarks/network/driver.py) in the client namespace; its
    JSON report."""
    driver = network.spawn_python(
        "client", "driver", "benchmarks.network.driver", str(checkpoint),
        "--initial-peers", dht, *args,
    )  # fmt: skip
    try:
        code = driver.popen.wait(DRIVER_TIMEOUT_S)
    finally:
        driver.stop()
    reports = [line for line in driver.log().splitlines() if line.startswith('{"hidden_size"')]
    if code != 0 or not reports:
        raise TopologyError(f"driver exited {code}:\n{network.tails()}")
    report: dict[str, Any] = json.loads(reports[-1])
    return report
