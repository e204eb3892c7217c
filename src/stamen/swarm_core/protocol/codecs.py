"""Tensor codecs: how one tensor's values become one byte frame and back.

A codec is chosen per link (per session, per request); the frame carries only values, while
the tensor's logical dtype and shape travel in the message header (`wire.TensorMeta`).

    none          the tensor's own bytes, little-endian, C order. Sent as a memoryview of
                  the tensor (no copy) and decoded as a view of the received frame.
    float16       values cast to IEEE half precision (finite values above 65504 become inf).
    bfloat16      values cast to bfloat16 (float32's range, 8 bits of mantissa).
    int8-block64  blockwise 8-bit: the flattened tensor is cut into blocks of 64 values;
                  each block stores one float32 scale (its absolute maximum / 127) and 64
                  signed bytes. The frame is all scales, then all bytes: 1.0625 bytes/value.
                  A block holding inf or nan decodes as nan.

Lossy codecs apply to floating dtypes only; decoding restores the logical dtype.

This module knows nothing about messages, frames lists or peers: it trusts that the
caller (`wire`) already checked the dtype, shape and frame length against `encoded_nbytes`.
"""

from __future__ import annotations

import sys
import warnings
from enum import StrEnum
from typing import Any

import torch

if sys.byteorder != "little":
    raise ImportError("the wire format is little-endian; big-endian hosts are not supported")

BLOCK_SIZE = 64
_INT8_MAX = 127.0
# Frames below this size are copied on decode: they are cheap to copy, and small `bytes`
# objects may be interned singletons that a writable view must never alias.
ZERO_COPY_MIN_BYTES = 1024
# Read-only frames (received `bytes`) below this size are copied too: the copy costs less
# than silencing torch's read-only-buffer warning for a view, and a decode step's hidden
# states are a few KiB.
READONLY_ZERO_COPY_MIN_BYTES = 16 * 1024


class Codec(StrEnum):
    NONE = "none"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8_BLOCK64 = "int8-block64"


# The allow-list: the only dtypes a peer may declare. Keys are the names on the wire.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
FLOATING_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})

_CAST_CODECS: dict[Codec, torch.dtype] = {
    Codec.FLOAT16: torch.float16,
    Codec.BFLOAT16: torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of `dtype`; `TypeError` for dtypes outside the allow-list."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be sent; allowed: {sorted(DTYPES)}") from None


def codec_applies(codec: Codec, dtype_name_: str) -> bool:
    """Whether `codec` may carry a tensor of this dtype (lossy codecs need floats)."""
    return codec is Codec.NONE or dtype_name_ in FLOATING_DTYPES


def effective_codec(codec: Codec, dtype: torch.dtype) -> Codec:
    """`codec`, or `NONE` where casting would not change a thing (fp16 as fp16)."""
    if _CAST_CODECS.get(codec) == dtype:
        return Codec.NONE
    return codec


def encoded_nbytes(codec: Codec, dtype_name_: str, numel: int) -> int:
    """Exact frame length for `numel` values of `dtype_name_` under `codec`."""
    if codec is Codec.NONE:
        return numel * DTYPES[dtype_name_].itemsize
    if codec in _CAST_CODECS:
        return numel * 2
    blocks = -(-numel // BLOCK_SIZE)
    return blocks * 4 + numel


def encode_tensor(tensor: torch.Tensor, codec: Codec) -> memoryview:
    """The frame for `tensor` (on any device) under `codec`.

    For `NONE` on a contiguous CPU tensor this is a view of the tensor's own memory: the
    tensor must not be modified until the frame is sent.
    """
    name = dtype_name(tensor.dtype)
    if not codec_applies(codec, name):
        raise TypeError(f"codec {codec} needs a floating tensor, got {name}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    codec = effective_codec(codec, tensor.dtype)
    if codec is Codec.NONE:
        flat = tensor.contiguous().reshape(-1)
    elif codec in _CAST_CODECS:
        flat = tensor.reshape(-1).to(_CAST_CODECS[codec])
    else:
        flat = _encode_int8_blocks(tensor.reshape(-1))
    return _bytes_view(flat)


def decode_tensor(
    frame: bytes | bytearray | memoryview,
    dtype_name_: str,
    shape: tuple[int, ...],
    codec: Codec,
    *,
    copy: bool = False,
) -> torch.Tensor:
    """The tensor held by `frame`. With `copy=False` and `codec=NONE` the result is a view
    of `frame` (clone it before writing in place); every other path allocates."""
    dtype = DTYPES[dtype_name_]
    numel = _numel(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw = _uint8_view(frame, copy=copy)  # (nbytes,)
    if codec is Codec.NONE:
        if raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()  # a misaligned view would break vectorized kernels
        return raw.view(dtype).view(shape)
    if codec in _CAST_CODECS:
        if raw.data_ptr() % 2:
            raw = raw.clone()
        return raw.view(_CAST_CODECS[codec]).to(dtype).reshape(shape)
    return _decode_int8_blocks(raw, numel).to(dtype).reshape(shape)


def _encode_int8_blocks(flat: torch.Tensor) -> torch.Tensor:
    """(N,) floats -> (blocks*4 + N,) uint8: float32 scales, then int8 values."""
    numel = flat.numel()
    blocks = -(-numel // BLOCK_SIZE)
    padded = torch.zeros(blocks * BLOCK_SIZE, dtype=torch.float32)
    padded[:numel] = flat
    padded = padded.view(blocks, BLOCK_SIZE)  # (blocks, 64)
    scale = padded.abs().amax(dim=1) / _INT8_MAX  # (blocks,)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(padded / safe_scale[:, None]).clamp_(-_INT8_MAX, _INT8_MAX)
    out = torch.empty(blocks * 4 + numel, dtype=torch.uint8)
    out[: blocks * 4].view(torch.float32).copy_(scale)
    out[blocks * 4 :].view(torch.int8).copy_(quantized.reshape(-1)[:numel].to(torch.int8))
    return out


def _decode_int8_blocks(raw: torch.Tensor, numel: int) -> torch.Tensor:
    """(blocks*4 + N,) uint8 -> (N,) float32."""
    blocks = -(-numel // BLOCK_SIZE)
    scale_bytes = raw[: blocks * 4]
    if scale_bytes.data_ptr() % 4:
        scale_bytes = scale_bytes.clone()
    scale = scale_bytes.view(torch.float32)  # (blocks,)
    values = torch.zeros(blocks * BLOCK_SIZE, dtype=torch.float32)
    values[:numel] = raw[blocks * 4 :].view(torch.int8)
    return (values.view(blocks, BLOCK_SIZE) * scale[:, None]).reshape(-1)[:numel]


def _bytes_view(flat: torch.Tensor) -> memoryview:
    """A memoryview over the bytes of a contiguous 1-D CPU tensor (kept alive by the view)."""
    if flat.numel() == 0:
        return memoryview(b"")
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


def _uint8_view(frame: bytes | bytearray | memoryview, *, copy: bool) -> torch.Tensor:
    view = memoryview(frame).cast("B")
    if (
        copy
        or view.nbytes < ZERO_COPY_MIN_BYTES
        or (view.readonly and view.nbytes < READONLY_ZERO_COPY_MIN_BYTES)
    ):
        return torch.frombuffer(bytearray(view), dtype=torch.uint8)
    if not view.readonly:
        return torch.frombuffer(view, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Received frames are owned by us alone; torch only warns that `bytes` is read-only.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel
