"""`SwarmEngine`: the API's `EngineClient` over the swarm.

The API process keeps the tokenizer and the client head; every request's chain is an
`InferenceSession` through the hosts (routing, failover and replay included), opened for
exactly the request's batch and length and closed when the request ends, so a client that
disconnects frees the hosts' cache at once. The swarm connection lives on the API's own
event loop. Fine-tuning's differentiable pass goes through `RemoteSpans` (stateless
forward / backward calls to the hosts), from a worker thread whose remote calls come
back to that loop.

This module knows nothing about HTTP or OpenAI schemas.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stamen.api.engine import (
    BlocksFunction,
    ClientSide,
    EngineUnavailable,
    HostView,
    RunOnLoop,
    SwarmSnapshot,
    check_prompts,
)
from stamen.models.base import ClientHead
from stamen.models.loading import load_config, load_head, load_tokenizer
from stamen.models.registry import get_adapter
from stamen.swarm_core.client.autograd import RemoteSpans
from stamen.swarm_core.client.generation import BlockChain
from stamen.swarm_core.client.inference import (
    ROUTE_CACHE_TOKENS,
    InferenceSession,
    InvalidStepError,
)
from stamen.swarm_core.client.remote import SwarmClientError
from stamen.swarm_core.client.routing import BanList, NoRouteError, plan_latency_route
from stamen.swarm_core.client.swarm import ClientSettings, SwarmClient
from stamen.swarm_core.protocol.records import model_name_of
from stamen.transports.base import Credentials
from stamen.transports.factory import SchemeRouter

# Schemes whose addresses name a relay that carries the signalling, not the host itself
# (`webrtc://RELAY_HOST:PORT/PUBLIC_KEY_HEX`): such a host is reached through that relay.
_RELAYED_SCHEMES = frozenset({"webrtc"})


def reachability(addresses: Sequence[str]) -> tuple[str | None, str | None]:
    """`(transport, address_kind)` of a host record's addresses, for the monitor.

    Clients dial addresses in the announced order, so the first one says how a host is
    reached: its scheme is the transport; it is `relayed` when that scheme finds the host
    through a relay named in the address (WebRTC: the SDP offer and answer travel through
    the signalling relay, and whether ICE then finds a direct path or a TURN relay is
    not in the record), else `direct` (the address is the host's own socket). A host
    with no address, or one without a scheme (which nobody can dial): `(None, None)`."""
    scheme, separator, _ = addresses[0].partition("://") if addresses else ("", "", "")
    if not separator:
        return None, None
    return scheme, ("relayed" if scheme in _RELAYED_SCHEMES else "direct")


class SwarmEngine(ClientSide):
    """One model served by the swarm's hosts."""

    def __init__(
        self,
        model_id: str,
        *,
        config: Any,
        tokenizer: Any,
        head: ClientHead,
        swarm: SwarmClient,
    ) -> None:
        super().__init__(model_id, config=config, tokenizer=tokenizer, head=head, flavour="swarm")
        self.swarm = swarm
        self.ban_list = BanList()

    @classmethod
    async def connect(
        cls,
        model_ref: str | Path,
        initial_peers: list[str],
        *,
        model_id: str | None = None,
        dtype: torch.dtype = torch.float32,
        settings: ClientSettings | None = None,
    ) -> SwarmEngine:
        """Load the head and tokenizer (in a thread) and join the swarm."""
        config = await asyncio.to_thread(load_config, model_ref)
        tokenizer = await asyncio.to_thread(load_tokenizer, model_ref)
        head = await asyncio.to_thread(load_head, model_ref, dtype=dtype)
        credentials = Credentials.generate()
        swarm = SwarmClient(
            model_name_of(model_ref),
            get_adapter(config).num_blocks(config),
            SchemeRouter(credentials),
            credentials,
            initial_peers=initial_peers,
            settings=settings,
        )
        await swarm.__aenter__()
        return cls(
            model_id or model_name_of(model_ref),
            config=config,
            tokenizer=tokenizer,
            head=head,
            swarm=swarm,
        )

    @property
    def num_blocks(self) -> int:
        return self.swarm.num_blocks

    async def aclose(self) -> None:
        await self.swarm.aclose()

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why a request could not be served now (None when it could): some blocks have
        no route through hosts that are online, alive, not banned and with free cache."""
        try:
            plan_latency_route(
                self.swarm.hosts(),
                0,
                self.swarm.num_blocks,
                banned=self.ban_list,
                min_cache_tokens=ROUTE_CACHE_TOKENS,
            )
        except NoRouteError as error:
            return str(error)
        return None

    @asynccontextmanager
    async def open_chain(
        self, max_length: int, batch_size: int, *, prompts: Tensor | None = None
    ) -> AsyncIterator[BlockChain]:
        if prompts is not None:
            check_prompts(prompts, self.swarm.num_blocks, batch_size, max_length)
        session = InferenceSession(
            self.swarm,
            0,
            self.swarm.num_blocks,
            max_length,
            batch_size,
            ban_list=self.ban_list,
            prompts=prompts,
        )
        try:
            await session.open()
            yield session
        except InvalidStepError:
            raise  # our own bug, not the swarm's state
        except SwarmClientError as error:
            # No route, or failover gave up: the swarm cannot serve this now (a 503), which
            # is not a server bug (a 500).
            raise EngineUnavailable(str(error)) from error
        finally:
            # Shielded: a cancelled request (client gone) must still free the hosts' cache.
            await asyncio.shield(session.close())

    def blocks_function(self, run: RunOnLoop) -> BlocksFunction:
        spans = RemoteSpans(
            self.swarm,
            0,
            self.swarm.num_blocks,
            ban_list=self.ban_list,
            call_timeout_s=self.swarm.settings.bulk_timeout_s,
        )

        def blocks(hidden: Tensor, prompts: Tensor | None) -> Tensor:
            try:
                return spans.apply(run, hidden, prompts)
            except SwarmClientError as error:
                raise EngineUnavailable(str(error)) from error

        return blocks

    def swarm_snapshot(self) -> SwarmSnapshot:
        hosts = [
            HostView(
                peer_id=record.peer_id,
                start=record.start_block,
                end=record.end_block,
                state=record.state.value,
                public_name=record.public_name or None,
                throughput=record.throughput_tokens_per_s,
                cache_tokens_left=record.free_cache_tokens,
                version=record.version or None,
                transport=transport,
                address_kind=kind,
            )
            for record in self.swarm.records()
            for transport, kind in [reachability(record.addresses)]
        ]
        return SwarmSnapshot.from_hosts(self._model_id, self.swarm.num_blocks, hosts)
