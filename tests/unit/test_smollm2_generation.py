"""The real SmolLM2-135M-Instruct through three chained spans of our blocks decodes
exactly what transformers' `generate` decodes on the same GGUF weights.

Slow (about 45 s): the default run checks the same equality on one prompt through real
hosts (`tests/integration/test_swarm_smollm2.py`, `test_swarm_forwarding.py`)."""

import pytest

from stamen.conformance.generation import CHAT_PROMPTS, compare_greedy


@pytest.mark.slow
def test_greedy_chat_matches_transformers(smollm2_gguf, smollm2_reference):
    results = compare_greedy(
        smollm2_gguf, CHAT_PROMPTS, num_spans=3, max_new_tokens=32, reference=smollm2_reference
    )
    assert len(results) == 3
    for result in results:
        assert result.ours == result.reference, result.prompt
        assert len(result.ours) >= 5  # a real answer, not an immediate EOS
