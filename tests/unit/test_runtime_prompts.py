"""Deep prompts on a host: stateless forward, backward and sessions, locally and over RPC.

What a deep-tuned client relies on: a host adds its slice of the per-block prompts to the
hidden states at absolute positions `[0, P)` before each block, in whichever call covers
those positions; backward returns the gradients of the input and of the prompts that
local autograd would, without touching a weight (float, int8, nf4); and the host's
announced request size limit is refused with its own error, end to end.

The reference everywhere is the blocks run by hand with the prompts added as zero-padded
`(T, C)` tensors, independent of the code under test.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("transformers")

from stamen.conformance.adapters import LocalChain, reference_for
from stamen.models.base import StepContext
from stamen.models.loading import Span
from stamen.models.quantization import quantize_block
from stamen.models.registry import get_adapter
from stamen.swarm_core.client import remote
from stamen.swarm_core.client.pool import HostConnections
from stamen.swarm_core.client.swarm import ClientSettings, RpcSpanClient, host_info
from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime
from stamen.swarm_core.host.server import Host, HostSettings
from stamen.swarm_core.protocol.errors import RemoteBadRequest, RemoteTooLarge
from stamen.swarm_core.protocol.records import HostState
from stamen.swarm_core.protocol.rpc import RpcClient
from stamen.swarm_core.protocol.wire import Hello
from stamen.transports.base import Credentials
from stamen.transports.memory import MemoryHub, MemoryTransport

VARIANTS = ["llama-gqa-tied-bias", "falcon-alibi", "bloom"]
C = 64  # hidden size of every conformance variant used here
B, T, P = 2, 7, 3
LIMITS = RuntimeLimits(max_cache_tokens=512, max_session_length=64, max_batch_size=4)


def span_of(variant: str, start: int = 1, end: int = 3, quantization: str = "none") -> Span:
    ref = reference_for(variant)
    blocks = LocalChain.build(ref, range(start, end)).blocks
    blocks = [quantize_block(block, quantization) for block in blocks]
    return Span(ref.config, get_adapter(ref.config), start, end, nn.ModuleList(blocks))


def by_hand(
    blocks: Sequence[nn.Module],
    hidden: Tensor,
    prompts: Tensor,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Each block's prompt (B or 1, P, C), zero-padded to (T, C), added before it."""
    Bh, Th, _ = hidden.shape
    context = StepContext.make(0, Th, batch_size=Bh, key_padding_mask=padding_mask)
    n, Bp, Pp, Cp = prompts.shape
    padding = torch.zeros(Bp, Th - Pp, Cp, dtype=prompts.dtype)
    for block, prompt in zip(blocks, prompts, strict=True):
        hidden = block(hidden + torch.cat([prompt, padding], dim=1), None, context)
    return hidden


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def deep_prompts(num_blocks: int, batch: int, length: int = P) -> Tensor:
    return torch.randn(num_blocks, batch, length, C)  # (n, B or 1, P, C)


@pytest.fixture(params=VARIANTS)
async def runtime(request: pytest.FixtureRequest) -> AsyncIterator[SpanRuntime]:
    async with SpanRuntime(span_of(request.param), LIMITS) as runtime:
        yield runtime


@pytest.mark.parametrize("prompt_batch", [1, B], ids=["broadcast", "per_row"])
async def test_forward_adds_each_blocks_prompt_before_it(
    runtime: SpanRuntime, prompt_batch: int
) -> None:
    torch.manual_seed(1)
    x, prompts = torch.randn(B, T, C), deep_prompts(2, prompt_batch)
    x_before, prompts_before = x.clone(), prompts.clone()
    out = await runtime.forward(x, prompts=prompts)
    with torch.no_grad():
        expected = by_hand(runtime.span.blocks, x, prompts)
        without = by_hand(runtime.span.blocks, x, torch.zeros_like(prompts))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - without).abs().max() > 1e-3  # the prompts did change the output
    # The caller's tensors are never written.
    assert torch.equal(x, x_before) and torch.equal(prompts, prompts_before)


