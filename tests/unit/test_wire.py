"""The wire format: round trips, codecs' accuracy, zero-copy paths, and refusal of every
malformed header before anything is allocated."""

from __future__ import annotations

import msgspec
import pytest
import torch

from stamen.swarm_core.protocol.codecs import Codec, decode_tensor, encode_tensor
from stamen.swarm_core.protocol.errors import ErrorCode
from stamen.swarm_core.protocol.wire import (
    PROTOCOL_VERSION,
    ErrorReply,
    Forward,
    Hello,
    HelloReply,
    InfoReply,
    LimitExceeded,
    MalformedMessage,
    OpenSession,
    SessionId,
    SessionOpened,
    Step,
    StepResult,
    UnknownMessageType,
    VersionMismatch,
    WireLimits,
    check_compatible,
    decode_message,
    encode_message,
)

SID = SessionId("session-1")


def _header(message: dict, tensors: list[dict]) -> bytes:
    return msgspec.msgpack.encode({"message": message, "tensors": tensors})


def _step_header(meta: dict) -> bytes:
    message = {"type": "step", "session_id": "s", "start_position": 0}
    return _header(message, [{"name": "hidden", "codec": "none", **meta}])


def _roundtrip(message, tensors=None, **kwargs):
    frames = encode_message(message, tensors, **kwargs)
    # What a transport delivers: plain bytes, no longer tied to the sender's tensors.
    return decode_message([bytes(frame) for frame in frames])


def test_messages_without_tensors_round_trip():
    messages = [
        Hello.local("alice", capabilities=["push"]),
        HelloReply.local("bob"),
        OpenSession(block_start=2, block_end=5, max_length=128, batch_size=2),
        InfoReply(model="m", block_start=0, block_end=4, state="online", torch_dtype="bf16"),
        ErrorReply(code=ErrorCode.BUSY, message="no cache", retry_after_s=1.5),
        ErrorReply(code=ErrorCode.TOO_LARGE, message="over max_request_tokens"),
    ]
    for message in messages:
        decoded = _roundtrip(message)
        assert decoded.message == message
        assert type(decoded.message) is type(message)
        assert decoded.tensors == {}


def test_step_round_trip_keeps_named_tensors_exactly():
    hidden = torch.randn(2, 3, 16)
    prompts = torch.randn(4, 2, 5, 16, dtype=torch.bfloat16)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    message = Step(session_id=SID, start_position=7)
    decoded = _roundtrip(message, {"hidden": hidden, "prompts": prompts, "padding_mask": mask})
    assert decoded.message == message
    assert torch.equal(decoded.tensors["hidden"], hidden)
    assert torch.equal(decoded.tensors["prompts"], prompts)
    assert torch.equal(decoded.tensors["padding_mask"], mask)
    assert decoded.tensors["prompts"].dtype is torch.bfloat16


@pytest.mark.parametrize(
    ("codec", "max_relative_error"),
    [(Codec.FLOAT16, 1e-3), (Codec.BFLOAT16, 6e-3), (Codec.INT8_BLOCK64, 1e-2)],
)
def test_lossy_codecs_restore_dtype_within_their_error(codec, max_relative_error):
    hidden = torch.randn(2, 7, 96)  # 1344 values: the last int8 block is partial
    decoded = _roundtrip(Forward(block_start=0, block_end=1), {"hidden": hidden}, codec=codec)
    out = decoded.tensors["hidden"]
    assert out.dtype is torch.float32 and out.shape == hidden.shape
    error = (out - hidden).norm() / hidden.norm()
    assert 0 < error < max_relative_error


def test_lossy_codecs_shrink_frames():
    hidden = torch.randn(1, 64, 256)
    sizes = {
        codec: sum(
            memoryview(f).nbytes
            for f in encode_message(
                Forward(block_start=0, block_end=1), {"hidden": hidden}, codec=codec
            )[1:]
        )
        for codec in Codec
    }
    assert sizes[Codec.NONE] == hidden.numel() * 4
    assert sizes[Codec.FLOAT16] == sizes[Codec.BFLOAT16] == hidden.numel() * 2
    assert sizes[Codec.INT8_BLOCK64] == hidden.numel() + hidden.numel() // 64 * 4


def test_int8_blocks_keep_a_small_block_next_to_an_outlier_block():
    values = torch.cat([torch.full((64,), 1000.0), torch.linspace(-0.01, 0.01, 64)])
    out = decode_tensor(
        bytes(encode_tensor(values, Codec.INT8_BLOCK64)), "float32", (128,), Codec.INT8_BLOCK64
    )
    assert torch.allclose(out[64:], values[64:], atol=1e-4)
    assert torch.equal(out[:64], values[:64])


