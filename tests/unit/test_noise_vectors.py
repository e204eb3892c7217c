"""`stamen.transports.noise` against published test vectors.

The vectors (tests/data/noise/cacophony_xx.json: XX and XXpsk3; snow_xxpsk.json: XX with
PSKs at positions 0 to 3, where an `e` token follows a used PSK; each file's `source`
field says where it comes from) fix both sides' static and ephemeral keys, the prologue and the PSKs; every
handshake message and every transport message after it must match byte for byte, and both
sides must end with the published handshake hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stamen.transports.noise import (
    CIPHERS,
    CipherState,
    HandshakeState,
    NoiseError,
    Protocol,
    public_bytes,
)

VECTORS_DIR = Path(__file__).parent.parent / "data" / "noise"
VECTORS: list[dict[str, Any]] = [
    vector
    for name in ("cacophony_xx.json", "snow_xxpsk.json")
    for vector in json.loads((VECTORS_DIR / name).read_text())["vectors"]
]


def _key(hex_key: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_key))


def _side(vector: dict[str, Any], prefix: str) -> HandshakeState:
    return HandshakeState(
        vector["protocol_name"],
        initiator=prefix == "init",
        prologue=bytes.fromhex(vector[f"{prefix}_prologue"]),
        static_key=_key(vector[f"{prefix}_static"]),
        psks=[bytes.fromhex(psk) for psk in vector.get(f"{prefix}_psks", [])],
        ephemeral_key=_key(vector[f"{prefix}_ephemeral"]),
    )


def test_the_vectors_cover_the_product_protocol() -> None:
    names = {vector["protocol_name"] for vector in VECTORS}
    assert "Noise_XXpsk3_25519_AESGCM_SHA256" in names
    assert "Noise_XX_25519_ChaChaPoly_SHA256" in names
    assert "Noise_XXpsk0+psk1_25519_AESGCM_SHA256" in names  # `e` after a used PSK


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["protocol_name"] for vector in VECTORS])
def test_every_message_matches_the_vector(vector: dict[str, Any]) -> None:
    initiator, responder = _side(vector, "init"), _side(vector, "resp")
    messages = vector["messages"]
    handshake_messages = len(initiator.protocol.messages)
    for index, message in enumerate(messages[:handshake_messages]):
        writer, reader = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        payload = bytes.fromhex(message["payload"])
        ciphertext = writer.write_message(payload)
        assert ciphertext.hex() == message["ciphertext"], f"handshake message {index}"
        assert reader.read_message(ciphertext) == payload
    assert initiator.is_complete and responder.is_complete
    assert initiator.handshake_hash == responder.handshake_hash
    if "handshake_hash" in vector:  # the cacophony entries publish it, snow's do not
        assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert initiator.rs == public_bytes(_key(vector["resp_static"]))
    assert responder.rs == public_bytes(_key(vector["init_static"]))
    # After the handshake, messages keep alternating, starting with the responder.
    sides = {"init": initiator.split(), "resp": responder.split()}
    for index, message in enumerate(messages[handshake_messages:], start=handshake_messages):
        sender, receiver = ("init", "resp") if index % 2 == 0 else ("resp", "init")
        payload = bytes.fromhex(message["payload"])
        ciphertext = sides[sender][0].encrypt_with_ad(b"", payload)
        assert ciphertext.hex() == message["ciphertext"], f"transport message {index}"
        assert sides[receiver][1].decrypt_with_ad(b"", ciphertext) == payload


def test_a_tampered_handshake_message_fails_its_tag() -> None:
    vector = next(v for v in VECTORS if v["protocol_name"].startswith("Noise_XXpsk3_25519_AES"))
    initiator, responder = _side(vector, "init"), _side(vector, "resp")
    responder.read_message(initiator.write_message(b""))
    reply = bytearray(responder.write_message(b""))
    reply[-1] ^= 1
    with pytest.raises(InvalidTag):
        initiator.read_message(bytes(reply))


def test_a_wrong_psk3_passes_message_2_and_fails_message_3() -> None:
    name = "Noise_XXpsk3_25519_AESGCM_SHA256"
    initiator = HandshakeState(
        name, initiator=True, static_key=X25519PrivateKey.generate(), psks=[b"a" * 32]
    )
    responder = HandshakeState(
        name, initiator=False, static_key=X25519PrivateKey.generate(), psks=[b"b" * 32]
    )
    responder.read_message(initiator.write_message(b""))
    # psk3 is mixed in only with message 3; message 2 still verifies ...
    initiator.read_message(responder.write_message(b""))
    with pytest.raises(InvalidTag):  # ... and message 3 does not
        responder.read_message(initiator.write_message(b""))


def test_misuse_is_refused() -> None:
    with pytest.raises(NoiseError):
        Protocol.parse("Noise_XXpsk9_25519_AESGCM_SHA256")
    with pytest.raises(NoiseError):
        Protocol.parse("Noise_IK_448_AESGCM_SHA256")
    state = HandshakeState(
        "Noise_XX_25519_AESGCM_SHA256", initiator=True, static_key=X25519PrivateKey.generate()
    )
    with pytest.raises(NoiseError):
        state.read_message(bytes(32))  # the initiator writes first
    state.write_message(b"")
    with pytest.raises(NoiseError):
        state.read_message(bytes(10))  # too short for the responder's ephemeral key


def test_rekey_follows_the_spec_and_keeps_the_nonce() -> None:
    key = bytes(range(32))
    cipher = CipherState(CIPHERS["AESGCM"], key)
    cipher.encrypt_with_ad(b"", b"x")
    cipher.rekey()
    assert cipher.nonce == 1
    # REKEY(k) = ENCRYPT(k, 2^64-1, "", 32 zero bytes)[:32], computed here independently
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    expected_key = AESGCM(key).encrypt(b"\x00" * 4 + b"\xff" * 8, bytes(32), b"")[:32]
    expected = CipherState(CIPHERS["AESGCM"], expected_key)
    expected.nonce = 1
    assert cipher.encrypt_with_ad(b"ad", b"payload") == expected.encrypt_with_ad(b"ad", b"payload")


def test_the_reserved_nonce_is_never_used() -> None:
    cipher = CipherState(CIPHERS["AESGCM"], bytes(32))
    cipher.nonce = 2**64 - 1
    with pytest.raises(NoiseError):
        cipher.encrypt_with_ad(b"", b"x")
