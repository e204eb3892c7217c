"""Prompt tuning on `DistributedModelForCausalLM`, against in-process fake hosts.

The fake hosts run our real blocks (a tiny random Llama) and implement the remote seam's
prompt semantics from its docstring: deep prompts added at positions [0, P) before each
block, stateless `forward` / `backward` (recomputed under autograd), sessions with a KV
cache. The reference for everything is plain autograd through the same blocks in this
process, written here independently of the model's code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig
from transformers.loss.loss_utils import ForCausalLMLoss

from stamen.conformance.adapters import LocalChain as Built
from stamen.conformance.adapters import reference_for
from stamen.models.base import StepContext
from stamen.models.chain import SpanCache, run_span
from stamen.models.registry import get_adapter
from stamen.swarm_core.client.distributed import (
    DistributedModelForCausalLM,
    _LoopThread,
    left_padding_mask,
    shifted_cross_entropy,
    vocabulary_prefix,
)
from stamen.swarm_core.client.generation import DecodingPlan, decode
from stamen.swarm_core.client.prompts import PromptedChain, PromptTuning, TuningMode
from stamen.swarm_core.client.remote import HopSession, HostInfo, SpanClient
from stamen.swarm_core.client.swarm import ClientSettings

VARIANT = "llama-gqa-tied-bias"  # 3 blocks, hidden size 64, vocabulary of 96
PRE_SEQ_LEN = 4
B, T = 2, 6


def prompted(hidden: Tensor, prompt: Tensor, position: int) -> Tensor:
    """`hidden` (B, T, C) at positions from `position`, `prompt` (B or 1, P, C) added
    where the tokens lie below P (out of place, so autograd sees it)."""
    n = max(0, min(prompt.shape[1], position + hidden.shape[1]) - position)
    if n == 0:
        return hidden
    pad = F.pad(prompt[:, position : position + n], (0, 0, 0, hidden.shape[1] - n))
    return hidden + pad


def blocks_with_prompts(
    blocks: list, hidden: Tensor, prompts: Tensor | None, padding_mask: Tensor | None
) -> Tensor:
    """(B, S, C) from position 0 through `blocks`, no cache, in the caller's grad mode."""
    context = StepContext.make(
        0, hidden.shape[1], batch_size=hidden.shape[0], key_padding_mask=padding_mask
    )
    for i, block in enumerate(blocks):
        if prompts is not None:
            hidden = prompted(hidden, prompts[i], 0)
        hidden = block(hidden, None, context)
    return hidden


class BlocksHost(SpanClient):
    """A host serving `blocks` as `[start, end)` of the model."""

    def __init__(self, peer_id: str, start: int, end: int, blocks: list, config: object):
        self.info = HostInfo(peer_id, start, end, 1000.0, free_cache_tokens=10_000)
        self.blocks, self.config = blocks, config
        self.calls: list[str] = []

    @property
    def peer_id(self) -> str:
        return self.info.peer_id

    def _span(self, start: int, end: int) -> list:
        return self.blocks[start - self.info.start : end - self.info.start]

    async def open_session(
        self, start: int, end: int, max_length: int, batch_size: int
    ) -> HopSession:
        blocks = self._span(start, end)
        adapter = get_adapter(self.config)
        cache = SpanCache.empty(
            adapter, self.config, len(blocks), batch_size, max_length, dtype=torch.float32
        )
        return BlocksHopSession(self, blocks, cache)

    async def forward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        self.calls.append("forward")
        with torch.no_grad():
            return blocks_with_prompts(self._span(start, end), hidden, prompts, padding_mask)

    async def backward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        grad_output: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        self.calls.append("backward")
        hidden = hidden.detach().requires_grad_()
        leaves = [hidden]
        if prompts is not None:
            prompts = prompts.detach().requires_grad_()
            leaves.append(prompts)
        with torch.enable_grad():
            out = blocks_with_prompts(self._span(start, end), hidden, prompts, padding_mask)
            grads = torch.autograd.grad(out, leaves, grad_output)
        return grads[0], (grads[1] if prompts is not None else None)


class BlocksHopSession(HopSession):
    def __init__(self, host: BlocksHost, blocks: list, cache: SpanCache) -> None:
        self.host, self.blocks, self.cache = host, blocks, cache

    async def step(
        self,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
    ) -> Tensor:
        self.host.calls.append("step+prompts" if prompts is not None else "step")
        if prompts is not None:  # the host's part: cut them to the step's positions
            prompts = prompts[:, :, start_position : start_position + hidden.shape[1]]
            prompts = None if prompts.shape[2] == 0 else prompts
        return run_span(self.blocks, self.cache, hidden, start_position, padding_mask, prompts)

    async def close(self) -> None:
        pass


class FakeSwarm:
    settings = ClientSettings()  # what the model reads its call timeouts from

    def __init__(self, num_blocks: int, *hosts: BlocksHost) -> None:
        self.num_blocks = num_blocks
        self.by_id = {h.peer_id: h for h in hosts}

    def hosts(self) -> list[HostInfo]:
        return [h.info for h in self.by_id.values()]

    async def connect(self, peer_id: str) -> SpanClient:
        return self.by_id[peer_id]

    async def refresh(self, max_age_s: float = 0.0) -> None:
        pass

    async def aclose(self) -> None:
        pass


@pytest.fixture(scope="module")
def built() -> Built:
    return Built.build(reference_for(VARIANT, seed=3))


def trained_prompts(mode: TuningMode, seed: int = 1) -> PromptTuning:
    """Prompts as after some training: the deep ones non-zero, so they matter."""
    tuning = PromptTuning(mode, pre_seq_len=PRE_SEQ_LEN, hidden_size=64, num_blocks=3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuning.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return tuning


def copy_of(tuning: PromptTuning) -> PromptTuning:
    twin = PromptTuning(tuning.mode, pre_seq_len=tuning.pre_seq_len, hidden_size=64, num_blocks=3)
    twin.load_state_dict(tuning.state_dict())
    return twin


@pytest.fixture
def make_model(built: Built) -> Iterator:
    made: list[DistributedModelForCausalLM] = []

    def make(prompts: PromptTuning | None) -> DistributedModelForCausalLM:
        blocks = built.blocks
        swarm = FakeSwarm(
            3,
            BlocksHost("a", 0, 2, blocks[:2], built.config),
            BlocksHost("b", 2, 3, blocks[2:], built.config),
        )
        model = DistributedModelForCausalLM(
            built.config,
            built.head,
            GenerationConfig(),
            swarm,
            _LoopThread(),
            prompts=prompts,
        )
        made.append(model)
        return model

    yield make
    for model in made:
        model.close()


class EmbeddingGrads:
    """Makes the token embeddings' output require grad on every call and keeps it, so the
    gradient reaching the input of the blocks can be compared (model run, then local)."""

    def __init__(self, embedding: torch.nn.Module) -> None:
        self.outputs: list[Tensor] = []
        self._hook = embedding.register_forward_hook(self._keep)

    def _keep(self, _module: object, _args: object, output: Tensor) -> None:
        output.requires_grad_()
        output.retain_grad()
        self.outputs.append(output)

    def close(self) -> None:
        self._hook.remove()

    def grads(self) -> tuple[Tensor, Tensor]:
        swarm, local = self.outputs
        assert swarm.grad is not None and local.grad is not None
        assert local.grad.abs().max() > 0
        return swarm.grad, local.grad


def capture_embedding_grads(built: Built) -> EmbeddingGrads:
    embedding = next(m for m in built.head.modules() if isinstance(m, torch.nn.Embedding))
    return EmbeddingGrads(embedding)


def local_loss(built: Built, tuning: PromptTuning, input_ids: Tensor) -> Tensor:
    """The same computation in one process: prefix, blocks with deep prompts, head, loss
    over the tokens' next-token predictions only."""
    embedded = built.head.embed(input_ids)  # (B, T, C)
    hidden = torch.cat([tuning.prefix(input_ids.shape[0]), embedded], dim=1)  # (B, P + T, C)
    out = blocks_with_prompts(built.blocks, hidden, tuning.deep_prompts(), None)
    logits = built.head.logits(out[:, PRE_SEQ_LEN:])  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def ids(seed: int = 0, length: int = T) -> Tensor:
    return torch.randint(0, 96, (B, length), generator=torch.Generator().manual_seed(seed))


# -- the loss -----------------------------------------------------------------------------


def test_loss_is_transformers_next_token_loss_with_minus_100_ignored() -> None:
    logits = torch.randn(B, T, 96, generator=torch.Generator().manual_seed(0))
    labels = ids()
    labels[0, :3] = -100
    want = ForCausalLMLoss(logits, labels, vocab_size=96)
    torch.testing.assert_close(shifted_cross_entropy(logits, labels), want)
    # A position whose next label is ignored does not count, whatever its logits.
    changed = logits.clone()
    changed[0, :2] += 50.0 * torch.randn(2, 96)
    torch.testing.assert_close(shifted_cross_entropy(changed, labels), want)
    with pytest.raises(ValueError, match="labels"):
        shifted_cross_entropy(logits, labels[:, 1:])


def test_only_left_padding_needs_a_mask() -> None:
    assert left_padding_mask(None, 4) is None
    assert left_padding_mask(torch.ones(B, T, dtype=torch.long), 4) is None
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert left_padding_mask(right, 4) is None  # causal attention already hides it
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = left_padding_mask(left, 2)
    assert mask is not None and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, False, False, True, True], [True] * 6]


# -- training -----------------------------------------------------------------------------


def test_the_prompts_are_the_only_trainable_parameters(make_model) -> None:
    model = make_model(trained_prompts("deep_ptune"))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"prompts.prefix_embeddings", "prompts.deep_embeddings"}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(not p.requires_grad for p in model.head.parameters())


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_gradients_through_the_hosts_equal_local_autograd(
    make_model, built: Built, mode: TuningMode
) -> None:
    tuning = trained_prompts(mode)
    model = make_model(tuning)
    input_ids = ids()
    embedded_grads = capture_embedding_grads(built)
    out = model(input_ids, labels=input_ids)
    assert out.logits.shape == (B, T, 96)  # the prefix's positions are cut
    out.loss.backward()

    local = copy_of(tuning)
    want = local_loss(built, local, input_ids)
    want.backward()
    embedded_grads.close()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=0)
    for (name, got), wanted in zip(tuning.named_parameters(), local.parameters(), strict=True):
        assert got.grad is not None and wanted.grad is not None, name
        torch.testing.assert_close(got.grad, wanted.grad, rtol=1e-5, atol=1e-7)
        assert wanted.grad.abs().max() > 0
    swarm_grad, local_grad = embedded_grads.grads()
    torch.testing.assert_close(swarm_grad, local_grad, rtol=1e-5, atol=1e-7)
    hosts = model.swarm.by_id.values()
    assert all(h.calls == ["forward", "backward"] for h in hosts)


def test_input_gradients_through_the_hosts_equal_local_autograd(make_model, built: Built) -> None:
    tuning = trained_prompts("deep_ptune")
    model = make_model(tuning)
    hidden = torch.randn(B, PRE_SEQ_LEN + T, 64, generator=torch.Generator().manual_seed(4))
    hidden.requires_grad_()
    deep = tuning.deep_prompts()
    out = model.remote_blocks().forward(hidden, deep)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(grad)

    local_hidden = hidden.detach().clone().requires_grad_()
    local = copy_of(tuning)
    want = blocks_with_prompts(built.blocks, local_hidden, local.deep_prompts(), None)
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert hidden.grad is not None and local_hidden.grad is not None
    torch.testing.assert_close(hidden.grad, local_hidden.grad, rtol=1e-5, atol=1e-7)
    assert tuning.deep_embeddings is not None and local.deep_embeddings is not None
    torch.testing.assert_close(
        tuning.deep_embeddings.grad, local.deep_embeddings.grad, rtol=1e-5, atol=1e-7
    )


def test_forward_without_grad_and_with_left_padding(make_model, built: Built) -> None:
    tuning = trained_prompts("deep_ptune")
    model = make_model(tuning)
    input_ids = ids()
    with torch.no_grad():
        full = model(input_ids).logits
    padded = torch.cat([torch.zeros(B, 2, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(B, 2, dtype=torch.long), torch.ones_like(input_ids)], dim=1)
    with torch.inference_mode():
        logits = model(padded, attention_mask=mask).logits
        hidden = model.hidden_states(input_ids)
    # Positions count real tokens, so a left-padded batch gives the unpadded logits.
    torch.testing.assert_close(logits[:, 2:], full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(built.head.logits(hidden), full)


# -- generation and files -----------------------------------------------------------------


class PromptedLocalChain:
    """`LocalChain` with deep prompts: each step gets the prompts cut to its positions."""

    def __init__(self, built: Built, cache: SpanCache, prompts: Tensor | None) -> None:
        self.built, self.cache, self.prompts = built, cache, prompts
        self.position = 0

    async def step(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        prompts = None
        if self.prompts is not None and self.position < self.prompts.shape[2]:
            prompts = self.prompts[:, :, self.position : self.position + hidden.shape[1]]
        out = run_span(self.built.blocks, self.cache, hidden, self.position, padding_mask, prompts)
        self.position += hidden.shape[1]
        return out


def local_generate(built: Built, tuning: PromptTuning, input_ids: Tensor, new: int) -> Tensor:
    cache = SpanCache.empty(get_adapter(built.config), built.config, 3, B, 32, dtype=torch.float32)
    with torch.inference_mode():
        chain = PromptedChain(
            PromptedLocalChain(built, cache, tuning.deep_prompts()), tuning.prefix(1)
        )

        async def run() -> list[Tensor]:
            plan = DecodingPlan(max_new_tokens=new)
            return [s.tokens async for s in decode(built.head, chain, input_ids, plan)]

        return torch.stack(asyncio.run(run()), dim=1)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generate_uses_the_prompts(make_model, built: Built, mode: TuningMode) -> None:
    tuning = trained_prompts(mode)
    input_ids = ids(length=3)
    want = local_generate(built, tuning, input_ids, new=8)
    model = make_model(tuning)
    got = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got[:, 3:], want)
    plain = make_model(None).generate(input_ids, max_new_tokens=8, do_sample=False)
    assert not torch.equal(plain[:, 3:], want)  # the prompts changed the continuation
    with model.inference_session(max_length=11, batch_size=B):
        first = model.generate(input_ids, max_new_tokens=4, do_sample=False)
        more = model.generate(input_ids[:, :0], max_new_tokens=4)  # goes on where it was
    assert torch.equal(torch.cat([first[:, 3:], more], dim=1), want)
    deep_sent = [c for h in model.swarm.by_id.values() for c in h.calls if c == "step+prompts"]
    assert len(deep_sent) == (0 if mode == "ptune" else 4)  # the prefills of two sessions


def test_prompts_save_and_load(make_model, tmp_path: Path) -> None:
    tuning = trained_prompts("deep_ptune")
    model = make_model(tuning)
    path = tmp_path / "prompts.safetensors"
    model.save_prompts(path)
    other = make_model(None)
    with pytest.raises(ValueError, match="no prompts"):
        other.save_prompts(tmp_path / "none.safetensors")
    loaded = other.load_prompts(path)
    assert other.prompts is loaded and loaded.mode == "deep_ptune"
    for got, want in zip(loaded.state_dict().values(), tuning.state_dict().values()):
        assert torch.equal(got, want)
    wrong = PromptTuning("ptune", pre_seq_len=4, hidden_size=64, num_blocks=5)
    wrong.save(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="5 blocks"):
        other.load_prompts(tmp_path / "wrong.safetensors")
    assert other.prompts is loaded


def test_the_prefix_starts_at_seeded_vocabulary_embeddings(built: Built) -> None:
    prefix = vocabulary_prefix(built.head, 96, PRE_SEQ_LEN, seed=5)
    assert prefix.shape == (PRE_SEQ_LEN, 64) and prefix.dtype == torch.float32
    assert torch.equal(prefix, vocabulary_prefix(built.head, 96, PRE_SEQ_LEN, seed=5))
    assert not torch.equal(prefix, vocabulary_prefix(built.head, 96, PRE_SEQ_LEN, seed=6))
    with torch.no_grad():
        vocabulary = built.head.embed(torch.arange(96)[None])[0]  # (V, C)
    assert all(bool((vocabulary == row).all(dim=1).any()) for row in prefix)


def test_from_pretrained_refuses_prompts_that_do_not_fit_before_joining(tmp_path: Path) -> None:
    reference = reference_for(VARIANT, seed=3)
    reference.model.save_pretrained(tmp_path / "model", safe_serialization=True)
    with pytest.raises(ValueError, match="tuning_mode"):
        DistributedModelForCausalLM.from_pretrained(
            tmp_path / "model",
            initial_peers=[],
            tuning_mode="lora",
        )
    wrong = tmp_path / "wrong.safetensors"
    PromptTuning("ptune", pre_seq_len=4, hidden_size=32, num_blocks=3).save(wrong)
    with pytest.raises(ValueError, match="hidden size 32"):
        DistributedModelForCausalLM.from_pretrained(
            tmp_path / "model", initial_peers=[], prompts_path=wrong
        )
    with pytest.raises(ValueError, match="ptune prompts, not deep_ptune"):
        DistributedModelForCausalLM.from_pretrained(
            tmp_path / "model", initial_peers=[], prompts_path=wrong, tuning_mode="deep_ptune"
        )
