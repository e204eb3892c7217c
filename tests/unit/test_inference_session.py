"""InferenceSession against in-memory fake hosts: failover, replay, rollback, closing.

Each fake block keeps a per-session cache of its inputs and computes, exactly in int64,

    out[t] = x[t] * (i + 3) + sum(x[s] for real s <= t) + position(t) * (i + 1)   (mod P)

so a replacement host whose cache was not rebuilt, rebuilt at wrong positions, or with the
wrong padding mask, gives different outputs than an undisturbed run. Deep prompts are added
to `x` at positions [0, P) before each block, as real hosts do, so prompts that were not
sent (or sent for the wrong blocks or positions) change the outputs too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from stamen.swarm_core.client.inference import (
    InferenceSession,
    InvalidStepError,
    SessionFailedError,
)
from stamen.swarm_core.client.remote import (
    HopError,
    HopSession,
    HostBusy,
    HostInfo,
    Incarnation,
    SpanClient,
)
from stamen.swarm_core.client.routing import BanList

P = 1_000_003
B, C = 2, 4
NUM_BLOCKS = 8


def block_fn(i: int, inputs: Tensor, mask: Tensor, position: int, T: int) -> Tensor:
    """Outputs for the last `T` of `inputs` (B, S, C), S = position + T."""
    prefix = torch.cumsum(inputs * mask[..., None], dim=1)[:, position:]  # (B, T, C)
    positions = torch.arange(position, position + T)[None, :, None]  # (1, T, 1)
    return (inputs[:, position:] * (i + 3) + prefix + positions * (i + 1)) % P


def with_prompt(hidden: Tensor, prompt: Tensor | None, position: int) -> Tensor:
    """`hidden` (B, T, C) at positions from `position`, plus `prompt` (B or 1, P, C) where
    the step covers positions below P."""
    if prompt is None or position >= prompt.shape[1]:
        return hidden
    n = min(prompt.shape[1], position + hidden.shape[1]) - position
    out = hidden.clone()
    out[:, :n] += prompt[:, position : position + n]
    return out


def reference(
    hidden: Tensor,
    mask: Tensor | None = None,
    start: int = 0,
    end: int = NUM_BLOCKS,
    prompts: Tensor | None = None,
) -> Tensor:
    """The whole sequence (B, S, C) through blocks [start, end) in one go; `prompts`
    (end - start, B or 1, P, C)."""
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask
    for i in range(start, end):
        prompt = None if prompts is None else prompts[i - start]
        hidden = block_fn(i, with_prompt(hidden, prompt, 0), mask, 0, hidden.shape[1])
    return hidden


@dataclass
class FakeHost(SpanClient):
    info: HostInfo
    fail_at_step: int | None = None  # dies (for good) on this step, counted across sessions
    busy: bool = False
    busy_steps: int = 0  # refuses this many steps as busy (without running them) first
    wrong_shape: bool = False
    hang_at_step: int | None = None  # never answers this step nor any close
    steps: list[tuple[int, int]] = field(default_factory=list)  # (start_position, T)
    prompted: list[bool] = field(default_factory=list)  # per step: were prompts sent
    sessions: list[FakeHopSession] = field(default_factory=list)
    dead: bool = False

    @property
    def peer_id(self) -> str:
        return self.info.peer_id

    async def open_session(
        self, start: int, end: int, max_length: int, batch_size: int
    ) -> HopSession:
        if self.dead:
            raise HopError("connection lost")
        if self.busy:
            raise HostBusy("no free cache")
        if not self.info.start <= start < end <= self.info.end:
            raise HopError(f"blocks [{start}, {end}) not served here")
        session = FakeHopSession(self, start, end, max_length, batch_size)
        self.sessions.append(session)
        return session

    async def forward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        return reference(hidden, padding_mask, start, end, prompts)

    async def backward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        grad_output: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError("inference sessions never call backward")


class FakeHopSession(HopSession):
    def __init__(self, host: FakeHost, start: int, end: int, max_length: int, batch: int):
        self.host, self.start, self.end = host, start, end
        self.inputs = [
            torch.zeros(batch, max_length, C, dtype=torch.long) for _ in range(end - start)
        ]
        self.mask = torch.ones(batch, max_length, dtype=torch.bool)
        self.length = 0  # tokens in the cache
        self.closed = False

    async def step(
        self,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
    ) -> Tensor:
        host = self.host
        if host.busy_steps > 0:
            host.busy_steps -= 1
            raise HostBusy("no room to grow the cache", retry_after_s=0.0)
        host.steps.append((start_position, hidden.shape[1]))
        host.prompted.append(prompts is not None)
        # Not a HopError: a session sending another span's prompts is a bug, not a failure.
        assert prompts is None or prompts.shape[0] == self.end - self.start
        if host.hang_at_step == len(host.steps):
            host.dead = True
            await asyncio.sleep(3600)
        if host.fail_at_step == len(host.steps):
            host.dead = True
        if host.dead or self.closed:
            raise HopError("connection lost")
        if start_position > self.length:
            raise HopError(f"remote: start_position {start_position} > cache {self.length}")
        T = hidden.shape[1]
        end = start_position + T
        self.mask[:, start_position:end] = True if padding_mask is None else padding_mask
        for k, inputs in enumerate(self.inputs):
            prompt = None if prompts is None else prompts[k]
            inputs[:, start_position:end] = with_prompt(hidden, prompt, start_position)
            hidden = block_fn(
                self.start + k, inputs[:, :end], self.mask[:, :end], start_position, T
            )
        self.length = end
        return hidden[..., :-1] if host.wrong_shape else hidden

    async def close(self) -> None:
        if self.host.hang_at_step is not None and self.host.dead:
            await asyncio.sleep(3600)
        self.closed = True
        if self.host.dead:
            raise HopError("connection lost")


class FakeSwarm:
    def __init__(self, *hosts: FakeHost | SpanHost) -> None:
        self.by_id = {h.peer_id: h for h in hosts}
        self.refreshes = 0
        self.on_refresh: list[FakeHost] = []  # hosts that appear at the next refresh

    def hosts(self) -> list[HostInfo]:
        return [h.info for h in self.by_id.values()]

    async def connect(self, peer_id: str) -> SpanClient:
        return self.by_id[peer_id]

    async def refresh(self, max_age_s: float = 0.0) -> None:
        self.refreshes += 1
        for host in self.on_refresh:
            self.by_id[host.peer_id] = host
        self.on_refresh = []


def fake(peer_id: str, start: int, end: int, *, throughput: float = 1000.0, **kw) -> FakeHost:
    return FakeHost(HostInfo(peer_id, start, end, throughput, free_cache_tokens=10_000), **kw)


def inc(peer_id: str) -> Incarnation:
    return Incarnation(peer_id, 0.0)


def tokens(T: int, seed: int) -> Tensor:
    return torch.randint(0, 100, (B, T, C), generator=torch.Generator().manual_seed(seed))


def session(swarm: FakeSwarm, num_blocks: int = NUM_BLOCKS, **kw) -> InferenceSession:
    kw.setdefault("retry_delay_s", 0.0)
    return InferenceSession(swarm, 0, num_blocks, max_length=32, batch_size=B, **kw)


async def generate(s: InferenceSession, steps: list[Tensor]) -> list[Tensor]:
    return [await s.step(x) for x in steps]


def prefill_and_decode(num_decode: int = 6) -> list[Tensor]:
    return [tokens(3, 0)] + [tokens(1, k) for k in range(1, num_decode + 1)]


def expected(steps: list[Tensor]) -> list[Tensor]:
    full = reference(torch.cat(steps, dim=1))
    bounds = torch.tensor([0] + [x.shape[1] for x in steps]).cumsum(0).tolist()
    return [full[:, a:b] for a, b in zip(bounds, bounds[1:])]


def assert_same(outputs: list[Tensor], wanted: list[Tensor]) -> None:
    assert len(outputs) == len(wanted)
    for got, want in zip(outputs, wanted):
        assert torch.equal(got, want)


def route_of(s: InferenceSession) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start, hop.end) for hop in s.route]


async def test_undisturbed_run_matches_the_whole_model() -> None:
    swarm = FakeSwarm(fake("a", 0, 3), fake("b", 3, 6), fake("c", 5, 8, throughput=500.0))
    steps = prefill_and_decode()
    async with session(swarm) as s:
        assert route_of(s) == [("a", 0, 3), ("b", 3, 6), ("c", 6, 8)]
        assert_same(await generate(s, steps), expected(steps))
        assert s.position == 9


async def test_host_dying_mid_generation_is_replaced_with_identical_outputs() -> None:
    steps = prefill_and_decode()
    healthy = FakeSwarm(fake("a", 0, 4), fake("b", 4, 8))
    async with session(healthy) as s:
        undisturbed = await generate(s, steps)

    dying = fake("b", 4, 8, fail_at_step=5)
    backup = fake("backup", 2, 8, throughput=100.0)  # slower: not chosen at first
    bans = BanList()
    async with session(FakeSwarm(fake("a", 0, 4), dying, backup), ban_list=bans) as s:
        assert route_of(s) == [("a", 0, 4), ("b", 4, 8)]
        outputs = await generate(s, steps)
        assert route_of(s) == [("a", 0, 4), ("backup", 4, 8)]
    assert_same(outputs, undisturbed)
    assert_same(outputs, expected(steps))
    assert inc("b") in bans and bans.strikes(inc("b")) == 1
    assert dying.sessions[0].closed  # closing the dead hop was attempted
    # The 6 tokens the dead host had seen are replayed in one step, then decoding goes on.
    assert backup.steps == [(0, 6), (6, 1), (7, 1), (8, 1)]
    assert all(session.closed for session in backup.sessions)


async def test_replacement_may_take_several_hosts() -> None:
    swarm = FakeSwarm(
        fake("a", 0, 2),
        fake("big", 2, 8, fail_at_step=3),
        fake("r1", 2, 5, throughput=500.0),
        fake("r2", 5, 8, throughput=500.0),
    )
    steps = prefill_and_decode(4)
    async with session(swarm) as s:
        outputs = await generate(s, steps)
        assert route_of(s) == [("a", 0, 2), ("r1", 2, 5), ("r2", 5, 8)]
    assert_same(outputs, expected(steps))


async def test_wrong_shape_reply_counts_as_a_failure() -> None:
    liar = fake("liar", 0, 8, wrong_shape=True)
    swarm = FakeSwarm(liar, fake("a", 0, 4, throughput=100.0), fake("b", 4, 8, throughput=100.0))
    bans = BanList()
    steps = prefill_and_decode(3)
    async with session(swarm, ban_list=bans) as s:
        outputs = await generate(s, steps)
        assert route_of(s) == [("a", 0, 4), ("b", 4, 8)]
    assert_same(outputs, expected(steps))
    assert inc("liar") in bans


async def test_busy_host_is_routed_around_and_never_banned() -> None:
    bans = BanList()
    swarm = FakeSwarm(fake("busy", 0, 8, busy=True), fake("a", 0, 4), fake("b", 4, 8))
    steps = prefill_and_decode(2)
    async with session(swarm, ban_list=bans) as s:
        assert route_of(s) == [("a", 0, 4), ("b", 4, 8)]
        assert_same(await generate(s, steps), expected(steps))
    assert inc("busy") not in bans and bans.strikes(inc("busy")) == 0


async def test_busy_only_replica_is_waited_for_until_it_has_room() -> None:
    full = fake("full", 4, 8, busy=True)
    swarm = FakeSwarm(fake("a", 0, 4), full)
    bans = BanList()

    async def room_frees_later() -> None:
        await asyncio.sleep(0.2)
        full.busy = False

    steps = prefill_and_decode(2)
    freeing = asyncio.create_task(room_frees_later())
    async with session(swarm, ban_list=bans, retry_delay_s=0.05) as s:
        assert route_of(s) == [("a", 0, 4), ("full", 4, 8)]
        assert_same(await generate(s, steps), expected(steps))
    await freeing
    assert inc("full") not in bans
    assert swarm.refreshes >= 1  # no route: the view was re-read while waiting


async def test_a_step_refused_as_busy_is_retried_on_the_same_session() -> None:
    crowded = fake("b", 4, 8)
    swarm = FakeSwarm(fake("a", 0, 4), crowded, fake("backup", 4, 8, throughput=100.0))
    bans = BanList()
    steps = prefill_and_decode(3)
    async with session(swarm, ban_list=bans) as s:
        await s.step(steps[0])
        crowded.busy_steps = 3
        outputs = [await s.step(step) for step in steps[1:]]
        assert route_of(s) == [("a", 0, 4), ("b", 4, 8)]  # not moved, not banned
    assert inc("b") not in bans
    assert len(crowded.sessions) == 1
    assert_same(outputs, expected(steps)[1:])


async def test_failover_waits_for_a_host_that_restarts_within_the_deadline() -> None:
    steps = prefill_and_decode(2)
    swarm = FakeSwarm(fake("a", 0, 4), fake("b", 4, 8, fail_at_step=2))
    async with session(swarm, retry_delay_s=0.05, failover_timeout_s=5.0) as s:
        await s.step(steps[0])
        # b dies for good; its new incarnation shows up in the DHT a little later

        async def restart() -> None:
            await asyncio.sleep(0.3)
            swarm.on_refresh = [FakeHost(HostInfo("b", 4, 8, 1000.0, 10_000, started_at_s=1.0))]

        restarting = asyncio.create_task(restart())
        out = await s.step(steps[1])
        await restarting
        assert route_of(s) == [("a", 0, 4), ("b", 4, 8)]
    assert_same([out], expected(steps)[1:2])
    assert swarm.refreshes >= 2


async def test_a_session_larger_than_every_hosts_cap_fails_at_once() -> None:
    capped = FakeHost(HostInfo("a", 0, 8, 1000.0, 10_000, max_session_cache_tokens=16))
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(SessionFailedError, match="sessions limited to 16 cache tokens"):
        async with session(FakeSwarm(capped), failover_timeout_s=30.0):  # 32 x 2 > 16
            pass
    assert loop.time() - began < 1.0


async def test_failover_gives_up_at_its_deadline_not_after_a_count() -> None:
    swarm = FakeSwarm(fake("a", 0, 4), fake("only", 4, 8, fail_at_step=2))
    loop = asyncio.get_running_loop()
    async with session(swarm, retry_delay_s=0.05, failover_timeout_s=0.5) as s:
        await s.step(tokens(3, 0))
        began = loop.time()
        with pytest.raises(SessionFailedError, match=r"no usable host serves blocks \[4, 8\)"):
            await s.step(tokens(1, 1))
    assert 0.45 <= loop.time() - began < 2.0
    assert swarm.refreshes >= 3  # kept re-reading the view, not a few quick attempts


async def test_host_that_stops_answering_times_out_and_is_replaced() -> None:
    sleepy = fake("sleepy", 4, 8, hang_at_step=2)
    swarm = FakeSwarm(fake("a", 0, 4), sleepy, fake("backup", 4, 8, throughput=100.0))
    steps = prefill_and_decode(3)
    async with session(swarm, step_timeout_s=0.2, close_timeout_s=0.05) as s:
        outputs = await generate(s, steps)
        assert route_of(s) == [("a", 0, 4), ("backup", 4, 8)]
    assert_same(outputs, expected(steps))


async def test_exhausted_retries_name_the_blocks_and_the_causes() -> None:
    swarm = FakeSwarm(
        fake("a", 0, 4),
        fake("b1", 4, 8, fail_at_step=2),
        fake("b2", 4, 8, throughput=500.0, fail_at_step=1),
        fake("b3", 4, 8, throughput=100.0, fail_at_step=1),
    )
    async with session(swarm, max_retries=2) as s:
        await s.step(tokens(3, 0))
        with pytest.raises(SessionFailedError) as info:
            await s.step(tokens(1, 1))
        assert (info.value.start, info.value.end) == (4, 8)
        assert "blocks [4, 8)" in str(info.value)
        assert [c.split(":")[0] for c in info.value.causes] == ["b1", "b2", "b3"]
        with pytest.raises(SessionFailedError):  # a failed session stays failed
            await s.step(tokens(1, 1))


async def test_no_host_left_for_the_blocks_fails_with_the_routing_reason() -> None:
    swarm = FakeSwarm(fake("a", 0, 4), fake("only", 4, 8, fail_at_step=2))
    async with session(swarm, max_retries=1) as s:
        await s.step(tokens(3, 0))
        with pytest.raises(SessionFailedError, match=r"no usable host serves blocks \[4, 8\)"):
            await s.step(tokens(1, 1))


async def test_opening_without_a_route_fails() -> None:
    swarm = FakeSwarm(fake("a", 0, 4), fake("b", 5, 8))
    with pytest.raises(SessionFailedError, match="block 4"):
        async with session(swarm, max_retries=1):
            pass


async def test_rollback_truncates_history_before_a_later_replay() -> None:
    backup = fake("backup", 4, 8, throughput=100.0)
    swarm = FakeSwarm(fake("a", 0, 4), fake("b", 4, 8, fail_at_step=5), backup)
    first = [tokens(5, 0), tokens(1, 1), tokens(1, 2)]
    async with session(swarm) as s:
        await generate(s, first)
        assert s.position == 7
        # Take back the last 4 tokens and go another way; then "b" dies and the replay to
        # "backup" must carry only the 3 kept tokens plus the new ones.
        edited = [first[0][:, :3], tokens(2, 9)]
        out = await s.step(edited[1], start_position=3)
        assert s.position == 5
        last = await s.step(tokens(1, 10))
        assert route_of(s)[-1][0] == "backup"
    assert backup.steps[0] == (0, 5)
    want = expected([*edited, tokens(1, 10)])
    assert torch.equal(out, want[1]) and torch.equal(last, want[2])


async def test_padding_mask_is_replayed_with_the_history() -> None:
    swarm = FakeSwarm(
        fake("a", 0, 4), fake("b", 4, 8, fail_at_step=3), fake("backup", 4, 8, throughput=100.0)
    )
    prompt = tokens(4, 0)
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    steps = [prompt, tokens(1, 1), tokens(1, 2), tokens(1, 3)]
    async with session(swarm) as s:
        outputs = [await s.step(prompt, mask)] + [await s.step(x) for x in steps[1:]]
        assert route_of(s)[-1][0] == "backup"
    full_mask = torch.cat([mask, torch.ones(B, 3, dtype=torch.bool)], dim=1)
    want = reference(torch.cat(steps, dim=1), full_mask)
    assert torch.equal(torch.cat(outputs, dim=1), want)


async def test_invalid_steps_are_refused_before_reaching_hosts() -> None:
    b = fake("b", 0, 8)
    async with session(FakeSwarm(b)) as s:
        with pytest.raises(InvalidStepError, match="hidden must be"):
            await s.step(torch.zeros(B + 1, 1, C, dtype=torch.long))
        with pytest.raises(InvalidStepError, match="start_position"):
            await s.step(tokens(1, 0), start_position=1)
        with pytest.raises(InvalidStepError, match="max_length"):
            await s.step(torch.zeros(B, 33, C, dtype=torch.long))
        with pytest.raises(InvalidStepError, match="padding_mask"):
            await s.step(tokens(2, 0), torch.ones(B, 3, dtype=torch.bool))
        await s.step(tokens(2, 0))
        with pytest.raises(InvalidStepError, match="hidden size"):
            await s.step(torch.zeros(B, 1, C + 1, dtype=torch.long))
    assert b.steps == [(0, 2)]


async def test_closing_closes_every_hop_even_when_one_host_hangs() -> None:
    a, b = fake("a", 0, 4), fake("b", 4, 8, hang_at_step=99)
    async with session(FakeSwarm(a, b), close_timeout_s=0.05) as s:
        await s.step(tokens(2, 0))
        b.dead = True  # its close now hangs; the session must not wait forever
    assert a.sessions[0].closed
    assert not b.sessions[0].closed
    assert s.route == []


# -- deep prompts ---------------------------------------------------------------------

PRE_SEQ_LEN = 4


def deep_prompts(batch: int = 1, num_blocks: int = NUM_BLOCKS, seed: int = 9) -> Tensor:
    """(num_blocks, batch, P, C): distinct per block, so a wrong slice shows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (num_blocks, batch, PRE_SEQ_LEN, C), generator=generator)


