"""Server-to-server forwarding of inference steps: the host's two ends of a `RelayStep`.

A forwarded step crosses a chain of hosts without going back to the client between
them: the client sends hop 0 a `Step` naming its `next_hop`, and every later hop an
`AwaitStep` that names the peer its input comes from. Each host runs its span, relays
its output to the next host, then answers the client with the same output.

- `RelayInbox` is the receiving end. A relayed input is taken only for a session open on
  this host, and handed to that session's step only when the client's `AwaitStep` for
  that position names the sending peer as the previous hop, carries the same nonce (63
  random bits the client chose for this step and hop pair, which the sending host copies
  from its `NextHop`), and the tensor has the shape the session and the `AwaitStep`
  imply. Input that arrives before the client's `AwaitStep` is held for a while
  (`RelayLimits`: a few messages and bytes per session, dropped after `hold_s`); whatever
  does not fit is refused with a typed error, and remembered for as long, so that its
  `AwaitStep` fails at once. The client is the only authority on who may feed a session,
  so a peer that is not the named previous hop can never write into it.
- `NextHops` is the sending end: one pooled, authenticated connection per next peer
  (dialed once, with the key the client's `NextHop` names, which must hash to its peer
  id), at most `max_peers` of them, the least recently used closed first, each with one
  relay stream kept open (`RelayStep` in, `RelayAccepted` or a typed refusal out; a
  refusal keeps the stream). A relay that fails returns its reason as text, which the
  host logs; its answer to the client says only that the relay failed
  (`StepResult.forward_error`), at once, so the client can drive the rest of the step
  itself.

What a client can make a host do with `NextHop`: dial a peer it names, at addresses it
names. The host tries at most `max_dial_addresses` of them, makes at most
`max_dials_per_session` new connections per session and none again to a peer it failed
to reach for that session, and the connection must prove the named key; the client
learns nothing per address. What remains: a client with many sessions can still have
the host make that many connection attempts, and fill the pool with its own peers
(evicting links others use, which are dialed again when needed). The host does not
check the addresses against its own view of the swarm's records: it has none at hand
when it relays (its discovery handle only answers lookups, which would cost a DHT query
per new peer).

This module knows nothing about how steps are computed or about routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from torch import Tensor

from stamen.swarm_core.host.sessions import check_hidden
from stamen.swarm_core.protocol.codecs import Codec
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteBusy,
    RemoteError,
    RemoteNotFound,
    RemoteTooLarge,
    RpcError,
)
from stamen.swarm_core.protocol.identity import peer_id_from_public_key
from stamen.swarm_core.protocol.rpc import RpcClient, RpcStream
from stamen.swarm_core.protocol.wire import (
    Hello,
    NextHop,
    RelayAccepted,
    RelayStep,
    SessionId,
    WireError,
)
from stamen.transports.base import ConnectError, Transport, TransportError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayLimits:
    """What one session may hold of relayed input that arrived before its `AwaitStep`,
    and how long a host waits for relayed input and for the next host."""

    max_held_messages: int = 4
    max_held_bytes: int = 64 << 20
    hold_s: float = 10.0  # held input older than this is dropped
    wait_s: float = 30.0  # an `AwaitStep` without its input is answered `timeout`
    max_peers: int = 32  # pooled connections to next hops
    connect_timeout_s: float = 5.0
    relay_timeout_s: float = 10.0  # one `RelayStep`, until the next host accepts it
    max_dials_per_session: int = 4  # new connections one client session may have us dial
    max_dial_addresses: int = 4  # of a `NextHop`'s addresses, the first ones are tried


@dataclass
class _Held:
    sender: str
    start_position: int
    nonce: int
    hidden: Tensor
    received_s: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()


@dataclass
class _Expected:
    start_position: int
    num_tokens: int
    previous_peer_id: str
    nonce: int
    arrived: asyncio.Future[Tensor]


@dataclass(frozen=True)
class _Refused:
    """A relay this host refused, kept a while so that the `AwaitStep` for it fails at
    once instead of waiting `wait_s` for input that will not come."""

    sender: str
    start_position: int
    nonce: int
    reason: str
    refused_s: float = field(default_factory=time.monotonic)


@dataclass
class _Mailbox:
    batch_size: int
    max_length: int
    expected: _Expected | None = None
    held: list[_Held] = field(default_factory=list)
    refused: deque[_Refused] = field(default_factory=lambda: deque(maxlen=8))


class RelayInbox:
    """Relayed inputs for this host's open sessions (module docstring)."""

    def __init__(self, hidden_size: int, limits: RelayLimits | None = None) -> None:
        self.hidden_size = hidden_size
        self.limits = limits or RelayLimits()
        self.accepted = 0  # relayed inputs handed to a step
        self._boxes: dict[SessionId, _Mailbox] = {}

    def open(self, session_id: SessionId, batch_size: int, max_length: int) -> None:
        self._boxes[session_id] = _Mailbox(batch_size, max_length)

    def close(self, session_id: SessionId) -> None:
        box = self._boxes.pop(session_id, None)
        if box is not None and box.expected is not None:
            box.expected.arrived.cancel()

    def expect(
        self,
        session_id: SessionId,
        start_position: int,
        num_tokens: int,
        previous_peer_id: str,
        nonce: int,
    ) -> asyncio.Future[Tensor]:
        """The input the client announced (`AwaitStep`): done at once when it is held,
        failed at once when this host refused it a moment ago."""
        box = self._box(session_id)
        self.cancel(session_id)
        arrived: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        expected = _Expected(start_position, num_tokens, previous_peer_id, nonce, arrived)
        box.expected = expected
        held, box.held = box.held, []  # anything else held is stale or not from that peer
        now_s = time.monotonic()
        for item in held:
            fresh = now_s - item.received_s <= self.limits.hold_s
            if fresh and self._matches(expected, item.sender, item.start_position, item.hidden):
                if item.nonce == nonce:
                    self._hand_over(box, item.hidden)
                    break
        for refused in box.refused:
            if now_s - refused.refused_s <= self.limits.hold_s and (
                refused.sender,
                refused.start_position,
                refused.nonce,
            ) == (previous_peer_id, start_position, nonce):
                arrived.set_exception(
                    RemoteBadRequest(f"the relayed input was refused: {refused.reason}")
                )
                box.expected = None
                break
        return arrived

    def cancel(self, session_id: SessionId) -> None:
        """Stop waiting for the session's announced input (the client moved on)."""
        box = self._boxes.get(session_id)
        if box is not None and box.expected is not None:
            box.expected.arrived.cancel()
            box.expected = None

    def deliver(self, sender: str, request: RelayStep, hidden: Tensor) -> RelayAccepted:
        """Take a `RelayStep` from `sender`; raises the typed refusal otherwise (and
        remembers it for a while, for the `AwaitStep` of that step)."""
        box = self._box(request.session_id)
        try:
            return self._deliver(box, sender, request, hidden)
        except RemoteError as refusal:
            box.refused.append(
                _Refused(sender, request.start_position, request.nonce, refusal.message[:200])
            )
            raise

    def _deliver(
        self, box: _Mailbox, sender: str, request: RelayStep, hidden: Tensor
    ) -> RelayAccepted:
        hidden = check_hidden(hidden, hidden_size=self.hidden_size, batch_size=box.batch_size)
        if request.start_position + hidden.shape[1] > box.max_length:
            raise RemoteTooLarge(
                f"relayed step ends at {request.start_position + hidden.shape[1]}, past the "
                f"session's max_length {box.max_length}"
            )
        expected = box.expected
        if expected is not None and not expected.arrived.done() and expected.nonce == request.nonce:
            if expected.previous_peer_id != sender:
                raise RemoteBadRequest(
                    f"{sender[:12]} is not the previous hop the client named for this step"
                )
            if not self._matches(expected, sender, request.start_position, hidden):
                refusal = RemoteBadRequest(
                    f"relayed step at {request.start_position} x {hidden.shape[1]} tokens; the "
                    f"client announced {expected.start_position} x {expected.num_tokens}"
                )
                # The named previous hop sent what the client did not announce: the step it
                # awaits fails now, so that the client drives it instead of waiting.
                expected.arrived.set_exception(refusal)
                box.expected = None
                raise refusal
            self._hand_over(box, hidden)
            return RelayAccepted()
        # Not the awaited step (a later one that came first, or a stale one): held, and
        # only ever handed to the `AwaitStep` with its nonce.
        self._hold(box, _Held(sender, request.start_position, request.nonce, hidden))
        return RelayAccepted()

    def _box(self, session_id: SessionId) -> _Mailbox:
        box = self._boxes.get(session_id)
        if box is None:
            raise RemoteNotFound(f"no open session {session_id!r} on this host")
        return box

    @staticmethod
    def _matches(expected: _Expected, sender: str, start_position: int, hidden: Tensor) -> bool:
        return (
            sender == expected.previous_peer_id
            and start_position == expected.start_position
            and hidden.shape[1] == expected.num_tokens
        )

    def _hand_over(self, box: _Mailbox, hidden: Tensor) -> None:
        assert box.expected is not None
        box.expected.arrived.set_result(hidden)
        box.expected = None
        self.accepted += 1

    def _hold(self, box: _Mailbox, item: _Held) -> None:
        now_s = time.monotonic()
        box.held = [h for h in box.held if now_s - h.received_s <= self.limits.hold_s]
        if item.nbytes > self.limits.max_held_bytes:
            raise RemoteTooLarge(
                f"relayed step of {item.nbytes} bytes > {self.limits.max_held_bytes} held per "
                "session"
            )
        held_bytes = sum(h.nbytes for h in box.held) + item.nbytes
        if (
            len(box.held) >= self.limits.max_held_messages
            or held_bytes > self.limits.max_held_bytes
        ):
            raise RemoteBusy("too many relayed steps held for this session", retry_after_s=0.1)
        box.held.append(item)


