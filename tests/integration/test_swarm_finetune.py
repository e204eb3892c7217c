"""Prompt tuning through a real swarm: two `swarm-host` processes serving a tiny random
model in float32 (blocks [0, 2) and [2, 3)), reached by `AutoDistributedModelForCausalLM`
built with a `tuning_mode`. What goes through the hosts must equal plain autograd through
the same blocks in this process:

- the loss, the prompts' gradients and the gradient reaching the token embeddings'
  output, for Llama, Falcon and BLOOM, `ptune` and `deep_ptune` (relative difference of
  at most 1e-5);
- 20 AdamW steps: the same loss curve (within 1e-4);
- greedy generation with trained prompts: the same tokens as the local model.

The local side is written here from the remote seam's definition of the prompts (added
at positions [0, P) before each block), independently of the client's code. Only Llama
`deep_ptune` runs in the default run; the other cases are `slow`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stamen.conformance.adapters import VARIANTS, Reference
from stamen.conformance.adapters import LocalChain as Built
from stamen.models.base import StepContext
from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
)
from stamen.swarm_core.client.prompts import PromptTuning, TuningMode
from tests.integration.conftest import HostProcess, SwarmProcesses

PRE_SEQ_LEN = 8
B, T = 2, 10
MAX_RELATIVE_DIFF = 1e-5
MAX_LOSS_DIFF = 1e-4
TRAINING_STEPS = 20
ARCHITECTURES = {  # architecture -> variant of `conformance.adapters`
    "llama": "llama-gqa-tied-bias",
    "falcon": "falcon-40b-new-arch",
    "bloom": "bloom",
}


@dataclass
class Swarm:
    """Two hosts serving one tiny checkpoint, and the same model built locally."""

    checkpoint: Path
    dht: str
    built: Built
    hosts: tuple[HostProcess, HostProcess]

    def client(self, mode: TuningMode) -> DistributedModelForCausalLM:
        return AutoDistributedModelForCausalLM.from_pretrained(
            self.checkpoint, initial_peers=[self.dht], tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN
        )


@pytest.fixture(scope="module")
def swarm_of(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Swarm]]:
    """`swarm_of(architecture)`: its swarm, started on first use; the previous
    architecture's hosts are stopped first, so at most two hosts share the cores."""
    processes = SwarmProcesses(tmp_path_factory.mktemp("finetune"))
    current: list[Swarm] = []

    def swarm_of(architecture: str) -> Swarm:
        if current and current[0].checkpoint.name == architecture:
            return current[0]
        while current:
            for host in current.pop().hosts:
                host.terminate()
        reference = Reference.build(VARIANTS[ARCHITECTURES[architecture]](), seed=3)
        assert reference.num_blocks == 3
        # The directory name is the announced model name: one per architecture.
        checkpoint = tmp_path_factory.mktemp("checkpoints") / architecture
        reference.model.save_pretrained(checkpoint, safe_serialization=True)
        flags = ("--dtype", "float32", "--dht-client")
        first = processes.start_host(checkpoint, "--blocks", "0:2", *flags)
        second = processes.start_host(checkpoint, "--blocks", "2:3", *flags)
        processes.wait_ready(first, second)
        current.append(Swarm(checkpoint, processes.dht, Built.build(reference), (first, second)))
        return current[0]

    try:
        processes.start_bootstrap()
        yield swarm_of
    finally:
        processes.close()


# -- the local model ----------------------------------------------------------------------


def local_logits(built: Built, tuning: PromptTuning, input_ids: Tensor) -> Tensor:
    """(B, T, V): prefix before the tokens, deep prompts added at positions [0, P) before
    each block, the prefix's positions cut; plain autograd in this process."""
    embedded = built.head.embed(input_ids)  # (B, T, C)
    hidden = torch.cat([tuning.prefix(input_ids.shape[0]), embedded], dim=1)  # (B, P + T, C)
    context = StepContext.make(0, hidden.shape[1], batch_size=hidden.shape[0])
    deep = tuning.deep_prompts()  # (n_blocks, 1, P, C) or None
    for i, block in enumerate(built.blocks):
        if deep is not None:
            hidden = hidden + F.pad(deep[i], (0, 0, 0, input_ids.shape[1]))
        hidden = block(hidden, None, context)
    return built.head.logits(hidden[:, tuning.pre_seq_len :])