def expected_with(prompts: Tensor, steps: list[Tensor]) -> list[Tensor]:
    full = reference(torch.cat(steps, dim=1), prompts=prompts)
    bounds = torch.tensor([0] + [x.shape[1] for x in steps]).cumsum(0).tolist()
    return [full[:, a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("batch", [1, B], ids=["shared", "per-row"])
async def test_deep_prompts_give_the_whole_models_outputs(batch: int) -> None:
    prompts = deep_prompts(batch)
    steps = prefill_and_decode()  # a prefill of 3 < P: the first decode step is prompted too
    swarm = FakeSwarm(fake("a", 0, 3), fake("b", 3, 6), fake("c", 5, 8, throughput=500.0))
    async with session(swarm, prompts=prompts) as s:
        outputs = await generate(s, steps)
    assert_same(outputs, expected_with(prompts, steps))
    assert not torch.equal(outputs[0], expected(steps)[0])  # the prompts did change them


async def test_decode_steps_past_the_prompts_send_none() -> None:
    a, b = fake("a", 0, 4), fake("b", 4, 8)
    async with session(FakeSwarm(a, b), prompts=deep_prompts()) as s:
        await generate(s, [tokens(5, 0), tokens(1, 1), tokens(1, 2)])
        await s.step(tokens(2, 3), start_position=2)  # a rollback below P sends them again
    for host in (a, b):
        assert host.steps == [(0, 5), (5, 1), (6, 1), (2, 2)]
        assert host.prompted == [True, False, False, True]


async def test_a_replacement_host_gets_the_prompts_with_the_replay() -> None:
    prompts = deep_prompts(B)
    steps = [tokens(2, 0)] + [tokens(1, k) for k in range(1, 6)]  # crosses P while decoding
    dying = fake("b", 4, 8, fail_at_step=2)  # serves the prefill, dies on the next step
    backup = fake("backup", 2, 8, throughput=100.0)
    swarm = FakeSwarm(fake("a", 0, 4), dying, backup)
    async with session(swarm, prompts=prompts) as s:
        outputs = await generate(s, steps)
        assert route_of(s) == [("a", 0, 4), ("backup", 4, 8)]
    assert_same(outputs, expected_with(prompts, steps))
    assert backup.steps == [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert backup.prompted == [True, True, True, False, False, False]


async def test_prompts_that_do_not_fit_the_session_are_refused() -> None:
    swarm = FakeSwarm(fake("a", 0, 8))
    for bad in (
        deep_prompts(num_blocks=NUM_BLOCKS - 1),  # not one per block
        deep_prompts(batch=B + 1),  # neither 1 nor the batch
        deep_prompts()[0],  # no block dimension
        torch.zeros(NUM_BLOCKS, 1, 0, C, dtype=torch.long),  # P = 0
    ):
        with pytest.raises(ValueError, match="prompts"):
            session(swarm, prompts=bad)
    async with session(swarm, prompts=deep_prompts()) as s:
        with pytest.raises(InvalidStepError, match="hidden size"):
            await s.step(torch.zeros(B, 1, C + 1, dtype=torch.long))


class SpanHost(SpanClient):
    """A fake host running real blocks with the same span code as the host runtime."""

    def __init__(
        self,
        peer_id: str,
        start: int,
        end: int,
        blocks: list,
        config: object,
        throughput: float = 1000.0,
    ) -> None:
        self.info = HostInfo(peer_id, start, end, throughput, free_cache_tokens=10_000)
        self.blocks, self.config = blocks, config
        self.steps_left: int | None = None  # dies once this many steps were served

    @property
    def peer_id(self) -> str:
        return self.info.peer_id

    async def open_session(
        self, start: int, end: int, max_length: int, batch_size: int
    ) -> HopSession:
        from stamen.models.chain import SpanCache
        from stamen.models.registry import get_adapter

        blocks = self.blocks[start - self.info.start : end - self.info.start]
        cache = SpanCache.empty(
            get_adapter(self.config),
            self.config,
            len(blocks),
            batch_size,
            max_length,
            dtype=torch.float32,
        )
        return SpanHopSession(self, blocks, cache)

    async def forward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError("inference sessions never call forward")

    async def backward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        grad_output: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError("inference sessions never call backward")


class SpanHopSession(HopSession):
    def __init__(self, host: SpanHost, blocks: list, cache: object) -> None:
        self.host, self.blocks, self.cache = host, blocks, cache

    async def step(
        self,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
    ) -> Tensor:
        from stamen.models.chain import run_span

        if self.host.steps_left is not None:
            if self.host.steps_left == 0:
                raise HopError("connection lost")
            self.host.steps_left -= 1
        if prompts is not None:  # the host's part: cut them to the step's positions
            prompts = prompts[:, :, start_position : start_position + hidden.shape[1]]
        return run_span(self.blocks, self.cache, hidden, start_position, padding_mask, prompts)

    async def close(self) -> None:
        pass


async def test_real_blocks_generate_the_same_tokens_when_a_host_dies() -> None:
    from transformers import LlamaConfig

    from stamen.conformance.adapters import LocalChain as Built
    from stamen.conformance.adapters import Reference
    from stamen.models.chain import LocalChain, SpanCache
    from stamen.models.registry import get_adapter
    from stamen.swarm_core.client.generation import DecodingPlan, decode

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    built = Built.build(Reference.build(config, seed=3))
    head, blocks = built.head, built.blocks
    input_ids = torch.tensor([[0, 0, 5, 17, 42], [7, 8, 9, 10, 11]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plan = DecodingPlan(max_new_tokens=8)

    local = LocalChain(
        [(blocks, SpanCache.empty(get_adapter(config), config, 4, B, 16, dtype=torch.float32))]
    )
    want = [s.tokens async for s in decode(head, local, input_ids, plan, attention_mask)]

    dying = SpanHost("b", 2, 4, blocks[2:], config)
    dying.steps_left = 4  # prefill and 3 decode steps, then gone
    backup = SpanHost("backup", 1, 4, blocks[1:], config, throughput=10.0)
    swarm = FakeSwarm(SpanHost("a", 0, 2, blocks[:2], config), dying, backup)
    async with session(swarm, num_blocks=4) as s:
        got = [t.tokens async for t in decode(head, s, input_ids, plan, attention_mask)]
        assert route_of(s) == [("a", 0, 2), ("backup", 2, 4)]
    assert torch.equal(torch.stack(got), torch.stack(want))
