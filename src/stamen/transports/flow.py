"""Small pieces shared by the in-process and tcp transports: a broadcast wake-up and the
sender-side check of a message against the receiver's `Limits`."""

from __future__ import annotations

import asyncio

from stamen.transports.base import Frames, Limits, MessageTooLarge


class Signal:
    """A broadcast wake-up: every waiter of the current generation is released."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


def check_message(frames: Frames, limits: Limits) -> list[memoryview]:
    """`frames` as flat byte views; raises `MessageTooLarge` when `limits` forbid them."""
    if len(frames) > limits.max_frames:
        raise MessageTooLarge(f"{len(frames)} frames > max_frames={limits.max_frames}")
    views = [memoryview(frame).cast("B") for frame in frames]
    size = sum(len(view) for view in views)
    if size > limits.max_message_bytes:
        raise MessageTooLarge(f"{size} bytes > max_message_bytes={limits.max_message_bytes}")
    return views
