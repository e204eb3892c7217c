"""`swarm-bootstrap` as a real process on 127.0.0.1: it serves the DHT and stops cleanly."""

from __future__ import annotations

import asyncio
import re
import signal
import stat
import sys
from pathlib import Path

import pytest

from stamen.swarm_core.bootstrap_cli import main, parse_settings
from stamen.swarm_core.protocol.discovery import Discovery, DiscoveryConfig, parse_host_port
from stamen.swarm_core.protocol.records import new_host_record
from stamen.transports.base import Credentials

_READY = re.compile(rb"swarm-bootstrap ready: dht=(\S+) signaling=(\S+) peer_id=(p[a-z2-7]+)")
_START_TIMEOUT_S = 30.0


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stamen.swarm_core.bootstrap_cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_bootstrap_serves_the_dht_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    identity = tmp_path / "keys" / "bootstrap.pem"
    process = await _start(
        "--listen", "127.0.0.1:0", "--identity", str(identity), "--log-level", "WARNING"
    )
    try:
        line = await asyncio.wait_for(process.stdout.readline(), _START_TIMEOUT_S)  # type: ignore[union-attr]
        ready = _READY.search(line)
        assert ready, line
        dht_address = ready.group(1).decode()
        assert stat.S_IMODE(identity.stat().st_mode) == 0o600
        if ready.group(2) != b"off":  # the WebRTC signalling relay listens on TCP
            _, writer = await asyncio.open_connection(*parse_host_port(ready.group(2).decode()))
            writer.close()

        host_key = Credentials.generate()
        config = DiscoveryConfig(rpc_timeout_s=2.0)
        host = Discovery(
            host_key,
            listen_host="127.0.0.1",
            initial_peers=[dht_address],
            client_mode=True,
            config=config,
        )
        reader = Discovery(
            Credentials.generate(),
            listen_host="127.0.0.1",
            initial_peers=[dht_address],
            client_mode=True,
            config=config,
        )
        async with host, reader:
            assert host.neighbors() == [parse_host_port(dht_address)]
            record = new_host_record(
                host_key, model="m", start_block=0, end_block=2, addresses=["tcp://127.0.0.1:9"]
            )
            assert await host.announce(record) == 2  # stored on the bootstrap node
            found = await reader.find_hosts("m", (0, 2))
            assert found == {0: [record], 1: [record]}

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), _START_TIMEOUT_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_bootstrap_refuses_an_identity_file_readable_by_others(tmp_path: Path) -> None:
    identity = tmp_path / "bootstrap.pem"
    identity.write_bytes(b"")
    identity.chmod(0o644)
    process = await _start("--listen", "127.0.0.1:0", "--identity", str(identity))
    _, stderr = await asyncio.wait_for(process.communicate(), _START_TIMEOUT_S)
    assert process.returncode == 1
    assert b"chmod 600" in stderr


def test_help_documents_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--listen", "--identity", "--swarm-key", "--initial-peers", "--no-signaling"):
        assert flag in text


def test_settings_precedence_flag_over_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "swarm.key"
    key_file.write_bytes(b"from-file\n")
    monkeypatch.setenv("STAMEN_SWARM_KEY", "from-env")
    monkeypatch.setenv("STAMEN_LISTEN", "127.0.0.1:4000")
    monkeypatch.setenv("STAMEN_INITIAL_PEERS", "10.0.0.1:1, 10.0.0.2:2")
    assert parse_settings([]).swarm_key == b"from-env"
    assert parse_settings([]).listen == ("127.0.0.1", 4000)
    assert parse_settings([]).initial_peers == ("10.0.0.1:1", "10.0.0.2:2")
    assert parse_settings(["--swarm-key-file", str(key_file)]).swarm_key == b"from-file"
    settings = parse_settings(["--listen", "0.0.0.0:5000", "--no-signaling", "--swarm-key", "flag"])
    assert settings.listen == ("0.0.0.0", 5000)
    assert settings.signaling_listen is None
    assert settings.swarm_key == b"flag"
    with pytest.raises(SystemExit):
        parse_settings(["--listen", "no-port"])
