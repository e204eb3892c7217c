"""A swarm host: one span of a model's blocks, served over RPC and announced in the DHT.

`Host.run` does, in order:

1. joins the DHT and, without a fixed span, picks the blocks the swarm serves least;
2. announces itself JOINING (and keeps re-announcing from then on), loads its span (block
   by block, progress logged), quantizes it if asked, and measures its decode throughput;
3. listens on its transport and serves `Info`, `OpenSession` (one stream per inference
   session, taking `Step` and, for forwarded steps, `AwaitStep`), `RelayStep` (another
   host's output for one of our sessions, `host.relay`), `Forward` and `Backward`,
   translating runtime refusals into typed remote errors (with the runtime's
   `retry_after_s` hint; `too_large` for a forward / backward
   over `max_request_tokens`). A step refused as busy or timed out in the queue never
   ran: it is answered with an `ErrorReply` and the session stream stays open, so the
   client may send the same step again. Steps, forwards and backwards take the deep
   `prompts` tensor of the wire's messages; a `BackwardResult` carries `grad_prompts`
   exactly when prompts were sent. Forward / backward run below steps in priority;
4. announces ONLINE every `announce_interval_s` (5 s) with its free cache and its size
   limits (`max_session_cache_tokens`, `max_request_tokens`), each record
   valid for `record_ttl_s` (15 s): a host that dies without saying so drops out of the
   swarm's view within 15 s, and cache freed by closed sessions shows within 5 s;
5. when asked to stop: announces OFFLINE, refuses new sessions, lets in-flight steps
   finish (up to `drain_timeout_s`), then closes everything.

The compute itself (sessions, cache budget, priorities, worker thread) is `SpanRuntime`'s.
This module knows nothing about command-line flags (`host.cli`) or how clients route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import torch

from stamen.models.base import Block
from stamen.models.loading import Span, load_config, load_span
from stamen.models.quantization import quantize_block
from stamen.models.registry import get_adapter
from stamen.swarm_core.host.relay import NextHops, RelayInbox, RelayLimits
from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime, measure_throughput
from stamen.swarm_core.protocol.codecs import Codec
from stamen.swarm_core.protocol.discovery import Discovery
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteBusy,
    RemoteError,
    RemoteNotFound,
    RemoteTimeout,
)
from stamen.swarm_core.protocol.identity import peer_id_from_public_key, peer_id_of, short_peer_id
from stamen.swarm_core.protocol.records import MAX_TTL_S, HostRecord, HostState, new_host_record
from stamen.swarm_core.protocol.rpc import CallContext, Outgoing, Reply, RpcServer
from stamen.swarm_core.protocol.wire import (
    FORWARDING,
    AwaitStep,
    Backward,
    BackwardResult,
    CloseSession,
    Decoded,
    ErrorReply,
    Forward,
    ForwardResult,
    Hello,
    HelloReply,
    Info,
    InfoReply,
    NextHop,
    OpenSession,
    RelayStep,
    SessionClosed,
    SessionId,
    SessionOpened,
    Step,
    StepResult,
)
from stamen.transports.base import Credentials, Listener, Transport
from stamen.version import __version__

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSettings:
    model_ref: str
    model_name: str
    blocks: tuple[int, int] | None = None  # absolute [start, end); None: choose
    num_blocks: int | None = None  # span length when choosing; None: the whole model
    listen: str = "tcp://127.0.0.1:0"
    dht_host: str = "127.0.0.1"
    dht_port: int = 0
    dht_client_mode: bool = False  # not reachable from outside: query the DHT only
    initial_peers: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    quantization: str = "none"
    max_cache_tokens: int = 16384
    max_request_tokens: int = 16384  # B x T of one forward / backward, announced
    public_name: str = ""
    announce_interval_s: float = 5.0
    record_ttl_s: float = 15.0  # > announce_interval_s, so a live host's record never lapses
    drain_timeout_s: float = 10.0
    limits: RuntimeLimits | None = None
    relay_limits: RelayLimits | None = None

    def __post_init__(self) -> None:
        if not 0 < self.announce_interval_s < self.record_ttl_s <= MAX_TTL_S:
            raise ValueError(
                f"need 0 < announce_interval_s ({self.announce_interval_s:g}) < record_ttl_s "
                f"({self.record_ttl_s:g}) <= {MAX_TTL_S:g}"
            )


def choose_span(
    records: Mapping[int, list[HostRecord]], total_blocks: int, num_blocks: int
) -> tuple[int, int]:
    """The window of `num_blocks` blocks with the least announced throughput.

    A block's served throughput is the sum over online hosts covering it of their span
    throughput; ties go to the leftmost window, so hosts started one after another cover
    the model left to right. A host still JOINING has not measured itself yet: it counts
    as fast as the fastest online host (at least 1 token/s), so that hosts started
    together spread out instead of all loading the first window.
    """
    num_blocks = max(1, min(num_blocks, total_blocks))
    online_speeds = [
        r.throughput_tokens_per_s
        for block_records in records.values()
        for r in block_records
        if r.state is HostState.ONLINE
    ]
    joining_speed = max([1.0, *online_speeds])
    served = [0.0] * total_blocks
    for block, block_records in records.items():
        if 0 <= block < total_blocks:
            served[block] = sum(
                r.throughput_tokens_per_s if r.state is HostState.ONLINE else joining_speed
                for r in block_records
                if r.state in (HostState.ONLINE, HostState.JOINING)
            )
    windows = [
        (sum(served[start : start + num_blocks]), start)
        for start in range(total_blocks - num_blocks + 1)
    ]
    _, best = min(windows)
    return best, best + num_blocks


async def _next_request(requests: AsyncIterator[Decoded]) -> Decoded | None:
    """The session stream's next message, None at its end (a task's result)."""
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return None


def _check_session(step_session: str, session_id: SessionId) -> None:
    if step_session != session_id:
        raise RemoteNotFound(f"this stream serves session {session_id}")


def _retry_later(refusal: RemoteError) -> ErrorReply:
    """The reply to a step that did not run, sent in place of ending the session."""
    return ErrorReply(
        code=refusal.code, message=refusal.message[:4096], retry_after_s=refusal.retry_after_s
    )


class Host:
    def __init__(self, settings: HostSettings, credentials: Credentials, transport: Transport):
        self.settings = settings
        self.credentials = credentials
        self.transport = transport
        self.peer_id = peer_id_of(credentials)
        self.state = HostState.JOINING
        self.started_at_s = time.time()  # this incarnation, in every record it announces
        self.span_range: tuple[int, int] | None = None
        self.throughput_tokens_s = 0.0
        self.addresses: list[str] = []
        self.runtime: SpanRuntime | None = None
        self.inbox: RelayInbox | None = None
        self.next_hops = NextHops(
            transport, Hello.local(settings.public_name), settings.relay_limits
        )
        self.ready = asyncio.Event()  # set once serving and announced ONLINE
        self._discovery: Discovery | None = None
        self._listener: Listener | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down gracefully."""
        settings = self.settings
        discovery = Discovery(
            self.credentials,
            listen_host=settings.dht_host,
            listen_port=settings.dht_port,
            initial_peers=settings.initial_peers,
            client_mode=settings.dht_client_mode,
        )
        async with discovery, contextlib.AsyncExitStack() as stack:
            self._discovery = discovery
            self.span_range = await self._choose_blocks()
            await self._announce()
            # Re-announced from here on, JOINING included: loading a span can take longer
            # than a record lives (`record_ttl_s`).
            announcer = asyncio.create_task(self._announce_forever(), name="stamen-announce")
            try:
                await self._start_serving(stack)
                await stop.wait()
            finally:
                announcer.cancel()
                await asyncio.gather(announcer, return_exceptions=True)
                await self._drain()

    async def _start_serving(self, stack: contextlib.AsyncExitStack) -> None:
        """Load the span, start its runtime and listener, and announce ONLINE."""
        settings = self.settings
        assert self.span_range is not None
        start, end = self.span_range
        span = await asyncio.to_thread(self._load, start, end)
        self.runtime = await stack.enter_async_context(SpanRuntime(span, self._limits()))
        stack.push_async_callback(self.next_hops.aclose)
        self.throughput_tokens_s = await asyncio.to_thread(
            measure_throughput, span, cuda_graphs=self._limits().cuda_graphs
        )
        logger.info("throughput: %.1f decode tokens/s over the span", self.throughput_tokens_s)
        self._listener = await self.transport.listen(settings.listen, self._server().serve)
        stack.push_async_callback(self._listener.close)
        self.addresses = list(self._listener.addresses)
        self.state = HostState.ONLINE
        await self._announce()
        logger.info(
            "serving blocks [%d, %d) of %s as %s at %s",
            start,
            end,
            settings.model_name,
            short_peer_id(self.peer_id),
            ", ".join(self.addresses),
        )
        self.ready.set()

    async def _choose_blocks(self) -> tuple[int, int]:
        settings = self.settings
        config = await asyncio.to_thread(load_config, settings.model_ref)
        total = get_adapter(config).num_blocks(config)
        if settings.blocks is not None:
            return settings.blocks
        num_blocks = settings.num_blocks or total
        assert self._discovery is not None
        try:
            records = await self._discovery.find_hosts(settings.model_name, (0, total))
        except Exception as error:  # an empty or unreachable swarm must not stop a host
            logger.warning("could not read the swarm's coverage (%s); starting at block 0", error)
            records = {}
        chosen = choose_span(records, total, num_blocks)
        logger.info("chose blocks [%d, %d) of %d (least served)", *chosen, total)
        return chosen

    def _load(self, start: int, end: int) -> Span:
        settings = self.settings
        began = time.monotonic()
        logger.info("loading blocks [%d, %d) of %s ...", start, end, settings.model_ref)
        span = load_span(
            settings.model_ref, start, end, dtype=settings.dtype, device=settings.device
        )
        if settings.quantization != "none":
            for i, block in enumerate(span.blocks):
                span.blocks[i] = quantize_block(cast(Block, block), settings.quantization)
                logger.info("quantized block %d/%d", i + 1, len(span.blocks))
        logger.info("loaded %d blocks in %.1f s", end - start, time.monotonic() - began)
        return span

    def _limits(self) -> RuntimeLimits:
        if self.runtime is not None:
            return self.runtime.limits
        return self.settings.limits or RuntimeLimits(
            max_cache_tokens=self.settings.max_cache_tokens,
            max_bulk_tokens=self.settings.max_request_tokens,
        )

    async def _drain(self) -> None:
        """Announce OFFLINE, refuse new sessions, let running steps finish."""
        self.state = HostState.OFFLINE
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._announce(), timeout=5.0)
        if self.runtime is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s)
        except TimeoutError:
            logger.warning("%d requests still running after the drain timeout", self._in_flight)
        logger.info("stopped serving blocks [%d, %d)", *(self.span_range or (0, 0)))

    # -- announcements ------------------------------------------------------------------

    def record(self) -> HostRecord:
        start, end = self.span_range or (0, 0)
        info = self.runtime.info() if self.runtime else None
        free = info.cache_tokens_free if info else 0
        record = new_host_record(
            self.credentials,
            model=self.settings.model_name,
            start_block=start,
            end_block=end,
            state=self.state,
            addresses=self.addresses,
            ttl_s=self.settings.record_ttl_s,
            started_at_s=self.started_at_s,
        )
        return msgspec.structs.replace(
            record,
            throughput_tokens_per_s=self.throughput_tokens_s,
            free_cache_tokens=free,
            max_session_cache_tokens=info.session_cache_tokens_max if info else 0,
            max_request_tokens=self._limits().max_bulk_tokens,
            dtype=str(self.settings.dtype).removeprefix("torch."),
            quantization="" if self.settings.quantization == "none" else self.settings.quantization,
            version=__version__,
            public_name=self.settings.public_name,
        )

    async def _announce(self) -> None:
        assert self._discovery is not None
        stored = await self._discovery.announce(self.record())
        logger.debug("announced %s for %d blocks", self.state.value, stored)

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.announce_interval_s)
            try:
                await self._announce()
            except Exception as error:  # keep serving; the next round retries
                logger.warning("announce failed: %s", error)

    # -- RPC handlers -------------------------------------------------------------------

    def _server(self) -> RpcServer:
        capabilities = ("inference", "forward", FORWARDING)
        server = RpcServer(HelloReply.local(self.settings.public_name, capabilities))
        server.add_unary(Info, self._info)
        server.add_stream(OpenSession, self._session)
        server.add_stream(RelayStep, self._relays)
        server.add_unary(Forward, self._forward)
        server.add_unary(Backward, self._backward)
        return server

    def _runtime(self) -> SpanRuntime:
        if self.runtime is None or self.state is not HostState.ONLINE:
            raise RemoteBusy(f"host is {self.state.value}, not serving")
        return self.runtime

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """Count a running request (drain waits for none)."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _info(self, request: Decoded, context: CallContext) -> Reply:
        start, end = self.span_range or (0, 0)
        info = self.runtime.info() if self.runtime else None
        return InfoReply(
            model=self.settings.model_name,
            block_start=start,
            block_end=end,
            state=self.state,
            torch_dtype=str(self.settings.dtype).removeprefix("torch."),
            quantization=None
            if self.settings.quantization == "none"
            else self.settings.quantization,
            cache_tokens_left=info.cache_tokens_free if info else 0,
            max_batch_size=self._limits().max_batch_size,
            throughput_tokens_s=self.throughput_tokens_s,
            relays_received=self.inbox.accepted if self.inbox else 0,
            relays_sent=self.next_hops.sent,
            steps=info.steps if info else 0,
            decode_batches=info.batches if info else 0,
            graphs_captured=info.graphs_captured if info else 0,
            step_seconds=info.step_seconds if info else 0.0,
            decode_seconds=info.decode_seconds if info else 0.0,
        )

    async def _session(
        self, first: Decoded, requests: AsyncIterator[Decoded], context: CallContext
    ) -> AsyncGenerator[Reply]:
        request = first.message
        assert isinstance(request, OpenSession)
        runtime = self._runtime()
        peer = short_peer_id(peer_id_from_public_key(context.remote_public_key))
        session_id = await runtime.open_session(
            request.max_length,
            request.batch_size,
            block_range=(request.block_start, request.block_end),
            peer_label=peer,
        )
        inbox = self._inbox()
        inbox.open(session_id, request.batch_size, request.max_length)
        codec = request.reply_codec
        # While an `AwaitStep` waits for its input, the stream's next message is read by a
        # task of its own (its arrival ends the wait); the loop then takes it from there.
        reader: asyncio.Task[Decoded | None] | None = None
        try:
            yield SessionOpened(session_id=session_id, max_length=request.max_length)
            while True:
                if reader is not None:
                    decoded, reader = await reader, None
                else:
                    decoded = await _next_request(requests)
                if decoded is None:
                    return
                match decoded.message:
                    case Step(session_id=step_session) as step:
                        _check_session(step_session, session_id)
                        yield await self._step(
                            session_id, step, decoded.tensors["hidden"], decoded, codec
                        )
                    case AwaitStep(session_id=step_session) as awaited:
                        _check_session(step_session, session_id)
                        reader = asyncio.create_task(_next_request(requests))
                        try:
                            hidden = await self._await_input(session_id, awaited, reader)
                        except RemoteBadRequest as refusal:
                            yield _retry_later(refusal)
                            continue
                        if hidden is None:
                            yield ErrorReply(
                                code=RemoteTimeout.code,
                                message=f"no input from {awaited.previous_peer_id[:12]} for "
                                f"position {awaited.start_position}",
                            )
                            continue
                        yield await self._step(session_id, awaited, hidden, decoded, codec)
                    case CloseSession():
                        yield SessionClosed(session_id=session_id)
                        return
                    case other:
                        raise RemoteBadRequest(f"unexpected {type(other).__name__} in a session")
        finally:
            inbox.close(session_id)
            self.next_hops.forget(session_id)
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            with contextlib.suppress(RemoteError):
                await runtime.close_session(session_id)

    def _inbox(self) -> RelayInbox:
        if self.inbox is None:
            self.inbox = RelayInbox(self._runtime().hidden_size, self.settings.relay_limits)
        return self.inbox

    async def _await_input(
        self,
        session_id: SessionId,
        awaited: AwaitStep,
        reader: asyncio.Task[Decoded | None],
    ) -> torch.Tensor | None:
        """The relayed input the client announced, or None when the stream's next message
        (the client moved on) or the wait's timeout comes first. Raises the refusal of a
        relay from the named previous hop that did not match the announcement."""
        inbox = self._inbox()
        arrived = inbox.expect(
            session_id,
            awaited.start_position,
            awaited.num_tokens,
            awaited.previous_peer_id,
            awaited.nonce,
        )
        waiters: set[asyncio.Future[Any]] = {arrived, reader}
        await asyncio.wait(
            waiters, timeout=inbox.limits.wait_s, return_when=asyncio.FIRST_COMPLETED
        )
        if arrived.done() and not arrived.cancelled():
            return arrived.result()  # or the relay's refusal, raised
        inbox.cancel(session_id)
        return None

    async def _step(
        self,
        session_id: SessionId,
        step: Step | AwaitStep,
        hidden: torch.Tensor,
        decoded: Decoded,
        codec: Codec,
    ) -> Reply:
        """Run one step; relay its output to the request's `next_hop` first, if any."""
        runtime = self._runtime()
        try:
            with self._request():
                out = await runtime.step(
                    session_id,
                    hidden,
                    step.start_position,
                    decoded.tensors.get("padding_mask"),
                    decoded.tensors.get("prompts"),
                )
        except (RemoteBusy, RemoteTimeout) as refusal:
            return _retry_later(refusal)  # the session is as it was
        forward_error = None
        if step.next_hop is not None:
            forward_error = await self._relay_to(
                step.next_hop, step.start_position, out, codec, for_session=session_id
            )
        position = step.start_position + hidden.shape[1]
        return Outgoing(
            StepResult(session_id=session_id, position=position, forward_error=forward_error),
            {"hidden": out},
            codec=codec,
        )

    async def _relay_to(
        self,
        next_hop: NextHop,
        start_position: int,
        out: torch.Tensor,
        codec: Codec,
        *,
        for_session: SessionId,
    ) -> str | None:
        if next_hop.peer_id == self.peer_id:
            return "the next hop named is this host"
        forward_error = await self.next_hops.relay(
            next_hop, start_position, out, codec, for_session=for_session
        )
        if forward_error is None:
            return None
        # The detail stays in the log: per address, it would tell a client which of the
        # addresses it named answer (a port scanner run from this host).
        logger.info("forwarding a step: %s", forward_error)
        return "could not relay to the next hop"

    async def _relays(
        self, first: Decoded, requests: AsyncIterator[Decoded], context: CallContext
    ) -> AsyncGenerator[Reply]:
        """Another host's outputs for our sessions, one `RelayStep` after another on one
        stream (`host.relay`); a refusal is answered and the stream goes on."""
        sender = peer_id_from_public_key(context.remote_public_key)
        decoded: Decoded | None = first
        while decoded is not None:
            message = decoded.message
            if not isinstance(message, RelayStep):
                raise RemoteBadRequest(f"unexpected {type(message).__name__} in a relay stream")
            reply: Reply
            try:
                reply = self._inbox().deliver(sender, message, decoded.tensors["hidden"])
            except RemoteError as refusal:
                reply = _retry_later(refusal)
            yield reply
            decoded = await _next_request(requests)

    async def _forward(self, request: Decoded, context: CallContext) -> Reply:
        message = request.message
        assert isinstance(message, Forward)
        with self._request():
            out = await self._runtime().forward(
                request.tensors["hidden"],
                request.tensors.get("padding_mask"),
                request.tensors.get("prompts"),
                block_range=(message.block_start, message.block_end),
            )
        return Outgoing(ForwardResult(), {"hidden": out}, codec=message.reply_codec)

    async def _backward(self, request: Decoded, context: CallContext) -> Reply:
        message = request.message
        assert isinstance(message, Backward)
        with self._request():
            grad_hidden, grad_prompts = await self._runtime().backward(
                request.tensors["hidden"],
                request.tensors["grad_output"],
                request.tensors.get("padding_mask"),
                request.tensors.get("prompts"),
                block_range=(message.block_start, message.block_end),
            )
        tensors = {"grad_hidden": grad_hidden}
        if grad_prompts is not None:
            tensors["grad_prompts"] = grad_prompts
        return Outgoing(BackwardResult(), tensors, codec=message.reply_codec)
