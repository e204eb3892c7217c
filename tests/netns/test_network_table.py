"""The network table's harness at a small size (benchmarks/network, benchmarks/network_table.py).

One emulated network (100 Mbit/s links, 40 ms round trip added by the relay), the real
bootstrap and three `swarm-host` processes serving SmolLM2's 30 blocks 10/10/10, and the
client driver in its own namespace, with forwarding off and on. The test checks:

1. the emulation itself: a TCP echo between the client and a host namespace takes the
   configured round trip (plus a little), and a bulk upload is capped near the link rate;
2. the table: every figure is produced for both modes, and the rendered table has them;
3. the tokens: greedy decoding through the emulated swarm equals the same blocks run
   locally, in both modes, and forwarding really forwarded (and the other mode did not);
4. clean-up: no namespace survives, also when the body raises half-way.

Run by `make test-netns` (root).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from benchmarks.network.local import LocalModel
from benchmarks.network.topology import (
    NAME_PREFIX,
    NetworkProfile,
    emulated_network,
    unavailable_reason,
)
from benchmarks.network_table import (
    CHECK_IDS,
    Shapes,
    parser,
    render,
    run_network,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

RTT_S = 0.040
RATE_BIT_S = 100e6
PROFILE = NetworkProfile("test", "100 Mbit/s, 40 ms RTT", RATE_BIT_S, RTT_S)
NEW_TOKENS = 4
ARGS = [
    "--prefix-lengths", "16", "--decode-steps", "2", "--batches", "1,2",
    "--forward-tokens", "16", "--rounds", "1", "--check-tokens", str(NEW_TOKENS), "--probe-mb", "4",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _our_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listing.stdout.splitlines() if line.startswith(NAME_PREFIX)]


@pytest.mark.slow  # ~4 minutes on two shared cores: three hosts load and serve SmolLM2
def test_swarm_on_an_emulated_network(tmp_path: Path, smollm2_gguf: Path) -> None:
    args = parser().parse_args(ARGS)
    shapes = Shapes(args.prefix_lengths, args.decode_steps, args.batches, args.forward_tokens)
    local_tokens = LocalModel.load(smollm2_gguf).greedy(CHECK_IDS, NEW_TOKENS)

    result = run_network(PROFILE, smollm2_gguf, args, tmp_path, CHECK_IDS)
    result.local_tokens = local_tokens
    assert not _our_namespaces(), "namespaces survived the run"

    # 1. The emulation: the relay's round trip, nothing slower; the links' rate, no faster.
    assert RTT_S <= result.link.rtt_s < RTT_S + 0.015, result.link
    assert 0.5 * RATE_BIT_S < result.link.upload_bit_s < 1.1 * RATE_BIT_S, result.link

    # 2. Every figure, for both modes, and in the table.
    for mode in ("off", "on"):
        report = result.modes[mode]
        assert report["decode_steps_s"]["16"] > 0
        assert set(report["prefill_tokens_s"]) == {"1", "2"}
        # A decode step cannot beat the round trips on its critical path.
        assert report["decode_steps_s"]["16"] < 1 / (2 * RTT_S)
    assert result.local.decode_s[16] > 0 and set(result.local.prefill_s) == {1, 2}
    table = render([result], shapes, "header")
    assert f"| {PROFILE.label} | on / off |" in table
    assert "n/a" not in table

    # 3. The same tokens as the local run, and each mode took the path it names.
    assert result.modes["off"]["generated"] == local_tokens
    assert result.modes["on"]["generated"] == local_tokens
    assert result.modes["off"]["step_stats"]["forwarded"] == 0
    on = result.modes["on"]["step_stats"]
    assert on["forwarded"] > 0 and on["client_driven"] == on["fallbacks"] == 0, on


def test_namespaces_are_removed_when_the_body_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="half-way"), emulated_network(PROFILE, tmp_path) as net:
        assert net.namespace("router") in _our_namespaces()
        net.spawn("host0", "sleeper", ["sleep", "60"])
        raise RuntimeError("stopped half-way")
    assert not _our_namespaces()