@dataclass
class _Link:
    """One next peer: its connection, and one relay stream kept open on it (a stream per
    relay would cost a stream's opening and closing on every step). Relays are sent
    without waiting for their answers, which a reader task collects in order: the
    sending host answers its client while the next host already computes."""

    rpc: RpcClient
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stream: RpcStream | None = None
    stack: contextlib.AsyncExitStack | None = None
    reader: asyncio.Task[None] | None = None
    answers: deque[asyncio.Future[object]] = field(default_factory=deque)

    async def send(
        self, message: RelayStep, hidden: Tensor, codec: Codec, timeout_s: float
    ) -> asyncio.Future[object]:
        """Send one `RelayStep` on the link's stream (opened if need be); the future gets
        its answer (`RelayAccepted`, or the refusal or failure as an exception)."""
        async with self.lock:
            if self.stream is None:
                stack = contextlib.AsyncExitStack()
                stream = await stack.enter_async_context(self.rpc.open_stream(timeout_s=timeout_s))
                self.stream, self.stack = stream, stack
                self.reader = asyncio.create_task(self._read(stream))
            answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            self.answers.append(answer)
            try:
                await self.stream.send(
                    message, {"hidden": hidden}, codec=codec, timeout_s=timeout_s
                )
            except BaseException:
                await self.drop()
                raise
            return answer

    async def _read(self, stream: RpcStream) -> None:
        try:
            while True:
                try:
                    result: object = (await stream.recv(timeout_s=86400.0)).message
                except RemoteError as refusal:  # answered; the stream goes on
                    result = refusal
                if self.answers:
                    answer = self.answers.popleft()  # its answer, even if no one waits now
                    if not answer.done():
                        answer.set_result(result)
        except BaseException as error:  # the stream ended: nothing more will be answered
            self._fail_pending(error)
            if self.stream is stream:
                stack, self.stream, self.stack = self.stack, None, None
                stream.reset()
                if stack is not None:  # give the stream's slot back
                    with contextlib.suppress(Exception):
                        await stack.aclose()
            if isinstance(error, asyncio.CancelledError):
                raise

    def _fail_pending(self, error: BaseException) -> None:
        answers, self.answers = self.answers, deque()
        for answer in answers:
            if not answer.done():
                answer.set_result(error)

    async def drop(self) -> None:
        stream, stack, self.stream, self.stack = self.stream, self.stack, None, None
        reader, self.reader = self.reader, None
        if stream is not None:
            stream.reset()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._fail_pending(ConnectionResetError("relay stream dropped"))
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()


