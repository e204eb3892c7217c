"""The page pool: batched rows at their own positions equal each row run alone.

Every row of a `run_paged_span` batch is compared with the same tokens run through
`run_span` on a contiguous cache of its own (float32, CPU), for one variant of each
architecture: rotary with grouped KV heads, ALiBi Falcon, BLOOM.
"""

from __future__ import annotations

import pytest
import torch

from stamen.conformance.adapters import LocalChain, reference_for
from stamen.models.chain import SpanCache, run_span
from stamen.models.paged import NULL_PAGE, DecodeGraphs, KVPool, pages_for, run_paged_span
from stamen.models.registry import get_adapter

VARIANTS = ["llama-gqa-tied-bias", "falcon-alibi", "falcon-40b-new-arch", "bloom"]
PAGE = 4  # small pages, so that rows span several and tables differ in width
TOLERANCE = 1e-5


class Rows:
    """A pool over a span plus, per row, a contiguous reference cache and its pages."""

    def __init__(self, variant: str, num_pages: int = 64) -> None:
        ref = reference_for(variant)
        self.config = ref.config
        self.adapter = get_adapter(ref.config)
        self.blocks = LocalChain.build(ref).blocks
        self.pool = KVPool(
            self.adapter,
            self.config,
            len(self.blocks),
            num_pages,
            page_tokens=PAGE,
            dtype=torch.float32,
        )
        self.free = list(range(num_pages - 1, NULL_PAGE, -1))
        self.pages: list[list[int]] = []
        self.references: list[SpanCache] = []

    def add_row(self, max_length: int = 48) -> int:
        pages = [self.free.pop() for _ in range(pages_for(max_length, PAGE))]
        self.pool.clear_pages(pages)
        self.pages.append(pages)
        self.references.append(
            SpanCache.empty(
                self.adapter,
                self.config,
                len(self.blocks),
                1,
                max_length,
                dtype=torch.float32,
            )
        )
        return len(self.pages) - 1

    def table(self, rows: list[int], upto: int) -> torch.Tensor:
        width = max(pages_for(upto, PAGE), 1)
        padded = [(self.pages[r] + [NULL_PAGE] * width)[:width] for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    def reference(self, row: int, hidden: torch.Tensor, start: int, mask=None) -> torch.Tensor:
        return run_span(self.blocks, self.references[row], hidden, start, mask)

    def paged(self, rows: list[int], hidden: torch.Tensor, starts: list[int], mask=None):
        T = hidden.shape[1]
        table = self.table(rows, max(starts) + T)
        start = torch.tensor(starts, dtype=torch.long)
        return run_paged_span(self.blocks, self.pool, hidden, table, start, mask)

    def hidden(self, B: int, T: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(B, T, self.config.hidden_size, generator=generator)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_at_different_positions_equal_each_row_alone(variant):
    rows = Rows(variant)
    a, b, c = rows.add_row(), rows.add_row(), rows.add_row()
    # Prefill each row alone, to different lengths (one paged call per row).
    for row, length, seed in ((a, 3, 1), (b, 11, 2), (c, 1, 3)):
        x = rows.hidden(1, length, seed)
        expected = rows.reference(row, x, 0)
        assert _close(rows.paged([row], x, [0]), expected) <= TOLERANCE
    # Then decode all three together, each at its own position, for several steps.
    lengths = [3, 11, 1]
    for step in range(6):
        x = rows.hidden(3, 1, 100 + step)
        out = rows.paged([a, b, c], x, lengths)
        for i, row in enumerate((a, b, c)):
            expected = rows.reference(row, x[i : i + 1], lengths[i])
            assert _close(out[i : i + 1], expected) <= TOLERANCE, (variant, step, i)
        lengths = [n + 1 for n in lengths]


@pytest.mark.parametrize("variant", ["llama-gqa-tied-bias", "bloom"])
def test_rollback_and_replay_inside_a_batch(variant):
    rows = Rows(variant)
    a, b = rows.add_row(), rows.add_row()
    for row, seed in ((a, 1), (b, 2)):
        x = rows.hidden(1, 6, seed)
        rows.reference(row, x, 0)
        rows.paged([row], x, [0])
    # Row a rolls back to 2 and writes a different token there; row b goes on at 6.
    x = rows.hidden(2, 1, 7)
    out = rows.paged([a, b], x, [2, 6])
    assert _close(out[:1], rows.reference(a, x[:1], 2)) <= TOLERANCE
    assert _close(out[1:], rows.reference(b, x[1:], 6)) <= TOLERANCE
    # Row a replays its next slot; its stale slots 3..5 must stay invisible.
    x = rows.hidden(2, 1, 8)
    out = rows.paged([a, b], x, [3, 7])
    assert _close(out[:1], rows.reference(a, x[:1], 3)) <= TOLERANCE
    assert _close(out[1:], rows.reference(b, x[1:], 7)) <= TOLERANCE


@pytest.mark.parametrize("variant", ["llama-gqa-tied-bias", "falcon-alibi"])
def test_left_padding_is_masked_and_positions_count_real_tokens(variant):
    rows = Rows(variant)
    a, b = rows.add_row(), rows.add_row()
    x = rows.hidden(2, 5, 3)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    out = rows.paged([a, b], x, [0, 0], mask)
    for i, row in enumerate((a, b)):
        expected = rows.reference(row, x[i : i + 1], 0, mask[i : i + 1])
        # a padded query's output is arbitrary but finite; compare the real tokens only
        real = mask[i]
        assert _close(out[i, real], expected[0, real]) <= TOLERANCE
    assert torch.isfinite(out).all()
    x = rows.hidden(2, 1, 4)
    out = rows.paged([a, b], x, [5, 5])
    for i, row in enumerate((a, b)):
        assert _close(out[i : i + 1], rows.reference(row, x[i : i + 1], 5)) <= TOLERANCE


def test_a_late_row_batched_with_a_new_one():
    rows = Rows("llama-mha-untied", num_pages=128)
    old = rows.add_row(max_length=200)
    x = rows.hidden(1, 150, 5)
    rows.reference(old, x, 0)
    rows.paged([old], x, [0])
    new = rows.add_row(max_length=200)
    x = rows.hidden(1, 1, 6)
    rows.reference(new, x, 0)
    rows.paged([new], x, [0])
    x = rows.hidden(2, 1, 7)
    out = rows.paged([old, new], x, [150, 1])
    assert _close(out[:1], rows.reference(old, x[:1], 150)) <= TOLERANCE
    assert _close(out[1:], rows.reference(new, x[1:], 1)) <= TOLERANCE


def test_a_sub_range_of_the_span_uses_its_own_layers():
    rows = Rows("llama-gqa-tied-bias")
    a = rows.add_row()
    x = rows.hidden(1, 4, 9)
    table = rows.table([a], 4)
    start = torch.zeros(1, dtype=torch.long)
    tail = rows.blocks[1:]
    out = run_paged_span(tail, rows.pool, x, table, start, block_offset=1)
    cache = SpanCache.empty(rows.adapter, rows.config, len(tail), 1, 8, dtype=torch.float32)
    assert _close(out, run_span(tail, cache, x, 0)) <= TOLERANCE
    with pytest.raises(ValueError, match="do not fit"):
        run_paged_span(rows.blocks, rows.pool, x, table, start, block_offset=1)


def test_decode_graphs_on_cpu_run_the_same_step_eagerly():
    rows = Rows("falcon-40b-new-arch")
    a, b = rows.add_row(), rows.add_row()
    for row, length in ((a, 2), (b, 5)):
        x = rows.hidden(1, length, row)
        rows.reference(row, x, 0)
        rows.paged([row], x, [0])
    graphs = DecodeGraphs(rows.blocks, rows.pool)
    assert not graphs.use_graphs and graphs.graphs_captured == 0
    x = rows.hidden(2, 1, 11)
    out = graphs.run(x, rows.table([a, b], 6), torch.tensor([2, 5]))
    assert _close(out[:1], rows.reference(a, x[:1], 2)) <= TOLERANCE
    assert _close(out[1:], rows.reference(b, x[1:], 5)) <= TOLERANCE


def test_cleared_pages_hide_garbage_from_attention():
    rows = Rows("llama-gqa-tied-bias")
    for key in rows.pool.keys:
        key.fill_(float("nan"))  # what never-written memory may hold
    for value in rows.pool.values:
        value.fill_(float("nan"))
    a = rows.add_row()  # clear_pages zeroes the row's pages
    x = rows.hidden(1, 3, 1)
    out = rows.paged([a], x, [0])
    assert torch.isfinite(out).all()
    assert _close(out, rows.reference(a, x, 0)) <= TOLERANCE


def test_spans_with_bitsandbytes_layers_are_recognised_so_they_are_never_captured():
    pytest.importorskip("bitsandbytes")
    from stamen.models.paged import _has_quantized_layers
    from stamen.models.quantization import quantize_block

    blocks = LocalChain.build(reference_for("llama-gqa-tied-bias")).blocks
    assert not _has_quantized_layers(torch.nn.ModuleList(blocks))
    for mode in ("int8", "nf4"):
        quantized = LocalChain.build(reference_for("llama-gqa-tied-bias")).blocks
        quantize_block(quantized[0], mode)
        assert _has_quantized_layers(torch.nn.ModuleList(quantized)), mode


def test_prepare_captures_nothing_without_graphs():
    rows = Rows("llama-gqa-tied-bias")
    graphs = DecodeGraphs(rows.blocks, rows.pool)
    assert graphs.prepare(rows.config.hidden_size, (1, 2, 4), (1, 2)) == 0
    assert graphs.graphs_captured == 0