def test_int8_all_zero_block_decodes_to_zeros():
    out = decode_tensor(
        bytes(encode_tensor(torch.zeros(70), Codec.INT8_BLOCK64)),
        "float32",
        (70,),
        Codec.INT8_BLOCK64,
    )
    assert torch.equal(out, torch.zeros(70))


def test_lossy_codec_leaves_integer_tensors_exact():
    mask = torch.tensor([[3], [1], [2]], dtype=torch.uint8)
    decoded = _roundtrip(
        Step(session_id=SID, start_position=0),
        {"hidden": torch.randn(3, 1, 8), "padding_mask": mask},
        codec=Codec.INT8_BLOCK64,
    )
    assert torch.equal(decoded.tensors["padding_mask"], mask)


def test_raw_frames_are_views_not_copies():
    hidden = torch.zeros(1, 4, 512)
    frames = encode_message(Forward(block_start=0, block_end=1), {"hidden": hidden})
    hidden[0, 0, 0] = 5.0  # the frame is a view of the tensor's memory
    received = [frames[0], bytearray(frames[1])]
    decoded = decode_message(received)
    assert decoded.tensors["hidden"][0, 0, 0] == 5.0
    received[1][0:4] = torch.tensor([7.0]).numpy().tobytes()  # and the tensor a view of the frame
    assert decoded.tensors["hidden"][0, 0, 0] == 7.0
    copied = decode_message(received, copy=True).tensors["hidden"]
    received[1][0:4] = torch.tensor([9.0]).numpy().tobytes()
    assert copied[0, 0, 0] == 7.0


def test_non_contiguous_and_empty_tensors_round_trip():
    hidden = torch.randn(3, 16, 2).transpose(1, 2)  # (3, 2, 16), not contiguous
    assert torch.equal(
        _roundtrip(StepResult(session_id=SID, position=2), {"hidden": hidden}).tensors["hidden"],
        hidden,
    )
    empty = torch.empty(0, 5, 8)
    out = _roundtrip(StepResult(session_id=SID, position=0), {"hidden": empty}).tensors["hidden"]
    assert out.shape == (0, 5, 8)


def test_encoding_refuses_what_the_message_type_forbids():
    with pytest.raises(ValueError, match="missing"):
        encode_message(Step(session_id=SID, start_position=0), {})
    with pytest.raises(ValueError, match="unexpected"):
        encode_message(Hello.local(), {"hidden": torch.zeros(1, 1, 1)})
    with pytest.raises(TypeError, match="cannot be sent"):
        encode_message(
            Forward(block_start=0, block_end=1),
            {"hidden": torch.zeros(1, 1, 1, dtype=torch.complex64)},
        )


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        ([], MalformedMessage, "header"),
        ([b"\xc1"], MalformedMessage, "malformed"),
        ([_header({"type": "launch_missiles"}, [])], UnknownMessageType, "launch_missiles"),
        ([_header({"no": "tag"}, [])], MalformedMessage, "tag"),
        ([_header({"type": "step", "session_id": "s"}, [])], MalformedMessage, "start_position"),
        (
            [_header({"type": "forward", "block_start": 3, "block_end": 3}, [])],
            MalformedMessage,
            "empty block range",
        ),
        ([_header({"type": "error", "code": "on_fire"}, [])], MalformedMessage, "code"),
        (
            [_step_header({"dtype": "complex64", "shape": [1, 1, 1], "nbytes": 8}), b"\0" * 8],
            MalformedMessage,
            "not allowed",
        ),
        (
            [_step_header({"dtype": "int64", "shape": [1, 1, 1], "nbytes": 8}), b"\0" * 8],
            MalformedMessage,
            "floating",
        ),
        (
            [_step_header({"dtype": "float32", "shape": [4], "nbytes": 16}), b"\0" * 16],
            MalformedMessage,
            "dims",
        ),
        (
            [_step_header({"dtype": "float32", "shape": [1, 1, 2], "nbytes": 8}), b"\0" * 12],
            MalformedMessage,
            "frame has 12",
        ),
        (
            [_step_header({"dtype": "float32", "shape": [1, 1, 2], "nbytes": 1 << 40}), b"\0" * 8],
            MalformedMessage,
            "header says",
        ),
        (
            [
                _step_header(
                    {"dtype": "float32", "shape": [1 << 20, 1 << 20, 1 << 20], "nbytes": 0}
                ),
                b"",
            ],
            LimitExceeded,
            "bytes",
        ),
        (
            [_step_header({"dtype": "float32", "shape": [1, 1, 1 << 40], "nbytes": 0}), b""],
            LimitExceeded,
            "max_dim",
        ),
        (
            [_step_header({"dtype": "float32", "shape": [1] * 9, "nbytes": 4}), b"\0" * 4],
            MalformedMessage,
            "length",
        ),
        (
            [_step_header({"dtype": "float32", "shape": [1, 1, -1], "nbytes": 4}), b"\0" * 4],
            MalformedMessage,
            ">= 0",
        ),
        (
            [_step_header({"dtype": "float32", "shape": [1, 1, 1], "nbytes": 4})],
            MalformedMessage,
            "1 tensors, 0 sent",
        ),
        (
            [_header({"type": "step", "session_id": "s", "start_position": 0}, [])],
            MalformedMessage,
            "missing",
        ),
        ([_header({"type": "hello"}, []), b"x"], MalformedMessage, "protocol_major"),
        ([b"\x90"] * 20, LimitExceeded, "max_tensors"),
        ([b"\x90" * 300_000], LimitExceeded, "header"),
    ],
)
def test_malformed_messages_raise_typed_errors(frames, error, match):
    with pytest.raises(error, match=match):
        decode_message(frames)


