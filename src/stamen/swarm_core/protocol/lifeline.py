"""A child process's lifeline to its parent: stop when the parent is gone.

`LocalSwarm` starts `swarm-bootstrap` and `swarm-host` with `--parent-pid PID`. A parent
that dies without stopping them (SIGKILL, a crash) would leave them serving as orphans;
`parent_watch` polls every `interval_s` while its block runs and sets the child's stop
event when the process that started it is no longer its parent (an orphan is adopted by
init or a subreaper), so the child shuts down exactly as on SIGTERM. Comparing with
`os.getppid()`, not asking whether PID exists, is immune to the PID being reused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


def add_parent_pid_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=int(os.environ.get("STAMEN_PARENT_PID", "0") or 0) or None,
        metavar="PID",
        help="stop (as on SIGTERM) when process PID, which started this one, is gone "
        "[STAMEN_PARENT_PID] (default: keep running)",
    )


async def _watch(parent_pid: int, stop: asyncio.Event, interval_s: float) -> None:
    # Polling: nothing portable signals a parent's death (Linux's PR_SET_PDEATHSIG fires
    # when the parent's *thread* exits, and needs ctypes).
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await asyncio.sleep(interval_s)
    logger.warning("parent process %d is gone: shutting down", parent_pid)
    stop.set()


@contextlib.asynccontextmanager
async def parent_watch(
    parent_pid: int | None, stop: asyncio.Event, interval_s: float = POLL_INTERVAL_S
) -> AsyncIterator[None]:
    """While the block runs, set `stop` once this process's parent is no longer
    `parent_pid` (None: watch nothing)."""
    if parent_pid is None:
        yield
        return
    watcher = asyncio.create_task(_watch(parent_pid, stop, interval_s))
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
