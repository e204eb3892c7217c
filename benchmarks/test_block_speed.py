"""pytest-benchmark suite: one SmolLM2-shaped Llama block, ours vs transformers, side by side.

Groups "block decode" (1 token against a 512-token cache) and "block prefill" (512 tokens)
each hold both implementations; the ratios (transformers / ours, > 1 means ours is faster)
are printed when the module finishes. Targets and setup live in `benchmarks/block_speed.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from benchmarks.block_speed import Pair, cases

SIDES = ("ours", "transformers")
ROUNDS = {"decode": 300, "prefill": 30}


@pytest.fixture(scope="module")
def pair() -> Pair:
    return Pair.build()


@pytest.fixture(scope="module")
def medians_s(pytestconfig: pytest.Config) -> Iterator[dict[tuple[str, str], float]]:
    medians: dict[tuple[str, str], float] = {}
    yield medians
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    for step in ROUNDS:
        if all((step, side) in medians for side in SIDES):
            ours, theirs = medians[(step, "ours")], medians[(step, "transformers")]
            line = (
                f"block {step}: ours {ours * 1e3:.3f} ms, transformers {theirs * 1e3:.3f} ms, "
                f"ratio {theirs / ours:.2f} (torch threads {torch.get_num_threads()})"
            )
            if reporter is not None and capture is not None:
                # module teardown output is captured; this is the report, so let it through
                with capture.global_and_fixture_disabled():
                    reporter.write_line(line)


def test_same_output(pair: Pair) -> None:
    for step, sides in cases(pair).items():
        outputs = [run(*setup()) for setup, run in sides.values()]
        assert torch.allclose(outputs[0], outputs[1], atol=1e-4), step


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("step", list(ROUNDS))
def test_block_step(benchmark: Any, pair: Pair, medians_s: dict, step: str, side: str) -> None:
    setup, run = cases(pair)[step][side]
    benchmark.group = f"block {step}"
    benchmark.pedantic(run, setup=lambda: (setup(), {}), rounds=ROUNDS[step], warmup_rounds=3)
    if benchmark.stats is not None:
        medians_s[(step, side)] = benchmark.stats.stats.median
