"""The paged pool on a GPU: CUDA-graph replay of decode steps against eager
`run_paged_span`, batched rows against each row alone on its own contiguous cache, and rows
joining and leaving a batch between replays. Marked `gpu` (`make test-gpu` runs them).

Tolerances: float32 checks hold to 1e-4 of the output's scale; bf16 batched rows against
the same row alone in bf16 to a relative L2 error of 2e-2 (bf16 keeps 8 bits of mantissa:
different batch shapes pick different kernels and round differently, and the cache each
step reads was itself written with those roundings).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from stamen.conformance.adapters import LocalChain, reference_for
from stamen.models.chain import SpanCache, run_span
from stamen.models.paged import NULL_PAGE, DecodeGraphs, KVPool, run_paged_span
from stamen.models.registry import get_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VARIANTS = ["llama-gqa-tied-bias", "falcon-40b-new-arch", "bloom"]
DEVICE = "cuda"
PAGE_TOKENS = 16
ROW_PAGES = 4  # every row may hold 64 tokens
FLOAT32_TOLERANCE = 1e-4
BF16_RELATIVE_TOLERANCE = 2e-2


class Rows:
    """Rows of one span in a pool, each also run alone on its own contiguous cache."""

    def __init__(self, variant: str, dtype: torch.dtype, num_rows: int = 6) -> None:
        ref = reference_for(variant)
        ours = LocalChain.build(ref)
        self.config, self.dtype = ref.config, dtype
        self.adapter = get_adapter(ref.config)
        self.head = ours.head.to(DEVICE)
        self.blocks = [block.to(DEVICE, dtype) for block in ours.blocks]
        self.pool = KVPool(
            self.adapter,
            self.config,
            len(self.blocks),
            1 + num_rows * ROW_PAGES,
            page_tokens=PAGE_TOKENS,
            dtype=dtype,
            device=DEVICE,
        )
        self.free = list(range(self.pool.num_pages - 1, NULL_PAGE, -1))  # pop() gives 1 first
        self.tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}
        self.alone: dict[str, SpanCache] = {}
        self.generator = torch.Generator().manual_seed(7)

    def hidden(self, batch: int, length: int) -> Tensor:
        """Embeddings of random tokens: (batch, length, C) on the GPU in the span's dtype."""
        ids = torch.randint(0, 96, (batch, length), generator=self.generator)
        with torch.no_grad():
            return self.head.embed(ids.to(DEVICE)).to(self.dtype)

    def join(self, name: str, prompt_length: int) -> tuple[Tensor, Tensor]:
        """Give `name` pages (cleared first) and prefill it; (paged, alone) outputs."""
        pages = [self.free.pop() for _ in range(ROW_PAGES)]
        self.pool.clear_pages(pages)
        self.tables[name], self.lengths[name] = pages, prompt_length
        self.alone[name] = SpanCache.empty(
            self.adapter,
            self.config,
            len(self.blocks),
            1,
            ROW_PAGES * PAGE_TOKENS,
            dtype=self.dtype,
            device=DEVICE,
        )
        x = self.hidden(1, prompt_length)
        table = torch.tensor([pages], device=DEVICE)
        paged = run_paged_span(
            self.blocks, self.pool, x, table, torch.zeros(1, dtype=torch.long, device=DEVICE)
        )
        return paged, run_span(self.blocks, self.alone[name], x, 0)

    def leave(self, name: str) -> None:
        self.free += reversed(self.tables.pop(name))  # the next row to join gets them
        del self.lengths[name], self.alone[name]

    def pool_copy(self) -> KVPool:
        """Another pool holding the same pages (for running the same steps twice)."""
        pool = self.pool
        twin = KVPool(
            self.adapter,
            self.config,
            pool.num_blocks,
            pool.num_pages,
            page_tokens=pool.page_tokens,
            dtype=pool.dtype,
            device=pool.device,
        )
        for mine, theirs in zip(
            [*twin.keys, *twin.values, twin.valid], [*pool.keys, *pool.values, pool.valid]
        ):
            mine.copy_(theirs)
        return twin

    def decode_inputs(self, names: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden (b, 1, C) cuda, table (b, n_p) cpu, start (b,) cpu) for one step."""
        table = torch.tensor([self.tables[n] for n in names])
        start = torch.tensor([self.lengths[n] for n in names])
        return self.hidden(len(names), 1), table, start

    def alone_step(self, names: list[str], x: Tensor) -> Tensor:
        """Each row's step alone on its contiguous cache; advances every row's length."""
        outs = [
            run_span(self.blocks, self.alone[n], x[i : i + 1], self.lengths[n])
            for i, n in enumerate(names)
        ]
        for n in names:
            self.lengths[n] += 1
        return torch.cat(outs)  # (b, 1, C)


def _max_scaled_diff(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_paged_steps(variant, dtype):
    rows = Rows(variant, dtype)
    names = ["a", "b", "c"]
    for name, length in zip(names, (5, 17, 30)):
        rows.join(name, length)
    eager_pool = rows.pool_copy()
    graphs = DecodeGraphs(rows.blocks, rows.pool)
    for _ in range(4):
        x, table, start = rows.decode_inputs(names)
        replayed = graphs.run(x, table, start).clone()
        eager = run_paged_span(rows.blocks, eager_pool, x, table.to(DEVICE), start.to(DEVICE))
        for name in names:
            rows.lengths[name] += 1
        assert torch.isfinite(replayed).all()
        if dtype == torch.float32:
            assert _max_scaled_diff(replayed, eager) <= FLOAT32_TOLERANCE
        else:
            assert _relative(replayed, eager) <= BF16_RELATIVE_TOLERANCE
    assert graphs.graphs_captured == 1  # one bucket (4 rows, 4 pages), replayed 4 times


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_batched_rows_match_each_row_alone(variant):
    rows = Rows(variant, torch.bfloat16)
    names = ["a", "b", "c", "d", "e"]
    for name, length in zip(names, (3, 9, 16, 33, 47)):
        paged, alone = rows.join(name, length)
        assert _relative(paged, alone) <= BF16_RELATIVE_TOLERANCE
    graphs = DecodeGraphs(rows.blocks, rows.pool)
    for _ in range(5):
        x, table, start = rows.decode_inputs(names)
        batched = graphs.run(x, table, start).clone()
        alone = rows.alone_step(names, x)
        for i, name in enumerate(names):
            error = _relative(batched[i], alone[i])
            assert error <= BF16_RELATIVE_TOLERANCE, f"row {name}: {error:.2e}"
    assert graphs.graphs_captured >= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_join_and_leave_between_replays(variant):
    rows = Rows(variant, torch.float32)
    graphs = DecodeGraphs(rows.blocks, rows.pool)
    schedule = [
        ("join", "a", 7), ("join", "b", 20), ("step",),
        ("join", "c", 3), ("step",), ("step",),      # 2 rows -> 3 rows (bucket 2 -> 4)
        ("leave", "a"), ("step",),                    # a's pages go back to the free list
        ("join", "d", 4), ("step",),                  # d reuses them (a wrote 10): cleared, no stale keys
        ("leave", "b"), ("leave", "c"), ("step",),    # d alone (bucket 1)
    ]  # fmt: skip
    steps = 0
    for action, *rest in schedule:
        if action == "join":
            paged, alone = rows.join(rest[0], rest[1])
            assert _max_scaled_diff(paged, alone) <= FLOAT32_TOLERANCE
        elif action == "leave":
            rows.leave(rest[0])
        else:
            names = sorted(rows.tables)
            x, table, start = rows.decode_inputs(names)
            batched = graphs.run(x, table, start).clone()
            alone = rows.alone_step(names, x)
            assert _max_scaled_diff(batched, alone) <= FLOAT32_TOLERANCE, names
            steps += 1
    assert steps == 6
    assert rows.tables["d"][0] in (1, 2, 3, 4)  # d got a's pages back
    assert graphs.graphs_captured >= 3  # buckets of 2, 4 and 1 rows


def test_padding_rows_touch_only_the_null_page():
    rows = Rows("llama-gqa-tied-bias", torch.float32)
    rows.join("a", 9)
    rows.join("b", 4)
    untouched = [
        page
        for page in range(1, rows.pool.num_pages)
        if page not in rows.tables["a"] + rows.tables["b"]
    ]
    before = [k[untouched].clone() for k in rows.pool.keys]
    graphs = DecodeGraphs(rows.blocks, rows.pool, batch_buckets=(4,))
    x, table, start = rows.decode_inputs(["a", "b"])  # 2 real rows padded to 4
    graphs.run(x, table, start)
    torch.cuda.synchronize()
    for key, old in zip(rows.pool.keys, before):
        assert torch.equal(key[untouched], old)
    assert not rows.pool.valid[NULL_PAGE].any()


def test_prepared_buckets_are_replayed_without_new_captures():
    rows = Rows("llama-gqa-tied-bias", torch.float32)
    graphs = DecodeGraphs(rows.blocks, rows.pool)
    assert graphs.prepare(rows.config.hidden_size, (1, 2), (1, ROW_PAGES)) == 4
    for name, length in (("a", 5), ("b", 9)):
        rows.join(name, length)
    x, table, start = rows.decode_inputs(["a", "b"])
    out = graphs.run(x, table, start).clone()
    assert graphs.graphs_captured == 4  # (2 rows, 4 pages) was prepared
    assert _max_scaled_diff(out, rows.alone_step(["a", "b"], x)) <= FLOAT32_TOLERANCE


def test_a_nan_row_never_reaches_the_null_page_through_later_padding():
    rows = Rows("llama-gqa-tied-bias", torch.float32)
    graphs = DecodeGraphs(rows.blocks, rows.pool)
    for name, length in (("a", 3), ("b", 5), ("c", 7)):
        rows.join(name, length)
    # Three rows (bucket 4): the third sends NaN hidden states.
    x, table, start = rows.decode_inputs(["a", "b", "c"])
    x[2] = float("nan")
    graphs.run(x, table, start)
    for name in ("a", "b", "c"):
        rows.lengths[name] += 1
    # Two rows in the same bucket: the NaN row's old input must not be a padding row's.
    x, table, start = rows.decode_inputs(["a", "b"])
    out = graphs.run(x, table, start)
    assert torch.isfinite(out).all()
    assert torch.isfinite(rows.pool.keys[0][NULL_PAGE]).all()
