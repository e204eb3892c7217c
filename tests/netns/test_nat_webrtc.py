"""A host behind NAT serves the swarm over WebRTC (see conftest.py for the topology).

The bootstrap node (DHT seed + signalling relay), the client and, where used, coturn run in
`pub`; the NAT'd `swarm-host` runs in `home` and can only open connections outwards. Each test
first shows that pub cannot reach home directly (a TCP connect through the router fails while
the same listener answers from the router itself), then that greedy generation through the
swarm equals transformers' `generate` on the same tiny random Llama:

1. ICE alone: home's connectivity checks open a mapping in the NAT, and the client answers
   the peer-reflexive candidate it learns from them (the router's public address).
2. TURN only: both ends take relay candidates from coturn in pub, and the router forwards
   home's UDP to the TURN and DHT ports alone, so no direct path exists.

Run by `make test-netns` (root; installs iptables and coturn first).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from stamen.conformance.adapters import VARIANTS, Reference
from tests.integration.conftest import ManagedProcess
from tests.netns.conftest import (
    DHT_PORT,
    HOME_IP,
    PUB_IP,
    ROUTER_WAN_IP,
    SIGNALING_PORT,
    TURN_PORT,
    NatTopology,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

NEW_TOKENS = 10
NUM_BLOCKS = 3  # the tiny Llama's layers
START_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 90.0
PROBE_PORT = 5000
TURN_USER, TURN_PASSWORD, TURN_REALM = "stamen", "netns-test-secret", "stamen.test"

_BOOTSTRAP_READY = re.compile(r"swarm-bootstrap ready: dht=(\S+) signaling=(\S+)")
_HOST_READY = re.compile(r"serving blocks \[(\d+), (\d+)\) of (\S+) as (\S+) at (.+)$", re.M)
_TURN_READY = re.compile(r"Total (?:UDP|General) servers|listener opened on|IPv4\. UDP listener")


@dataclass(frozen=True)
class TinyLlama:
    checkpoint: Path
    input_ids: torch.Tensor  # (1, T)
    expected: torch.Tensor  # (1, T + NEW_TOKENS): transformers' greedy continuation


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLlama:
    # This variant and seed continue with ten distinct tokens; many tiny random models
    # repeat one token forever, which a broken swarm could match by luck.
    reference = Reference.build(VARIANTS["llama-mha-untied"](), seed=2)
    assert reference.num_blocks == NUM_BLOCKS
    checkpoint = tmp_path_factory.mktemp("netns") / "tiny-llama"
    reference.model.save_pretrained(checkpoint, safe_serialization=True)
    input_ids = torch.randint(
        0, reference.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5)
    )
    with torch.inference_mode():
        expected = reference.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    assert len(set(expected[0, input_ids.shape[1] :].tolist())) >= NEW_TOKENS // 2
    return TinyLlama(checkpoint, input_ids, expected)


# -- processes in the namespaces -------------------------------------------------------


def start_bootstrap(topology: NatTopology) -> ManagedProcess:
    process = topology.spawn_python(
        topology.pub,
        "bootstrap",
        "stamen.swarm_core.bootstrap_cli",
        "--listen",
        f"{PUB_IP}:{DHT_PORT}",
        "--signaling-listen",
        f"{PUB_IP}:{SIGNALING_PORT}",
    )
    process.wait_for(_BOOTSTRAP_READY, timeout_s=START_TIMEOUT_S)
    return process


def start_host(
    topology: NatTopology, namespace: str, name: str, checkpoint: Path, *args: str
) -> ManagedProcess:
    """A `swarm-host` in `namespace`, DHT in client mode, joined to the bootstrap node."""
    return topology.spawn_python(
        namespace,
        name,
        "stamen.swarm_core.host.cli",
        str(checkpoint),
        "--initial-peers",
        f"{PUB_IP}:{DHT_PORT}",
        "--dht-listen",
        "0.0.0.0:0",
        "--dht-client",
        "--announce-interval-s",
        "2",
        *args,
    )


def served_address(host: ManagedProcess) -> str:
    return host.wait_for(_HOST_READY, timeout_s=START_TIMEOUT_S).group(5).strip()


def run_client(topology: NatTopology, model: TinyLlama, *args: str) -> dict[str, Any]:
    """Generate through the swarm from a client process in pub; its JSON report."""
    client = topology.spawn_python(
        topology.pub,
        "client",
        "tests.netns.swarm_client",
        str(model.checkpoint),
        "--initial-peers",
        f"{PUB_IP}:{DHT_PORT}",
        "--input-ids",
        ",".join(str(t) for t in model.input_ids[0].tolist()),
        "--max-new-tokens",
        str(NEW_TOKENS),
        *args,
    )
    code = client.popen.wait(CLIENT_TIMEOUT_S)
    log = client.log()
    reports = [line for line in log.splitlines() if line.startswith('{"tokens"')]
    assert code == 0 and reports, f"client exited {code}:\n{topology.tails()}"
    return json.loads(reports[-1])


def assert_home_unreachable_from_pub(topology: NatTopology) -> None:
    """A TCP listener in home answers the router (same side of the NAT) but not pub."""
    listener = topology.spawn(
        topology.home,
        "probe-listener",
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            f"s = socket.create_server(('0.0.0.0', {PROBE_PORT}))\n"
            "while True: s.accept()[0].close()",
        ],
    )
    connect = (
        "import socket, sys\n"
        "for _ in range(20):\n"
        "    try:\n"
        f"        socket.create_connection(('{HOME_IP}', {PROBE_PORT}), timeout=2).close()\n"
        "        sys.exit(0)\n"
        "    except ConnectionRefusedError:\n"  # not listening yet
        "        __import__('time').sleep(0.2)\n"
        "    except OSError as e:\n"
        "        print(e); sys.exit(3)\n"
        "sys.exit(4)"
    )
    try:
        from_router = topology.try_run(topology.nat, sys.executable, "-c", connect)
        assert from_router.returncode == 0, f"probe listener in home is down: {from_router}"
        from_pub = topology.try_run(topology.pub, sys.executable, "-c", connect)
        assert from_pub.returncode == 3, f"pub reached home directly: {from_pub}"
    finally:
        listener.kill()


# -- tests ---------------------------------------------------------------------------


def test_host_behind_nat_serves_over_webrtc_and_generation_equals_transformers(
    nat_topology: NatTopology, tiny_llama: TinyLlama
) -> None:
    start_bootstrap(nat_topology)
    home = start_host(
        nat_topology,
        nat_topology.home,
        "home-host",
        tiny_llama.checkpoint,
        "--blocks",
        f"0:{NUM_BLOCKS - 1}",
        "--transport",
        "webrtc",
        "--listen",
        f"webrtc://{PUB_IP}:{SIGNALING_PORT}",
    )
    public = start_host(
        nat_topology,
        nat_topology.pub,
        "pub-host",
        tiny_llama.checkpoint,
        "--blocks",
        f"{NUM_BLOCKS - 1}:{NUM_BLOCKS}",
        "--listen",
        f"tcp://{PUB_IP}:0",
    )
    home_address, public_address = served_address(home), served_address(public)
    assert home_address.startswith(f"webrtc://{PUB_IP}:{SIGNALING_PORT}/")
    assert public_address.startswith(f"tcp://{PUB_IP}:")
    assert_home_unreachable_from_pub(nat_topology)

    report = run_client(nat_topology, tiny_llama)

    assert report["tokens"] == tiny_llama.expected[0].tolist()
    hops = {hop["addresses"][0].partition("://")[0]: hop for hop in report["hops"]}
    assert set(hops) == {"webrtc", "tcp"}, report
    # The client reached home at the router's public address (a NAT mapping that home's
    # own connectivity checks opened), never at home's private one.
    ice = hops["webrtc"]["ice"]
    assert ice["remote_addr"].partition(":")[0] == ROUTER_WAN_IP, report
    assert ice["remote"] == "prflx", report


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn is not installed")
def test_host_behind_nat_serves_through_turn_only(
    nat_topology: NatTopology, tiny_llama: TinyLlama
) -> None:
    turn = nat_topology.spawn(
        nat_topology.pub,
        "coturn",
        [
            "turnserver",
            "-n",  # no configuration file
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--listening-ip",
            PUB_IP,
            "--relay-ip",
            PUB_IP,
            "--listening-port",
            str(TURN_PORT),
            "--min-port",
            "49152",
            "--max-port",
            "49352",
            "--lt-cred-mech",
            "--fingerprint",
            "--user",
            f"{TURN_USER}:{TURN_PASSWORD}",
            "--realm",
            TURN_REALM,
            "--log-file",
            "stdout",
            "--simple-log",
            "--pidfile",
            str(nat_topology.log_dir / "turnserver.pid"),
        ],
    )
    turn.wait_for(_TURN_READY, timeout_s=START_TIMEOUT_S)
    nat_topology.allow_home_udp_only_to(TURN_PORT, DHT_PORT)
    turn_url = f"turn:{PUB_IP}:{TURN_PORT}"
    start_bootstrap(nat_topology)
    home = start_host(
        nat_topology,
        nat_topology.home,
        "home-host",
        tiny_llama.checkpoint,
        "--transport",
        "webrtc",
        "--listen",
        f"webrtc://{PUB_IP}:{SIGNALING_PORT}",
        "--ice-server",
        turn_url,
        "--ice-username",
        TURN_USER,
        "--ice-credential",
        TURN_PASSWORD,
        "--ice-relay-only",
    )
    served_address(home)
    assert_home_unreachable_from_pub(nat_topology)

    report = run_client(
        nat_topology,
        tiny_llama,
        "--turn",
        turn_url,
        "--turn-user",
        TURN_USER,
        "--turn-password",
        TURN_PASSWORD,
        "--relay-only",
    )

    assert report["tokens"] == tiny_llama.expected[0].tolist()
    (hop,) = report["hops"]
    assert hop["addresses"][0].startswith("webrtc://"), report
    # Both ends' candidates are coturn's relay addresses: the path runs through TURN.
    assert hop["ice"]["local"] == "relay" and hop["ice"]["remote"] == "relay", report
    assert hop["ice"]["remote_addr"].partition(":")[0] == PUB_IP, report