@pytest.mark.parametrize("prompt_batch", [1, B], ids=["broadcast", "per_row"])
async def test_backward_equals_local_autograd(runtime: SpanRuntime, prompt_batch: int) -> None:
    torch.manual_seed(2)
    x, prompts, grad_output = (
        torch.randn(B, T, C),
        deep_prompts(2, prompt_batch),
        torch.randn(B, T, C),
    )
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * T]) if prompt_batch == B else None
    grad_hidden, grad_prompts = await runtime.backward(x, grad_output, mask, prompts)

    x_leaf, p_leaf = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    (by_hand(runtime.span.blocks, x_leaf, p_leaf, mask) * grad_output).sum().backward()
    assert x_leaf.grad is not None and p_leaf.grad is not None
    assert grad_prompts is not None and grad_prompts.shape == prompts.shape
    assert relative_difference(grad_hidden, x_leaf.grad) <= 1e-5
    assert relative_difference(grad_prompts, p_leaf.grad) <= 1e-5
    assert all(param.grad is None for param in runtime.span.blocks.parameters())


async def test_backward_without_prompts_returns_no_prompt_gradient(runtime: SpanRuntime) -> None:
    x, grad_output = torch.randn(1, 4, C), torch.randn(1, 4, C)
    grad_hidden, grad_prompts = await runtime.backward(x, grad_output)
    assert grad_prompts is None and grad_hidden.shape == x.shape


async def test_gradients_come_back_in_the_dtype_they_were_sent_in() -> None:
    async with SpanRuntime(span_of("llama-gqa-tied-bias"), LIMITS) as runtime:
        x = torch.randn(1, 4, C, dtype=torch.float64)
        prompts = deep_prompts(2, 1, 2).to(torch.bfloat16)
        grad_hidden, grad_prompts = await runtime.backward(x, torch.randn(1, 4, C), None, prompts)
        out = await runtime.forward(x, prompts=prompts)
    assert grad_hidden.dtype == torch.float64 and out.dtype == torch.float64
    assert grad_prompts is not None and grad_prompts.dtype == torch.bfloat16


