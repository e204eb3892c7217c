"""Host records: signing, and every reason a received record is refused."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.swarm_core.protocol.identity import sign
from stamen.swarm_core.protocol.records import (
    MAX_RECORD_BYTES,
    MAX_TTL_S,
    ForgedRecord,
    HostRecord,
    HostState,
    MalformedRecord,
    RecordError,
    RecordExpired,
    RecordTooLarge,
    SignedRecord,
    decode_signed,
    encode_signed,
    new_host_record,
    newest_per_peer,
    restamped,
    sign_record,
    verify_record,
)
from stamen.transports.base import Credentials

NOW_S = 1_800_000_000.0
_DOMAIN = b"stamen/host-record/v1"  # what a forger with the right tools would use
_HOST = Credentials.generate()


@pytest.fixture(scope="module")
def host() -> Credentials:
    return Credentials.generate()


def _record(credentials: Credentials, **changes: object) -> HostRecord:
    record = new_host_record(
        credentials,
        model="bigscience/bloom-560m",
        start_block=4,
        end_block=12,
        addresses=["tcp://127.0.0.1:4000", "webrtc://peer"],
        ttl_s=60.0,
        now_s=NOW_S,
    )
    return msgspec.structs.replace(record, **changes)


def test_a_signed_record_survives_the_wire(host: Credentials) -> None:
    record = _record(
        host,
        throughput_tokens_per_s=123.5,
        free_cache_tokens=8192,
        max_request_tokens=4096,
        dtype="bfloat16",
        quantization="nf4",
        next_hop_pings_s={"pzz": 0.02, "paa": 0.01},
        public_name="lab GPU",
        version="0.1.0",
    )
    received = verify_record(
        decode_signed(encode_signed(sign_record(record, host, now_s=NOW_S))), now_s=NOW_S + 1
    )
    assert received == record
    assert received.max_request_tokens == 4096
    assert received.span == (4, 12)
    assert received.state is HostState.ONLINE


def test_the_encoding_is_canonical(host: Credentials) -> None:
    a = _record(host, next_hop_pings_s={"pb": 1.0, "pa": 2.0})
    b = _record(host, next_hop_pings_s={"pa": 2.0, "pb": 1.0})
    assert sign_record(a, host, now_s=NOW_S).record == sign_record(b, host, now_s=NOW_S).record


def test_a_record_signed_by_another_key_is_refused(host: Credentials) -> None:
    attacker = Credentials.generate()
    genuine = sign_record(_record(host), host, now_s=NOW_S)
    forged_body = msgspec.msgpack.encode(_record(host, state=HostState.OFFLINE))
    forged = SignedRecord(forged_body, sign(attacker.private_key, forged_body, domain=_DOMAIN))
    with pytest.raises(ForgedRecord):
        verify_record(forged, now_s=NOW_S)
    # Someone else's signature over the host's genuine bytes is no better.
    stolen = SignedRecord(genuine.record, forged.signature)
    with pytest.raises(ForgedRecord):
        verify_record(stolen, now_s=NOW_S)


def test_a_record_whose_peer_id_is_not_its_keys_is_refused(host: Credentials) -> None:
    attacker = Credentials.generate()
    impostor = _record(attacker, peer_id=_record(host).peer_id)
    body = msgspec.msgpack.encode(impostor)
    signed = SignedRecord(body, sign(attacker.private_key, body, domain=_DOMAIN))
    with pytest.raises(ForgedRecord, match="does not belong"):
        verify_record(signed, now_s=NOW_S)


def test_signing_with_the_wrong_credentials_fails_early(host: Credentials) -> None:
    with pytest.raises(ForgedRecord):
        sign_record(_record(host), Credentials.generate(), now_s=NOW_S)


def test_tampering_breaks_the_signature(host: Credentials) -> None:
    signed = sign_record(_record(host), host, now_s=NOW_S)
    tampered = signed.record.replace(b"bloom-560m", b"bloom-561m")
    with pytest.raises(ForgedRecord):
        verify_record(SignedRecord(tampered, signed.signature), now_s=NOW_S)


def test_expired_and_overlong_records_are_refused(host: Credentials) -> None:
    signed = sign_record(_record(host), host, now_s=NOW_S)
    with pytest.raises(RecordExpired):
        verify_record(signed, now_s=NOW_S + 60.0)
    forever = restamped(_record(host), ttl_s=MAX_TTL_S * 24, now_s=NOW_S)
    with pytest.raises(RecordExpired):
        sign_record(forever, host, now_s=NOW_S)


@pytest.mark.parametrize(
    "changes",
    [
        {"start_block": 12, "end_block": 12},  # empty span
        {"start_block": 12, "end_block": 4},  # reversed span
        {"start_block": -1},
        {"end_block": 4000},  # longer than any host could serve
        {"model": ""},
        {"model": "m" * 1000},
        {"public_name": "x" * 1000},
        {"addresses": tuple(f"tcp://10.0.0.{i}:1" for i in range(100))},
        {"free_cache_tokens": -5},
        {"max_request_tokens": -1},
        {"issued_at_s": NOW_S + 100.0, "expires_at_s": NOW_S + 50.0},
    ],
)
def test_records_breaking_bounds_are_refused(host: Credentials, changes: dict[str, object]) -> None:
    with pytest.raises(MalformedRecord):
        sign_record(_record(host, **changes), host, now_s=NOW_S)


def test_oversized_records_are_refused(host: Credentials) -> None:
    bulky = _record(
        host,
        addresses=tuple("tcp://" + "a" * 240 + f":{i}" for i in range(8)),
        next_hop_pings_s={"b" * 60 + f"{i:04}": 0.001 for i in range(32)},
    )
    with pytest.raises(RecordTooLarge):
        sign_record(bulky, host, now_s=NOW_S)
    with pytest.raises(RecordTooLarge):
        decode_signed(b"\x00" * (MAX_RECORD_BYTES * 2))


def test_newest_record_per_peer_wins(host: Credentials) -> None:
    other = Credentials.generate()
    old = _record(host)
    new = restamped(msgspec.structs.replace(old, state=HostState.OFFLINE), now_s=NOW_S + 5)
    theirs = _record(other)
    newest = newest_per_peer([new, theirs, old])
    assert newest == {old.peer_id: new, theirs.peer_id: theirs}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_from_the_network_only_raises_record_errors(data: bytes) -> None:
    try:
        verify_record(decode_signed(data), now_s=NOW_S)
    except RecordError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_changed_byte_invalidates_a_signed_record(data: st.DataObject) -> None:
    wire = bytearray(encode_signed(sign_record(_record(_HOST), _HOST, now_s=NOW_S)))
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] = data.draw(st.integers(0, 255).filter(lambda b: b != wire[position]))
    with pytest.raises(RecordError):
        verify_record(decode_signed(bytes(wire)), now_s=NOW_S)