def local_loss(built: Built, tuning: PromptTuning, input_ids: Tensor) -> Tensor:
    logits = local_logits(built, tuning, input_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def copy_of(tuning: PromptTuning) -> PromptTuning:
    twin = PromptTuning(
        tuning.mode,
        pre_seq_len=tuning.pre_seq_len,
        hidden_size=tuning.hidden_size,
        num_blocks=tuning.num_blocks,
    )
    twin.load_state_dict(tuning.state_dict())
    return twin


class EmbeddingOutputs:
    """Makes the token embeddings' output require grad and keeps it, for its gradient."""

    def __init__(self, head: nn.Module) -> None:
        embedding = next(m for m in head.modules() if isinstance(m, nn.Embedding))
        self.outputs: list[Tensor] = []
        self._hook = embedding.register_forward_hook(self._keep)

    def _keep(self, _module: object, _args: object, output: Tensor) -> None:
        output.requires_grad_()
        output.retain_grad()
        self.outputs.append(output)

    def grad(self) -> Tensor:
        self._hook.remove()
        (output,) = self.outputs
        assert output.grad is not None
        return output.grad


def relative_diff(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm())


def token_ids(vocab_size: int, seed: int, length: int = T) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (B, length), generator=generator)


def randomize_deep_prompts(tuning: PromptTuning) -> None:
    """Deep prompts start at zero; give them values so they shape the outputs."""
    if tuning.deep_embeddings is not None:
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            shape = tuning.deep_embeddings.shape
            tuning.deep_embeddings.copy_(0.5 * torch.randn(shape, generator=generator))


# -- gradients ----------------------------------------------------------------------------

CASES = [
    pytest.param(
        arch, mode, marks=[] if (arch, mode) == ("llama", "deep_ptune") else [pytest.mark.slow]
    )
    for arch in ARCHITECTURES
    for mode in ("deep_ptune", "ptune")
]


@pytest.mark.parametrize(("architecture", "mode"), CASES)
def test_gradients_through_the_swarm_equal_local_autograd(
    swarm_of: Callable[[str], Swarm], architecture: str, mode: TuningMode
) -> None:
    swarm = swarm_of(architecture)
    input_ids = token_ids(swarm.built.config.vocab_size, seed=1)
    with swarm.client(mode) as model:
        assert model.prompts is not None
        randomize_deep_prompts(model.prompts)
        local = copy_of(model.prompts)

        remote_embedded = EmbeddingOutputs(model.head)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        local_embedded = EmbeddingOutputs(swarm.built.head)
        want = local_loss(swarm.built, local, input_ids)
        want.backward()

        assert out.logits.shape == (B, T, swarm.built.config.vocab_size)
        got_loss, want_loss = out.loss.item(), want.item()
        assert abs(got_loss - want_loss) <= MAX_RELATIVE_DIFF * want_loss
        for name, got in model.prompts.named_parameters():
            wanted = local.get_parameter(name)
            assert got.grad is not None and wanted.grad is not None, name
            assert wanted.grad.norm() > 0, name
            assert relative_diff(got.grad, wanted.grad) <= MAX_RELATIVE_DIFF, name
        assert relative_diff(remote_embedded.grad(), local_embedded.grad()) <= MAX_RELATIVE_DIFF


# -- training and generation --------------------------------------------------------------


def test_training_gives_the_local_loss_curve_and_generation_uses_the_prompts(
    swarm_of: Callable[[str], Swarm],
) -> None:
    swarm = swarm_of("llama")
    vocab_size = swarm.built.config.vocab_size
    batches = [token_ids(vocab_size, seed=100 + k % 4) for k in range(TRAINING_STEPS)]
    with swarm.client("deep_ptune") as model:
        assert model.prompts is not None
        local = copy_of(model.prompts)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == 2  # the prefix and the deep prompts, nothing else
        remote_opt = torch.optim.AdamW(trainable, lr=1e-2)
        local_opt = torch.optim.AdamW(local.parameters(), lr=1e-2)
        remote_curve: list[float] = []
        local_curve: list[float] = []
        for batch in batches:
            for opt, curve, loss_of in (
                (remote_opt, remote_curve, lambda b: model(b, labels=b).loss),
                (local_opt, local_curve, lambda b: local_loss(swarm.built, local, b)),
            ):
                opt.zero_grad()
                loss = loss_of(batch)
                loss.backward()
                opt.step()
                curve.append(loss.item())
        assert max(abs(a - b) for a, b in zip(remote_curve, local_curve)) <= MAX_LOSS_DIFF
        assert remote_curve[-1] < remote_curve[0] - 0.1, remote_curve  # it did train

        # Greedy continuation with the trained prompts: the local model's, token by token.
        prompt = token_ids(vocab_size, seed=7, length=5)
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
        with torch.no_grad():
            expected = prompt
            for _ in range(6):
                next_token = local_logits(swarm.built, local, expected)[:, -1].argmax(-1)
                expected = torch.cat([expected, next_token[:, None]], dim=1)
        assert generated.tolist() == expected.tolist()
