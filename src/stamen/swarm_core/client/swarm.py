"""The swarm as the client sees it: hosts from the DHT, reached over RPC.

`SwarmClient` implements `remote.SwarmView` for one model: it reads host records from the
DHT in the background (joining it in client mode, so nobody routes through us), measures
each connected host's ping, and hands out `RpcSpanClient`s over pooled connections: a few
per host (`pool.HostConnections`), each call on one with a free slot. Any
failure of a host (lost connection, timeout, remote error, a reply of the wrong shape)
surfaces as `remote.HopError`, which inference sessions answer by routing around it; a
refusal for lack of room is `remote.HostBusy` and one over the host's announced request
size is `remote.RequestTooLarge`, neither of them a failure of the host. Steps are bounded
by `step_timeout_s`, stateless forward / backward (fine-tuning) by `bulk_timeout_s`.

    async with SwarmClient(model_name, num_blocks, initial_peers=[...]) as swarm:
        async with InferenceSession(swarm, 0, num_blocks, max_length=512, batch_size=1) as s:
            hidden = await s.step(hidden)

This module knows nothing about tokens, heads or generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec
import torch
from torch import Tensor

from stamen.swarm_core.client.pool import HostConnections
from stamen.swarm_core.client.remote import (
    Forwarded,
    HopError,
    HopSession,
    HostBusy,
    HostInfo,
    RequestTooLarge,
    SpanClient,
)
from stamen.swarm_core.protocol.codecs import Codec
from stamen.swarm_core.protocol.discovery import Discovery
from stamen.swarm_core.protocol.errors import (
    RemoteBusy,
    RemoteError,
    RemoteTooLarge,
    RpcError,
    SlotTimeout,
)
from stamen.swarm_core.protocol.records import HostRecord, HostState
from stamen.swarm_core.protocol.rpc import RpcClient, RpcStream
from stamen.swarm_core.protocol.wire import (
    FORWARDING,
    AwaitStep,
    Backward,
    BackwardResult,
    CloseSession,
    Decoded,
    Forward,
    ForwardResult,
    Hello,
    Message,
    NextHop,
    OpenSession,
    Ping,
    SessionId,
    SessionOpened,
    Step,
    StepResult,
    WireError,
)
from stamen.transports.base import ConnectError, Credentials, Transport, TransportError

logger = logging.getLogger(__name__)

_HOST_FAILURES = (RpcError, TransportError, WireError, TimeoutError, ConnectionError)


@dataclass(frozen=True)
class ClientSettings:
    refresh_interval_s: float = 5.0
    connect_timeout_s: float = 10.0
    step_timeout_s: float = 30.0
    bulk_timeout_s: float = 120.0  # one forward / backward: queued below steps, larger
    ping_timeout_s: float = 3.0
    reply_codec: Codec = Codec.NONE
    liveness_interval_s: float = 1.0  # how often hosts with lost connections are redialed
    max_connections_per_host: int = 8  # dialed one by one as the open ones fill up
    # Steps travel host to host when every hop of the chain takes forwarded steps (its
    # `HelloReply` names `wire.FORWARDING`); False: the client carries every hop's input.
    forwarding: bool = True


def _hop_error(error: BaseException, peer_id: str, what: str) -> HopError:
    message = f"{what} on {peer_id[:12]} failed: {type(error).__name__}: {error}"
    if isinstance(error, RemoteBusy):
        return HostBusy(message, peer_id=peer_id, retry_after_s=error.retry_after_s)
    if isinstance(error, RemoteTooLarge):
        # The request's fault, not the host's: never a ban, and resending it cannot help.
        return RequestTooLarge(message, peer_id=peer_id)
    if isinstance(error, SlotTimeout):
        # No free slot on our side is no failure of the host: load, like `busy`.
        return HostBusy(message, peer_id=peer_id)
    return HopError(message, peer_id=peer_id)


def _check_reply(hidden: Tensor | None, expected: Tensor, peer_id: str) -> Tensor:
    """A host that answers with the wrong shape or non-floats is treated as failed."""
    return _check_shape(hidden, expected.shape, expected.dtype, peer_id)


def _check_shape(
    hidden: Tensor | None, shape: torch.Size, dtype: torch.dtype, peer_id: str
) -> Tensor:
    if hidden is None or hidden.shape != shape or not hidden.is_floating_point():
        got = None if hidden is None else (tuple(hidden.shape), hidden.dtype)
        raise HopError(
            f"host {peer_id[:12]} replied {got}, expected {tuple(shape)}", peer_id=peer_id
        )
    return hidden.to(dtype)


def _check_type(reply: object, expected: type, peer_id: str) -> None:
    if not isinstance(reply, expected):
        raise HopError(
            f"host {peer_id[:12]} replied {type(reply).__name__}, expected {expected.__name__}",
            peer_id=peer_id,
        )


def _request_tensors(
    hidden: Tensor, prompts: Tensor | None, padding_mask: Tensor | None, **more: Tensor
) -> dict[str, Tensor]:
    """The named tensors of a step / forward / backward, contiguous for the wire."""
    tensors = {"hidden": hidden.contiguous()}
    tensors.update((name, tensor.contiguous()) for name, tensor in more.items())
    if prompts is not None:
        tensors["prompts"] = prompts.contiguous()
    if padding_mask is not None:
        tensors["padding_mask"] = padding_mask.contiguous()
    return tensors


class RpcHopSession(HopSession):
    """One inference session on a host: a streaming RPC call kept open between steps.

    `relay_target` is where other hosts relay this session's forwarded input (None when
    the host or the client settings do not forward). A forwarded call given up while its
    reply was still due leaves that reply `_owed`: the host answers it as soon as it sees
    our next message, so the next call reads and drops it before its own reply. A call
    given up while its request was being sent resets the stream: the session is then
    lost (`HopError` on every later call), never out of step with its replies.
    """

    def __init__(
        self,
        peer_id: str,
        stack: contextlib.AsyncExitStack,
        stream: RpcStream,
        session_id: SessionId,
        relay_target: NextHop | None = None,
    ):
        self._peer_id = peer_id
        self._stack = stack
        self._stream = stream
        self.session_id = session_id
        self.relay_target = relay_target
        self._closed = False
        self._owed = 0  # replies to abandoned forwarded calls, still to be read
        self._broken = False  # a request was cut off while being sent: the stream is reset

    @property
    def forwarding(self) -> bool:
        return self.relay_target is not None

    def can_relay_to(self, next_session: HopSession) -> bool:
        if self.relay_target is None or not isinstance(next_session, RpcHopSession):
            return False
        target = next_session.relay_target
        return target is not None and bool(
            _schemes(self.relay_target.addresses) & _schemes(target.addresses)
        )

    async def step(
        self,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
    ) -> Tensor:
        tensors = _request_tensors(hidden, prompts, padding_mask)
        message = Step(session_id=self.session_id, start_position=start_position)
        try:
            reply = await self._call(message, tensors)
        except _HOST_FAILURES as error:
            raise _hop_error(error, self._peer_id, "step") from error
        _check_type(reply.message, StepResult, self._peer_id)
        assert isinstance(reply.message, StepResult)
        if reply.message.position != start_position + hidden.shape[1]:
            raise HopError(
                f"host {self._peer_id[:12]} answered position {reply.message.position} to a "
                f"step from {start_position}",
                peer_id=self._peer_id,
            )
        return _check_reply(reply.tensors.get("hidden"), hidden, self._peer_id)

    async def step_and_forward(
        self,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None,
        prompts: Tensor | None,
        next_session: HopSession | None,
        *,
        next_nonce: int,
    ) -> Forwarded:
        message = Step(
            session_id=self.session_id,
            start_position=start_position,
            next_hop=_relay_target_of(next_session, next_nonce),
        )
        tensors = _request_tensors(hidden, prompts, padding_mask)
        return await self._forwarded(message, tensors, hidden.shape, hidden.dtype)

    async def await_step(
        self,
        start_position: int,
        num_tokens: int,
        previous_peer_id: str,
        padding_mask: Tensor | None,
        prompts: Tensor | None,
        next_session: HopSession | None,
        *,
        nonce: int,
        next_nonce: int,
    ) -> Forwarded:
        message = AwaitStep(
            session_id=self.session_id,
            start_position=start_position,
            num_tokens=num_tokens,
            previous_peer_id=previous_peer_id,
            nonce=nonce,
            next_hop=_relay_target_of(next_session, next_nonce),
        )
        tensors = {}
        if prompts is not None:
            tensors["prompts"] = prompts.contiguous()
        if padding_mask is not None:
            tensors["padding_mask"] = padding_mask.contiguous()
        return await self._forwarded(message, tensors, None, None)

    async def _forwarded(
        self,
        message: Step | AwaitStep,
        tensors: Mapping[str, Tensor],
        shape: torch.Size | None,
        dtype: torch.dtype | None,
    ) -> Forwarded:
        """Send a forwarded step and wait for its reply; a reply given up on is owed."""
        try:
            reply = await self._call(message, tensors, track=True)
        except _HOST_FAILURES as error:
            raise _hop_error(error, self._peer_id, "step") from error
        result = reply.message
        _check_type(result, StepResult, self._peer_id)
        assert isinstance(result, StepResult)
        hidden = reply.tensors.get("hidden")
        if hidden is None or hidden.dim() != 3 or not hidden.is_floating_point():
            raise HopError(f"host {self._peer_id[:12]} replied without hidden states")
        if result.position != message.start_position + hidden.shape[1]:
            raise HopError(
                f"host {self._peer_id[:12]} answered position {result.position} to a step "
                f"from {message.start_position}",
                peer_id=self._peer_id,
            )
        if shape is not None and dtype is not None:
            hidden = _check_shape(hidden, shape, dtype, self._peer_id)
        return Forwarded(hidden, result.forward_error)

    async def _call(
        self,
        message: Message,
        tensors: Mapping[str, Tensor] | None = None,
        timeout_s: float | None = None,
        *,
        track: bool = False,
    ) -> Decoded:
        """One request and its reply on the session's stream. Replies owed to abandoned
        calls come first (the host answers them as soon as it sees `message`) and are
        dropped; a `track`ed call abandoned after its request went out owes its own
        reply (forwarded steps: the caller may give up on one and go on)."""
        if self._broken:
            raise ConnectionResetError(f"the session on {self._peer_id[:12]} was cut off")
        if not self._owed and not track:
            return await self._stream.call(message, tensors, timeout_s=timeout_s)
        try:
            await self._stream.send(message, tensors, timeout_s=timeout_s)
        except BaseException:
            # Whether the host got the request, and so owes a reply, is unknown: no later
            # reply on this stream could be trusted to answer its own request.
            self._broken = True
            self._stream.reset()
            raise
        try:
            while self._owed:
                with contextlib.suppress(RemoteError):
                    await self._stream.recv(timeout_s=timeout_s)
                self._owed -= 1
            return await self._stream.recv(timeout_s=timeout_s)
        except RemoteError:
            raise
        except BaseException:
            self._owed += 1
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(*_HOST_FAILURES):
                await self._call(CloseSession(session_id=self.session_id), timeout_s=5.0)
        finally:
            with contextlib.suppress(*_HOST_FAILURES):
                await self._stack.aclose()


def _schemes(addresses: Sequence[str]) -> set[str]:
    """The transports a host listens on (a host dials with the one it listens on)."""
    return {address.partition("://")[0] for address in addresses}


def _relay_target_of(session: HopSession | None, nonce: int) -> NextHop | None:
    if session is None:
        return None
    if not isinstance(session, RpcHopSession) or session.relay_target is None:
        raise ValueError("the next hop does not take forwarded steps")
    return msgspec.structs.replace(session.relay_target, nonce=nonce)


class RpcSpanClient(SpanClient):
    """Calls on one host, each on a leased slot of its pooled connections; a session holds
    its slot until it closes. Waiting for a slot (or dialing) is bounded by
    `connect_timeout_s`, and running out of it raises `HostBusy`."""

    def __init__(
        self,
        peer_id: str,
        connections: HostConnections,
        settings: ClientSettings,
        record: Callable[[], HostRecord | None] = lambda: None,
    ):
        self._peer_id = peer_id
        self._connections = connections
        self._settings = settings
        self._record = record  # the host's current record: its key and addresses

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def open_session(
        self, start: int, end: int, max_length: int, batch_size: int
    ) -> HopSession:
        stack = contextlib.AsyncExitStack()
        try:
            rpc = await stack.enter_async_context(
                self._connections.lease(self._settings.connect_timeout_s)
            )
            stream = await stack.enter_async_context(
                rpc.open_stream(timeout_s=self._settings.step_timeout_s)
            )
            request = OpenSession(
                block_start=start,
                block_end=end,
                max_length=max_length,
                batch_size=batch_size,
                reply_codec=self._settings.reply_codec,
            )
            reply = await stream.call(request)
            if not isinstance(reply.message, SessionOpened):
                raise HopError(f"expected session_opened, got {type(reply.message).__name__}")
        except BaseException as error:
            await stack.aclose()
            if isinstance(error, _HOST_FAILURES):
                raise _hop_error(error, self._peer_id, "open_session") from error
            raise
        session_id = reply.message.session_id
        target = self._relay_target(rpc, session_id)
        return RpcHopSession(self._peer_id, stack, stream, session_id, target)

    def _relay_target(self, rpc: RpcClient, session_id: SessionId) -> NextHop | None:
        """Where other hosts relay this session's input, when both ends forward steps."""
        record = self._record()
        remote = rpc.remote
        if not self._settings.forwarding or record is None or not record.addresses:
            return None
        if remote is None or FORWARDING not in remote.capabilities:
            return None
        return NextHop(
            peer_id=record.peer_id,
            public_key=record.public_key,
            session_id=session_id,
            addresses=record.addresses,
        )

    async def forward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        message = Forward(block_start=start, block_end=end, reply_codec=self._settings.reply_codec)
        tensors = _request_tensors(hidden, prompts, padding_mask)
        reply = await self._bulk_call(message, tensors, "forward")
        _check_type(reply.message, ForwardResult, self._peer_id)
        return _check_reply(reply.tensors.get("hidden"), hidden, self._peer_id)

    async def backward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        grad_output: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        message = Backward(block_start=start, block_end=end, reply_codec=self._settings.reply_codec)
        tensors = _request_tensors(hidden, prompts, padding_mask, grad_output=grad_output)
        reply = await self._bulk_call(message, tensors, "backward")
        _check_type(reply.message, BackwardResult, self._peer_id)
        grad_hidden = _check_reply(reply.tensors.get("grad_hidden"), hidden, self._peer_id)
        grad_prompts = reply.tensors.get("grad_prompts")
        if prompts is None:
            if grad_prompts is not None:
                raise HopError(
                    f"host {self._peer_id[:12]} sent grad_prompts for a call without prompts",
                    peer_id=self._peer_id,
                )
            return grad_hidden, None
        return grad_hidden, _check_reply(grad_prompts, prompts, self._peer_id)

    async def _bulk_call(
        self, message: Forward | Backward, tensors: dict[str, Tensor], what: str
    ) -> Decoded:
        """One forward / backward on a leased slot, bounded by `bulk_timeout_s`."""
        try:
            async with self._connections.lease(self._settings.connect_timeout_s) as rpc:
                return await rpc.call(message, tensors, timeout_s=self._settings.bulk_timeout_s)
        except _HOST_FAILURES as error:
            raise _hop_error(error, self._peer_id, what) from error


