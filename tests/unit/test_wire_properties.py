"""Property tests: every valid message and tensor survives a round trip, and no input at
all makes `decode_message` raise anything but a `WireError`."""

from __future__ import annotations

import math

import msgspec
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stamen.swarm_core.protocol.codecs import (
    BLOCK_SIZE,
    DTYPES,
    FLOATING_DTYPES,
    Codec,
    decode_tensor,
    encode_tensor,
)
from stamen.swarm_core.protocol.errors import ErrorCode
from stamen.swarm_core.protocol.records import HostState
from stamen.swarm_core.protocol.wire import (
    MESSAGE_TYPES,
    ErrorReply,
    Hello,
    InfoReply,
    OpenSession,
    SessionId,
    Step,
    StepResult,
    WireError,
    decode_message,
    encode_message,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Generating nested headers is the slow part; fewer examples keep the default run short.
FEW = settings(SETTINGS, max_examples=60)

names = st.text(max_size=20)
session_ids = st.text(min_size=1, max_size=64).map(SessionId)
block_ranges = st.tuples(st.integers(0, 100), st.integers(1, 100)).map(
    lambda r: (r[0], r[0] + r[1])
)
shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw, dtype_names=None, shape=shapes):
    """A tensor of any allowed dtype with values from a drawn seed (and, for floats,
    a drawn magnitude, so blocks of very different scales meet)."""
    name = draw(st.sampled_from(sorted(DTYPES)) if dtype_names is None else dtype_names)
    dims = draw(shape)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if name in FLOATING_DTYPES:
        scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1000.0]))
        values = torch.randn(dims, generator=generator) * scale
    elif name == "bool":
        values = torch.randint(0, 2, dims, generator=generator).bool()
    else:
        values = torch.randint(-100, 100, dims, generator=generator)
        if name == "uint8":
            values = values.abs()
    return values.to(DTYPES[name])


messages = st.one_of(
    st.builds(
        lambda span, max_length, batch, codec: OpenSession(
            block_start=span[0],
            block_end=span[1],
            max_length=max_length,
            batch_size=batch,
            reply_codec=codec,
        ),
        block_ranges,
        st.integers(1, 1 << 20),
        st.integers(1, 4096),
        st.sampled_from(Codec),
    ),
    st.builds(lambda name, caps: Hello.local(name, caps), names, st.lists(names, max_size=5)),
    st.builds(
        lambda code, text, retry: ErrorReply(code=code, message=text, retry_after_s=retry),
        st.sampled_from(ErrorCode),
        st.text(max_size=200),
        st.none() | st.floats(0.001, 3600),
    ),
    st.builds(
        lambda model, span, state, tokens: InfoReply(
            model=model,
            block_start=span[0],
            block_end=span[1],
            state=state,
            torch_dtype="bfloat16",
            cache_tokens_left=tokens,
        ),
        names,
        block_ranges,
        st.sampled_from(HostState),
        st.integers(0, 2**40),
    ),
)


@SETTINGS
@given(messages)
def test_any_valid_message_round_trips(message):
    decoded = decode_message(encode_message(message))
    assert decoded.message == message


@SETTINGS
@given(
    session_ids,
    st.integers(0, 1 << 24),
    tensors(st.sampled_from(sorted(FLOATING_DTYPES)), st.tuples(*[st.integers(0, 5)] * 3)),
    st.sampled_from(Codec),
)
def test_any_step_with_hidden_states_round_trips(session_id, position, hidden, codec):
    message = Step(session_id=session_id, start_position=position)
    frames = encode_message(message, {"hidden": hidden}, codec=codec)
    decoded = decode_message([bytes(frame) for frame in frames])
    assert decoded.message == message
    out = decoded.tensors["hidden"]
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    if codec is Codec.NONE:
        assert torch.equal(out, hidden)


def _assert_within_codec_error(original: torch.Tensor, decoded: torch.Tensor, codec: Codec):
    x, y = original.double().reshape(-1), decoded.double().reshape(-1)
    if codec is Codec.FLOAT16:
        assert torch.allclose(y, x, rtol=2**-11, atol=2**-24)
    elif codec is Codec.BFLOAT16:
        assert torch.allclose(y, x, rtol=2**-8, atol=0)
    else:
        blocks = math.ceil(x.numel() / BLOCK_SIZE)
        padded = torch.zeros(blocks * BLOCK_SIZE, dtype=torch.float64)
        padded[: x.numel()] = x
        absmax = padded.view(blocks, BLOCK_SIZE).abs().amax(dim=1)
        bound = absmax.repeat_interleave(BLOCK_SIZE)[: x.numel()] / 254 * 1.01
        # Then rounded to the logical dtype (bf16 keeps 8 bits of mantissa).
        bound += x.abs() * torch.finfo(original.dtype).eps
        assert bool(((y - x).abs() <= bound + 1e-30).all())


@SETTINGS
@given(tensors(), st.sampled_from(Codec))
def test_any_tensor_round_trips_under_any_applicable_codec(tensor, codec):
    name = next(n for n, d in DTYPES.items() if d == tensor.dtype)
    if name not in FLOATING_DTYPES:
        codec = Codec.NONE
    frame = bytes(encode_tensor(tensor, codec))
    out = decode_tensor(frame, name, tuple(tensor.shape), codec)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    if codec is Codec.NONE or tensor.numel() == 0:
        assert torch.equal(out, tensor)
    else:
        _assert_within_codec_error(tensor, out, codec)


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_arbitrary_frames_raise_only_wire_errors(frames):
    try:
        decode_message(frames)
    except WireError:
        pass


header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=6,
)
tensor_metas = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["hidden", "prompts", "hypo_ids", "x"]) | header_values,
        "dtype": st.sampled_from([*DTYPES, "complex64", "float8"]) | header_values,
        "shape": st.lists(st.integers(-2, 2**41) | st.sampled_from([0, 1, 3]), max_size=9),
        "codec": st.sampled_from([c.value for c in Codec] + ["zstd"]),
        "nbytes": st.integers(-1, 2**64 - 1) | st.sampled_from([0, 4, 12, 48]),
    }
)


@FEW
@given(
    st.sampled_from(sorted(MESSAGE_TYPES) + ["nope"]),
    st.dictionaries(
        st.sampled_from(
            ["session_id", "start_position", "block_start", "block_end", "max_length", "code"]
        ),
        header_values,
        max_size=4,
    ),
    st.lists(tensor_metas, max_size=3),
    st.lists(st.binary(max_size=64), max_size=4),
)
def test_structurally_plausible_headers_raise_only_wire_errors(tag, fields, metas, payloads):
    header = msgspec.msgpack.encode({"message": {"type": tag, **fields}, "tensors": metas})
    try:
        decoded = decode_message([header, *payloads])
    except WireError:
        return
    for meta, tensor in zip(metas, decoded.tensors.values()):
        assert tuple(tensor.shape) == tuple(meta["shape"])


@SETTINGS
@given(st.data())
def test_corrupted_valid_messages_raise_only_wire_errors(data):
    message = StepResult(session_id=SessionId("s"), position=3)
    frames = [bytes(f) for f in encode_message(message, {"hidden": torch.randn(1, 2, 4)})]
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    for _ in range(data.draw(st.integers(1, 4))):
        if frame:
            position = data.draw(st.integers(0, len(frame) - 1))
            frame[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    frames[index] = bytes(frame[:cut])
    try:
        decode_message(frames)
    except WireError:
        pass
