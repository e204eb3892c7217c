"""Peer identity: key files on disk, peer ids, domain-separated signatures."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stamen.swarm_core.protocol.identity import (
    PEER_ID_CHARS,
    IdentityError,
    load_or_create_identity,
    peer_id_from_public_key,
    peer_id_of,
    read_swarm_key,
    short_peer_id,
    sign,
    verify_signature,
)
from stamen.transports.base import Credentials


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_a_private_key_file_in_a_new_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "identity.pem"
    credentials = load_or_create_identity(path, swarm_key=b"secret")
    assert path.is_file()
    assert _mode(path) == 0o600
    assert _mode(path.parent) & 0o077 == 0
    assert credentials.swarm_key == b"secret"
    assert [p.name for p in path.parent.iterdir()] == ["identity.pem"]  # no temp file left


def test_restart_reuses_the_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    first = load_or_create_identity(path)
    second = load_or_create_identity(path)
    assert first.public_key == second.public_key
    assert peer_id_of(first) == peer_id_of(second)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640])
def test_a_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.pem"
    load_or_create_identity(path)
    path.chmod(mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)


def test_a_corrupt_key_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="corrupt"):
        load_or_create_identity(path)
    assert b"garbage" in path.read_bytes()


def test_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an ed25519 key"):
        load_or_create_identity(path)


def test_peer_ids_are_derived_from_public_keys() -> None:
    a, b = Credentials.generate(), Credentials.generate()
    assert peer_id_of(a) == peer_id_from_public_key(a.public_key)
    assert peer_id_of(a) != peer_id_of(b)
    assert len(peer_id_of(a)) == PEER_ID_CHARS
    assert peer_id_of(a).isalnum() and peer_id_of(a) == peer_id_of(a).lower()
    assert short_peer_id(peer_id_of(a)) in peer_id_of(a)
    assert short_peer_id(peer_id_of(a)) != short_peer_id(peer_id_of(b))
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"too short")


def test_signatures_bind_key_message_and_domain() -> None:
    a, b = Credentials.generate(), Credentials.generate()
    signature = sign(a.private_key, b"hello", domain=b"test/v1")
    assert verify_signature(a.public_key, b"hello", signature, domain=b"test/v1")
    assert not verify_signature(b.public_key, b"hello", signature, domain=b"test/v1")
    assert not verify_signature(a.public_key, b"hellO", signature, domain=b"test/v1")
    assert not verify_signature(a.public_key, b"hello", signature, domain=b"test/v2")
    assert not verify_signature(a.public_key, b"hello", signature[:-1], domain=b"test/v1")
    assert not verify_signature(b"\x00" * 32, b"hello", signature, domain=b"test/v1")


def test_swarm_key_files_read_alike_for_every_command(tmp_path) -> None:
    path = tmp_path / "swarm.key"
    path.write_bytes(b"  our swarm\t\r\n")
    assert read_swarm_key(path) == b"our swarm"
    path.write_bytes(b"\n \n")
    with pytest.raises(IdentityError, match="empty"):
        read_swarm_key(path)