def host_info(record: HostRecord, ping_s: float | None) -> HostInfo | None:
    """The routing view of a record, or None for a record routing cannot use."""
    blocks = record.end_block - record.start_block
    if blocks <= 0 or record.throughput_tokens_per_s <= 0:
        return None
    # The record gives tokens/s through the whole span; one block is `blocks` times faster.
    return HostInfo(
        peer_id=record.peer_id,
        start=record.start_block,
        end=record.end_block,
        throughput_tokens_s=record.throughput_tokens_per_s * blocks,
        free_cache_tokens=record.free_cache_tokens,
        state=record.state,
        ping_s=ping_s,
        started_at_s=record.started_at_s,
        max_session_cache_tokens=record.max_session_cache_tokens or None,
        max_request_tokens=record.max_request_tokens or None,
    )


class SwarmClient:
    """A `SwarmView` of one model's hosts, kept fresh in the background."""

    def __init__(
        self,
        model_name: str,
        num_blocks: int,
        transport: Transport,
        credentials: Credentials,
        *,
        initial_peers: Sequence[str],
        settings: ClientSettings | None = None,
    ) -> None:
        self.model_name = model_name
        self.num_blocks = num_blocks
        self.transport = transport
        self.settings = settings or ClientSettings()
        self._discovery = Discovery(
            credentials, listen_port=0, initial_peers=tuple(initial_peers), client_mode=True
        )
        self._records: dict[str, HostRecord] = {}
        # Hosts found dead (unreachable, or their address answers with another key), by
        # when: their records issued before then are ignored until they announce again.
        self._gone: dict[str, float] = {}
        self._pings: dict[str, float] = {}
        self._connections: dict[str, HostConnections] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._read_began_s = float("-inf")  # when the lookup behind the current view began
        self.refreshed = asyncio.Event()

    async def __aenter__(self) -> SwarmClient:
        await self._discovery.start()
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._refresh_forever(), name="stamen-swarm-refresh"),
            asyncio.create_task(self._watch_connections(), name="stamen-swarm-liveness"),
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        if self._refreshing is not None:
            tasks.append(self._refreshing)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pools, self._connections = list(self._connections.values()), {}
        for connections in pools:
            await connections.aclose()
        await self._discovery.stop()

    # -- the view -----------------------------------------------------------------------

    def hosts(self) -> list[HostInfo]:
        infos = (host_info(r, self._pings.get(r.peer_id)) for r in self.records())
        return [info for info in infos if info is not None]

    def records(self) -> list[HostRecord]:
        """The newest record of every host believed alive: not gone, not OFFLINE, and not
        expired (also between two refreshes)."""
        now_s = time.time()
        return [
            r
            for r in self._records.values()
            if r.state is not HostState.OFFLINE and r.expires_at_s > now_s
        ]

    def covered(self) -> bool:
        """Whether online hosts cover every block."""
        covered = [False] * self.num_blocks
        for record in self.records():
            if record.state is HostState.ONLINE:
                for block in range(record.start_block, min(record.end_block, self.num_blocks)):
                    covered[block] = True
        return all(covered)

    async def connect(self, peer_id: str) -> SpanClient:
        """A handle on `peer_id` with at least one open connection; its calls may dial
        more, up to `max_connections_per_host`."""
        connections = self._connections.get(peer_id)
        if connections is None:
            connections = HostConnections(
                lambda: self._dial(peer_id),
                max_connections=self.settings.max_connections_per_host,
            )
            self._connections[peer_id] = connections
        await connections.ensure_connected()
        return RpcSpanClient(
            peer_id, connections, self.settings, lambda: self._records.get(peer_id)
        )

    async def _dial(self, peer_id: str) -> RpcClient:
        record = self._records.get(peer_id)
        if record is None or not record.addresses:
            raise HopError(f"no address known for {peer_id[:12]}", peer_id=peer_id)
        errors = []
        dead = False
        for address in record.addresses:
            began = time.perf_counter()
            try:
                rpc = await RpcClient.connect(
                    self.transport,
                    address,
                    Hello.local(),
                    expected_public_key=record.public_key,
                    timeout_s=self.settings.connect_timeout_s,
                )
            except (*_HOST_FAILURES, OSError) as error:
                errors.append(f"{address}: {error}")
                dead = isinstance(error, ConnectError | OSError)
                continue
            self._pings.setdefault(peer_id, time.perf_counter() - began)
            return rpc
        reason = f"cannot reach {peer_id[:12]}: " + "; ".join(errors)
        if dead:  # refused, unreachable, or another key answers there: not a busy host
            self._mark_gone(peer_id, reason)
        raise HopError(reason, peer_id=peer_id)

    def _mark_gone(self, peer_id: str, reason: str) -> None:
        """Drop `peer_id` from the view until it announces again (a record issued later)."""
        self._gone[peer_id] = time.time()
        if self._records.pop(peer_id, None) is not None:
            logger.info("%s is gone: %s", peer_id[:12], reason)

    # -- background refresh -------------------------------------------------------------

    async def refresh(self, max_age_s: float = 0.0) -> None:
        """Make the view one read from the DHT at most `max_age_s` before this call (by
        default: after it began), and re-measure pings of connected hosts. Concurrent
        callers share one lookup: many sessions that find no route at once, asking for a
        view at most a second old, cost the DHT one read, not one each."""
        wanted_s = time.monotonic() - max_age_s
        while self._read_began_s < wanted_s:
            if self._refreshing is None:
                self._refreshing = asyncio.create_task(self._refresh_now())
                self._refreshing.add_done_callback(self._refresh_done)
            # Shielded: a waiter that is cancelled must not cancel the others' lookup.
            await asyncio.shield(self._refreshing)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved here; the waiters got it raised

    async def _refresh_now(self) -> None:
        began_s = time.monotonic()
        found = await self._discovery.find_hosts(
            self.model_name, (0, self.num_blocks), include_offline=True
        )
        # OFFLINE records are read too: a host's OFFLINE announcement must win over its
        # older ONLINE one (and `records` then leaves it out).
        newest: dict[str, HostRecord] = {}
        for block_records in found.values():
            for record in block_records:
                if record.issued_at_s <= self._gone.get(record.peer_id, float("-inf")):
                    continue  # the record of a host found dead since it was issued
                known = newest.get(record.peer_id)
                if known is None or record.freshness() > known.freshness():
                    newest[record.peer_id] = record
        self._records = newest
        self._read_began_s = max(self._read_began_s, began_s)
        await asyncio.gather(*(self._ping(p) for p in list(self._connections)))
        self.refreshed.set()

    async def _ping(self, peer_id: str) -> None:
        """Re-measure the round trip on a slot nobody needs now. A ping that fails or finds
        no free slot leaves the last measurement and every connection as they were: a
        dead connection is the transport's keepalive to close."""
        connections = self._connections.get(peer_id)
        if connections is None:
            return
        async with connections.try_lease() as rpc:
            if rpc is None:
                return
            began = time.perf_counter()
            try:
                await rpc.call(Ping(), timeout_s=self.settings.ping_timeout_s)
            except _HOST_FAILURES as error:
                logger.debug("ping of %s failed: %r", peer_id[:12], error)
                return
        rtt = time.perf_counter() - began
        previous = self._pings.get(peer_id)
        self._pings[peer_id] = rtt if previous is None else 0.7 * previous + 0.3 * rtt

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_s)
            try:
                await self.refresh()
            except Exception as error:  # keep the last view; try again next round
                logger.warning("swarm refresh failed: %s", error)

    async def _watch_connections(self) -> None:
        """Every `liveness_interval_s`, redial each host whose every pooled connection has
        closed (the peer went away: a killed process resets them at once, a vanished
        machine fails the transport's keepalive); a host that cannot be redialed is gone
        from the view, without waiting for its record to expire."""
        while True:
            await asyncio.sleep(self.settings.liveness_interval_s)
            lost = [p for p, pool in self._connections.items() if not pool.connections]
            await asyncio.gather(*(self._recheck(p) for p in lost))

    async def _recheck(self, peer_id: str) -> None:
        pool = self._connections.get(peer_id)
        if pool is None or peer_id not in self._records:
            return
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await pool.ensure_connected()
        except (HopError, TimeoutError) as error:
            self._mark_gone(peer_id, str(error))
            if self._connections.get(peer_id) is pool:
                del self._connections[peer_id]
            await pool.aclose()

    async def wait_for_coverage(self, timeout_s: float) -> None:
        """Refresh until online hosts cover every block, or raise `TimeoutError`."""
        async with asyncio.timeout(timeout_s):
            while not self.covered():
                await asyncio.sleep(0.5)
                await self.refresh()