async def test_session_with_prompts_equals_the_stateless_forward(runtime: SpanRuntime) -> None:
    torch.manual_seed(3)
    x, prompts = torch.randn(B, T, C), deep_prompts(2, 1)
    expected = await runtime.forward(x, prompts=prompts)
    session = await runtime.open_session(max_length=16, batch_size=B)
    # Prefill the first 5 tokens, then decode; decode steps past P carry the prompts too
    # (a client may resend them) and must ignore them.
    outs = [await runtime.step(session, x[:, :5], 0, prompts=prompts)]
    for t in range(5, T):
        outs.append(await runtime.step(session, x[:, t : t + 1], t, prompts=prompts))
    torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-5, rtol=1e-5)
    # A step at s >= P gives the same output with other prompts or none at all.
    with_other = await runtime.step(session, x[:, 6:7], 6, prompts=100 * prompts)
    without = await runtime.step(session, x[:, 6:7], 6)
    torch.testing.assert_close(with_other, expected[:, 6:7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(without, expected[:, 6:7], atol=1e-5, rtol=1e-5)


async def test_a_step_straddling_p_adds_only_the_overlapping_slice(runtime: SpanRuntime) -> None:
    torch.manual_seed(4)
    x, prompts = torch.randn(B, T, C), deep_prompts(2, B, length=4)
    expected = await runtime.forward(x, prompts=prompts)
    session = await runtime.open_session(max_length=16, batch_size=B)
    outs = [
        await runtime.step(session, x[:, :1], 0, prompts=prompts),  # position 0 of P = 4
        await runtime.step(session, x[:, 1:3], 1, prompts=prompts),  # positions 1, 2
        await runtime.step(session, x[:, 3:6], 3, prompts=prompts),  # 3 only, of 3..5
        await runtime.step(session, x[:, 6:], 6, prompts=prompts),
    ]
    torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-5, rtol=1e-5)


async def test_replay_from_zero_with_prompts_reproduces_the_outputs(runtime: SpanRuntime) -> None:
    torch.manual_seed(5)
    x, prompts = torch.randn(B, T, C), deep_prompts(2, B)
    session = await runtime.open_session(max_length=16, batch_size=B)
    first = [await runtime.step(session, x[:, :4], 0, prompts=prompts)]
    first += [await runtime.step(session, x[:, t : t + 1], t) for t in range(4, T)]
    # Roll back to 0 (as a failover replay does) with other hidden states and no
    # prompts, then replay the real sequence with them.
    await runtime.step(session, torch.randn(B, 5, C), 0)
    replayed = await runtime.step(session, x, 0, prompts=prompts)
    torch.testing.assert_close(replayed, torch.cat(first, 1), atol=1e-5, rtol=1e-5)
    nxt = torch.randn(B, 1, C)
    after = await runtime.step(session, nxt, T)
    expected = await runtime.forward(torch.cat([x, nxt], 1), prompts=prompts)
    torch.testing.assert_close(after, expected[:, T:], atol=1e-5, rtol=1e-5)


async def test_bad_prompts_are_refused_before_anything_runs() -> None:
    limits = RuntimeLimits(max_cache_tokens=512, max_session_length=64, max_prompt_tokens=4)
    async with SpanRuntime(span_of("llama-gqa-tied-bias"), limits) as runtime:
        x, grad_output = torch.randn(B, 5, C), torch.randn(B, 5, C)
        session = await runtime.open_session(max_length=16, batch_size=B)
        await runtime.step(session, x[:, :2], 0)
        before = runtime.info()
        bad = [
            torch.randn(2, 3, C),  # not (n, B, P, C)
            torch.randn(3, 1, 2, C),  # the range has 2 blocks
            torch.randn(2, 3, 2, C),  # batch neither 1 nor B
            torch.randn(2, 1, 2, C + 1),  # hidden size
            torch.randn(2, 1, 0, C),  # no positions
            torch.randn(2, 1, 5, C),  # over max_prompt_tokens
            torch.ones(2, 1, 2, C, dtype=torch.long),  # not floating
            [[0.0] * C],  # not a tensor
        ]
        for prompts in bad:
            with pytest.raises(RemoteBadRequest):
                await runtime.forward(x, prompts=prompts)
            with pytest.raises(RemoteBadRequest):
                await runtime.backward(x, grad_output, prompts=prompts)
            with pytest.raises(RemoteBadRequest):
                await runtime.step(session, x[:, 2:3], 2, prompts=prompts)
        with pytest.raises(RemoteBadRequest, match="only 2 tokens"):  # stateless calls need P <= T
            await runtime.forward(x[:, :2], prompts=torch.randn(2, 1, 3, C))
        with pytest.raises(RemoteBadRequest):  # a sub-range of one block takes prompts for one
            await runtime.forward(x, prompts=torch.randn(2, 1, 2, C), block_range=(1, 2))
        after = runtime.info()
        assert (after.steps, after.tokens_processed) == (before.steps, before.tokens_processed)
        # The session is intact: the next step still continues it.
        out = await runtime.step(session, x[:, 2:], 2)
        torch.testing.assert_close(out, (await runtime.forward(x))[:, 2:], atol=1e-5, rtol=1e-5)
        # A step may carry more prompt positions than tokens (a prefill sent in chunks).
        await runtime.step(session, x[:, :1], 0, prompts=torch.randn(2, 1, 4, C))


async def test_requests_over_the_token_limit_are_too_large() -> None:
    limits = RuntimeLimits(max_cache_tokens=512, max_bulk_tokens=8)
    async with SpanRuntime(span_of("bloom"), limits) as runtime:
        x = torch.randn(2, 5, C)  # 10 tokens > 8
        for call in (runtime.forward(x), runtime.backward(x, torch.randn_like(x))):
            with pytest.raises(RemoteTooLarge) as refused:
                await call
            assert refused.value.code == "too_large"
        assert runtime.info().tokens_processed == 0
        await runtime.forward(x[:1])  # 5 tokens fit


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
async def test_backward_through_quantized_blocks_leaves_weights_untouched(
    quantization: str,
) -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(6)
    span = span_of("llama-gqa-tied-bias", quantization=quantization)
    weights = {name: t.clone() for name, t in span.blocks.state_dict().items()}
    x, prompts, grad_output = torch.randn(B, 5, C), deep_prompts(2, 1), torch.randn(B, 5, C)
    async with SpanRuntime(span, LIMITS) as runtime:
        grad_hidden, grad_prompts = await runtime.backward(x, grad_output, None, prompts)
        again, _ = await runtime.backward(x, grad_output, None, prompts)

    x_leaf, p_leaf = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    (by_hand(span.blocks, x_leaf, p_leaf) * grad_output).sum().backward()
    assert x_leaf.grad is not None and p_leaf.grad is not None and grad_prompts is not None
    assert relative_difference(grad_hidden, x_leaf.grad) <= 1e-4
    assert relative_difference(grad_prompts, p_leaf.grad) <= 1e-4
    torch.testing.assert_close(again, grad_hidden)  # nothing changed between the calls
    assert all(param.grad is None for param in span.blocks.parameters())
    after = span.blocks.state_dict()
    assert all(torch.equal(weights[name], after[name]) for name in weights)


# -- over RPC ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(span: Span, limits: RuntimeLimits) -> AsyncIterator[tuple[Host, RpcSpanClient]]:
    """A host serving `span` in-process (memory transport, no DHT) and a client on it."""
    hub = MemoryHub()
    server_transport = MemoryTransport(Credentials.generate(), hub=hub)
    client_transport = MemoryTransport(Credentials.generate(), hub=hub)
    host = Host(
        HostSettings(model_ref="tiny", model_name="tiny"),
        server_transport.credentials,
        server_transport,
    )
    async with SpanRuntime(span, limits) as runtime:
        host.runtime, host.span_range, host.state = (
            runtime,
            (span.start, span.end),
            HostState.ONLINE,
        )
        host.throughput_tokens_s = 100.0
        listener = await server_transport.listen("memory://", host._server().serve)
        rpc = await RpcClient.connect(
            client_transport, listener.addresses[0], Hello.local("client"), timeout_s=5
        )
        try:
            yield host, RpcSpanClient(host.peer_id, HostConnections.of(rpc), ClientSettings())
        finally:
            await rpc.close()
            await listener.close()
            await client_transport.aclose()
            await server_transport.aclose()


async def test_forward_backward_and_steps_with_prompts_over_rpc() -> None:
    torch.manual_seed(7)
    span = span_of("falcon-alibi", 0, 3)
    x, grad_output = torch.randn(B, T, C), torch.randn(B, T, C)
    prompts = deep_prompts(2, 1)  # for blocks [1, 3)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * T], dtype=torch.bool)
    async with served(span, LIMITS) as (host, client):
        assert host.runtime is not None
        runtime = host.runtime
        out = await client.forward(1, 3, x, prompts, mask)
        expected = await runtime.forward(x, mask, prompts, block_range=(1, 3))
        torch.testing.assert_close(out, expected)
        grads = await client.backward(1, 3, x, grad_output, prompts, mask)
        expected_grads = await runtime.backward(x, grad_output, mask, prompts, block_range=(1, 3))
        torch.testing.assert_close(grads[0], expected_grads[0])
        assert grads[1] is not None and expected_grads[1] is not None
        torch.testing.assert_close(grads[1], expected_grads[1])
        grad_hidden, no_prompt_grad = await client.backward(1, 3, x, grad_output)
        assert no_prompt_grad is None and grad_hidden.shape == x.shape

        async with await client.open_session(1, 3, max_length=16, batch_size=B) as hop:
            steps = [await hop.step(x[:, :2], 0, prompts=prompts)]
            steps += [await hop.step(x[:, t : t + 1], t, prompts=prompts) for t in range(2, T)]
        no_mask = await runtime.forward(x, None, prompts, block_range=(1, 3))
        torch.testing.assert_close(torch.cat(steps, 1), no_mask, atol=1e-5, rtol=1e-5)


async def test_too_large_travels_to_the_client_and_the_limit_is_announced() -> None:
    limits = RuntimeLimits(max_cache_tokens=512, max_bulk_tokens=8)
    async with served(span_of("bloom"), limits) as (host, client):
        x = torch.randn(3, 3, C)  # 9 tokens > 8
        with pytest.raises(remote.RequestTooLarge) as refused:
            await client.forward(1, 3, x)
        assert refused.value.peer_id == host.peer_id
        with pytest.raises(remote.RequestTooLarge):
            await client.backward(1, 3, x, torch.randn_like(x))
        with pytest.raises(remote.HopError) as bad:
            await client.forward(1, 3, x[:2], prompts=torch.randn(2, 1, 4, C))  # P > T
        assert not isinstance(bad.value, remote.RequestTooLarge | remote.HostBusy)
        assert (await client.forward(1, 3, x[:2])).shape == (2, 3, C)
        record = host.record()
    assert record.max_request_tokens == 8
    info = host_info(record, ping_s=None)
    assert info is not None and info.max_request_tokens == 8


def test_a_host_announces_its_configured_request_limit() -> None:
    settings = HostSettings(model_ref="tiny", model_name="tiny", max_request_tokens=1234)
    host = Host(
        settings, Credentials.generate(), MemoryTransport(Credentials.generate(), hub=MemoryHub())
    )
    assert host.record().max_request_tokens == 1234
    assert host._limits().max_bulk_tokens == 1234