def test_lossy_codec_on_integers_is_refused():
    header = _header(
        {"type": "step", "session_id": "s", "start_position": 0},
        [
            {
                "name": "hidden",
                "dtype": "float32",
                "shape": [1, 1, 1],
                "codec": "none",
                "nbytes": 4,
            },
            {
                "name": "padding_mask",
                "dtype": "int64",
                "shape": [1, 1],
                "codec": "float16",
                "nbytes": 2,
            },
        ],
    )
    with pytest.raises(MalformedMessage, match="cannot carry"):
        decode_message([header, b"\0" * 4, b"\0" * 2])


def test_bool_tensor_with_invalid_bytes_is_refused():
    header = _header(
        {"type": "step", "session_id": "s", "start_position": 0},
        [
            {
                "name": "hidden",
                "dtype": "float32",
                "shape": [1, 1, 1],
                "codec": "none",
                "nbytes": 4,
            },
            {
                "name": "padding_mask",
                "dtype": "bool",
                "shape": [1, 2],
                "codec": "none",
                "nbytes": 2,
            },
        ],
    )
    decoded = decode_message([header, b"\0" * 4, b"\x01\x00"])
    assert decoded.tensors["padding_mask"].tolist() == [[True, False]]
    with pytest.raises(MalformedMessage, match="bool"):
        decode_message([header, b"\0" * 4, b"\x01\x02"])


def test_limits_are_configurable():
    frames = encode_message(Forward(block_start=0, block_end=1), {"hidden": torch.zeros(1, 4, 64)})
    decode_message(frames, WireLimits(max_tensor_bytes=1024))
    with pytest.raises(LimitExceeded):
        decode_message(frames, WireLimits(max_tensor_bytes=1023))
    with pytest.raises(LimitExceeded):
        decode_message(frames, WireLimits(max_message_bytes=1024))


def test_version_check_refuses_another_major_only():
    local = Hello.local("me")
    assert (local.protocol_major, local.protocol_minor) == PROTOCOL_VERSION
    check_compatible(local, msgspec.structs.replace(local, protocol_minor=local.protocol_minor + 3))
    with pytest.raises(VersionMismatch, match="protocol"):
        check_compatible(
            local, msgspec.structs.replace(local, protocol_major=local.protocol_major + 1)
        )


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "open_session", "block_start": 0, "block_end": 1, "max_length": 8, "adapter": "x"},
        {
            "type": "open_session",
            "block_start": 0,
            "block_end": 1,
            "max_length": 8,
            "idle_timeout_s": 5.0,
        },
        {"type": "step", "session_id": "s", "start_position": 0, "beam_width": 2},
        {"type": "forward", "block_start": 0, "block_end": 1, "adapter": None},
    ],
)
def test_requests_refuse_fields_nothing_implements(fields):
    with pytest.raises(MalformedMessage, match="unknown field"):
        decode_message([_header(fields, [])])


def test_steps_refuse_tensors_nothing_implements():
    header = _header(
        {"type": "step", "session_id": "s", "start_position": 0},
        [
            {
                "name": "hidden",
                "dtype": "float32",
                "shape": [1, 1, 1],
                "codec": "none",
                "nbytes": 4,
            },
            {"name": "hypo_ids", "dtype": "int64", "shape": [1], "codec": "none", "nbytes": 8},
        ],
    )
    with pytest.raises(MalformedMessage, match="hypo_ids"):
        decode_message([header, b"\0" * 4, b"\0" * 8])


def test_replies_tolerate_fields_of_newer_hosts():
    fields = {"type": "session_opened", "session_id": "s", "max_length": 8, "newer": 1}
    assert decode_message([_header(fields, [])]).message == SessionOpened(
        session_id="s", max_length=8
    )


def test_draining_is_not_a_host_state():
    fields = {
        "type": "info_reply",
        "model": "m",
        "block_start": 0,
        "block_end": 1,
        "state": "draining",
        "torch_dtype": "float32",
    }
    with pytest.raises(MalformedMessage):
        decode_message([_header(fields, [])])