_RELAY_FAILURES = (RpcError, TransportError, WireError, TimeoutError, OSError)


class NextHops:
    """Pooled connections to next hops, and the relay of one step's output (docstring)."""

    def __init__(self, transport: Transport, hello: Hello, limits: RelayLimits | None = None):
        self._transport = transport
        self._hello = hello
        self.limits = limits or RelayLimits()
        self.sent = 0  # relays the next host accepted
        self._links: OrderedDict[str, _Link] = OrderedDict()
        self._dialing: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()  # evicted links, closing; watches
        self._dials: dict[SessionId, int] = {}  # new connections each session had us make
        self._failed_dials: set[tuple[SessionId, str]] = set()  # (session, unreachable peer)

    def forget(self, session_id: SessionId) -> None:
        """The session closed: its dial budget goes with it."""
        self._dials.pop(session_id, None)
        self._failed_dials = {key for key in self._failed_dials if key[0] != session_id}

    def _spend_dial(self, peer_id: str, session_id: SessionId) -> str | None:
        """Why `session_id` may not have this host dial `peer_id`, or None (a pooled
        link costs nothing). A few dials per session, and none again to a peer that could
        not be reached for it: a client cannot use this host to probe many addresses, and
        one whose next hop is unreachable is told so at once (it then drives that pair
        itself)."""
        link = self._links.get(peer_id)
        if link is not None and not link.rpc.connection.is_closed:
            return None
        if (session_id, peer_id) in self._failed_dials:
            return f"no more dials to {peer_id[:12]} for this session: one failed"
        dials = self._dials.get(session_id, 0)
        if dials >= self.limits.max_dials_per_session:
            return f"no more dials for this session: {dials} made"
        self._dials[session_id] = dials + 1
        return None

    async def relay(
        self,
        next_hop: NextHop,
        start_position: int,
        hidden: Tensor,
        codec: Codec,
        *,
        for_session: SessionId,
    ) -> str | None:
        """Send `hidden` to `next_hop`'s session; None when it was accepted, else why not
        (for the log: it names addresses). `for_session` is this host's session whose
        client named `next_hop`: it pays for any new connection (`_spend_dial`)."""
        if peer_id_from_public_key(next_hop.public_key) != next_hop.peer_id:
            return f"the key named for {next_hop.peer_id[:12]} is not that peer's"
        refusal = self._spend_dial(next_hop.peer_id, for_session)
        if refusal is not None:
            return refusal
        message = RelayStep(
            session_id=next_hop.session_id, start_position=start_position, nonce=next_hop.nonce
        )
        hidden = hidden.contiguous()
        timeout_s = self.limits.relay_timeout_s
        try:
            link = await self._link(next_hop)
            try:
                answer = await link.send(message, hidden, codec, timeout_s)
            except _RELAY_FAILURES:
                if link.rpc.connection.is_closed:
                    raise
                # The connection is up: the stream may have lapsed while idle. Once more.
                answer = await link.send(message, hidden, codec, timeout_s)
        except _RELAY_FAILURES as error:
            if isinstance(error, ConnectError):
                self._failed_dials.add((for_session, next_hop.peer_id))
            return f"relay to {next_hop.peer_id[:12]} failed: {type(error).__name__}: {error}"
        self.sent += 1
        watch = asyncio.create_task(self._watch(next_hop.peer_id, answer))
        self._closing.add(watch)
        watch.add_done_callback(self._closing.discard)
        return None

    async def _watch(self, peer_id: str, answer: asyncio.Future[object]) -> None:
        """Log a relay the next host refused or never answered. The client learns of it
        from that host (which fails the step it awaits) or from losing it."""
        # Not `wait_for`: cancelling the answer on timeout would make its late arrival
        # look like the end of the stream that other sessions' relays share.
        await asyncio.wait({answer}, timeout=self.limits.relay_timeout_s)
        result = answer.result() if answer.done() else TimeoutError("no answer")
        if not isinstance(result, RelayAccepted):
            logger.info("relay to %s not taken: %r", peer_id[:12], result)

    async def _link(self, next_hop: NextHop) -> _Link:
        peer_id = next_hop.peer_id
        lock = self._dialing.setdefault(peer_id, asyncio.Lock())
        async with lock:  # dial each peer once, however many sessions relay to it
            link = self._links.get(peer_id)
            if link is not None and not link.rpc.connection.is_closed:
                self._links.move_to_end(peer_id)
                return link
            if link is not None:
                del self._links[peer_id]
                self._close_later(link)
            try:
                rpc = await self._dial(next_hop)
            except BaseException:
                if peer_id not in self._links and self._dialing.get(peer_id) is lock:
                    del self._dialing[peer_id]  # no link: no lock kept for it either
                raise
            racer = self._links.get(peer_id)  # dialed under a lock dropped by an eviction
            if racer is not None and not racer.rpc.connection.is_closed:
                self._close_later(_Link(rpc))
                return racer
            link = _Link(rpc)
            self._links[peer_id] = link
            if racer is not None:
                self._close_later(racer)
            while len(self._links) > self.limits.max_peers:
                evicted, oldest = self._links.popitem(last=False)
                evicted_lock = self._dialing.get(evicted)
                if evicted_lock is not None and not evicted_lock.locked():
                    del self._dialing[evicted]
                self._close_later(oldest)
            return link

    def _close_later(self, link: _Link) -> None:
        closing = asyncio.create_task(self._close(link))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(link: _Link) -> None:
        await link.drop()
        with contextlib.suppress(Exception):
            await link.rpc.close()

    async def _dial(self, next_hop: NextHop) -> RpcClient:
        errors: list[str] = []
        for address in next_hop.addresses[: self.limits.max_dial_addresses]:
            try:
                return await RpcClient.connect(
                    self._transport,
                    address,
                    self._hello,
                    expected_public_key=next_hop.public_key,
                    timeout_s=self.limits.connect_timeout_s,
                )
            except (*_RELAY_FAILURES, ValueError) as e:
                errors.append(f"{address[:80]}: {type(e).__name__}: {e}")
        raise ConnectError("; ".join(errors) or "no address")

    async def aclose(self) -> None:
        links, self._links = list(self._links.values()), OrderedDict()
        for link in links:
            await self._close(link)
        await asyncio.gather(*self._closing, return_exceptions=True)
