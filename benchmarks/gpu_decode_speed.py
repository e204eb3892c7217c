"""Decode step speed of one host's span on a GPU: today's contiguous cache, the paged pool,
and CUDA-graph replay, side by side in one run, against the HBM floor measured in the same run.

    python -m benchmarks.gpu_decode_speed [--shapes 8b,70b] [--batches 1,32] [--context 128]
        [--quant int8,nf4] [--json out.json]
    python -m benchmarks.gpu_decode_speed --device cpu --shapes tiny   # a CPU smoke run

Spans are random bf16 Llama blocks built with our adapter (`build_block` on random tensors;
no transformers model is instantiated): `8b` is Llama-3-8B's block shape (hidden 4096, 32
heads, 8 KV heads, intermediate 14336) x 8 blocks, `70b` Llama-3-70B's (8192, 64, 8, 28672)
x 10 blocks. Every row has `--context` tokens cached (random keys and values, the same in
both caches) and decodes one token at position `--context`, rewritten every step. Rows:

- `contiguous`: eager `run_span` over a `SpanCache` (one (B, H_kv, S, D) buffer per block);
- `paged`: eager `run_paged_span` over a `KVPool` (16-token pages, each row its own pages);
- `graphs`: `DecodeGraphs.run` (the same pool, each bucket captured once and replayed; the
  call includes its copies of the inputs, table and start into the static buffers).

Each row's median ms per step (CUDA events around every step; perf_counter on CPU), tokens/s
(batch / step time), and the HBM floor: (weight bytes + KV bytes read once) / the copy
bandwidth of a large device-to-device copy measured in this run (bytes read + written), and
the fraction of that floor reached. Outputs are checked: paged and graphs against contiguous
(relative L2 error; bf16 within 1e-2). `--quant` adds int8 / nf4 (bitsandbytes) spans of the
first shape's block with `--quant-blocks` blocks: error against the bf16 output, and eager
paged decode speed against bf16. The table comes last; `--json` writes every number.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stamen.models.chain import SpanCache, run_span
from stamen.models.paged import DecodeGraphs, KVPool, pages_for, run_paged_span
from stamen.models.registry import get_adapter
from stamen.testing import git_revision

PAGE_TOKENS = 16
_SHORT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# name -> (hidden, heads, kv heads, intermediate, blocks)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "8b": (4096, 32, 8, 14336, 8),
    "70b": (8192, 64, 8, 28672, 10),
    "tiny": (256, 4, 2, 512, 2),
}


# --- building spans ----------------------------------------------------------------------


def llama_config(shape: str, num_blocks: int | None = None) -> Any:
    from transformers import LlamaConfig

    hidden, heads, kv_heads, intermediate, blocks = SHAPES[shape]
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_blocks or blocks,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )


def _random_weights(
    config: Any, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """One block's checkpoint tensors: matrices ~ N(0, 1/in_features), norms ~ 1."""
    C, H, H_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    D, inner = C // H, config.intermediate_size
    shapes = {
        "self_attn.q_proj.weight": (H * D, C),
        "self_attn.k_proj.weight": (H_kv * D, C),
        "self_attn.v_proj.weight": (H_kv * D, C),
        "self_attn.o_proj.weight": (C, H * D),
        "mlp.gate_proj.weight": (inner, C),
        "mlp.up_proj.weight": (inner, C),
        "mlp.down_proj.weight": (C, inner),
    }
    weights = {
        name: torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(
            shape[1] ** -0.5
        )
        for name, shape in shapes.items()
    }
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        weights[norm] = 1 + 0.1 * torch.randn(C, generator=generator, device=device, dtype=dtype)
    return weights


def random_llama_blocks(
    config: Any, *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.ModuleList:
    """`config.num_hidden_layers` random blocks built by the llama adapter, on `device`."""
    adapter = get_adapter(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    blocks = []
    for _ in range(config.num_hidden_layers):
        weights = _random_weights(config, generator, device, dtype)
        blocks.append(adapter.build_block(config, weights).eval())
        del weights
    return nn.ModuleList(blocks)


def weight_bytes(blocks: nn.Module) -> int:
    tensors = [*blocks.parameters(), *blocks.buffers()]
    return sum(t.nelement() * t.element_size() for t in tensors)


# --- the two caches, holding the same context ----------------------------------------------


@dataclass
class Caches:
    contiguous: SpanCache
    pool: KVPool
    table: Tensor  # (B, n_p) long, CPU
    start: Tensor  # (B,) long, CPU: every row at `context`


def filled_caches(
    config: Any,
    num_blocks: int,
    batch: int,
    context: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 1,
) -> Caches:
    """A `SpanCache` and a `KVPool` whose rows hold the same `context` random tokens."""
    adapter = get_adapter(config)
    n_p = pages_for(context + 1, PAGE_TOKENS)
    pool = KVPool(
        adapter,
        config,
        num_blocks,
        batch * n_p + 1,
        page_tokens=PAGE_TOKENS,
        dtype=dtype,
        device=device,
    )
    pool.clear_pages(range(pool.num_pages))
    table = 1 + torch.arange(batch * n_p).view(batch, n_p)  # (B, n_p); page 0 is NULL_PAGE
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = SpanCache.empty(
        adapter, config, num_blocks, batch, n_p * PAGE_TOKENS, dtype=dtype, device=device
    )
    rows = table.to(device)
    for block in range(num_blocks):
        for pooled, contiguous in (
            (pool.keys[block], cache.caches[block].key),
            (pool.values[block], cache.caches[block].value),
        ):
            pooled[1:] = torch.randn(
                pooled[1:].shape, generator=generator, device=device, dtype=dtype
            )
            # (B, n_p, P, H_kv, D) -> (B, H_kv, S, D)
            per_row = pooled[rows].flatten(1, 2).transpose(1, 2)
            contiguous.copy_(per_row)
    pool.valid[1:, :] = True
    return Caches(cache, pool, table, torch.full((batch,), context, dtype=torch.long))


def kv_bytes_read(config: Any, num_blocks: int, batch: int, keys: int, dtype: torch.dtype) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_blocks * batch * keys * config.num_key_value_heads * head_dim * element


# --- timing ------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median ms of `fn` over `steps` calls after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(steps):
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize(device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(steps)
    ]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def _raise_clocks(device: torch.device, seconds: float = 3.0) -> None:
    """Keep the GPU busy for a few seconds first: it idles at a low clock, and the first
    rows would otherwise be timed while it ramps up."""
    if device.type != "cuda":
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        a @ a
    torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), steps=10, warmup=3, device=device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the rows ------------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    batch: int
    variant: str  # contiguous | paged | graphs | paged-int8 ...
    ms: float
    tokens_s: float
    floor_ms: float
    of_floor: float  # floor_ms / ms
    error: float | None  # relative L2 vs the reference output (None for the reference)
    note: str = ""


def _variants(
    blocks: nn.ModuleList,
    caches: Caches,
    context: int,
    device: torch.device,
    *,
    use_graphs: bool | None,
) -> dict[str, Callable[[Tensor], Tensor]]:
    """variant name -> step(hidden (B, 1, C) on device) -> (B, 1, C)."""
    table, start = caches.table.to(device), caches.start.to(device)
    graphs = DecodeGraphs(blocks, caches.pool, use_graphs=use_graphs)
    variants: dict[str, Callable[[Tensor], Tensor]] = {
        "contiguous": lambda x: run_span(blocks, caches.contiguous, x, context),
        "paged": lambda x: run_paged_span(blocks, caches.pool, x, table, start),
        "graphs": lambda x: graphs.run(x, caches.table, caches.start),
    }
    if device.type == "cuda" and use_graphs is not False:
        compiled = DecodeGraphs(blocks, caches.pool, compile=True)
        variants["graphs+compile"] = lambda x: compiled.run(x, caches.table, caches.start)
        variants["contig-graph"] = _contiguous_graph(blocks, caches.contiguous, context)
    return variants


def _contiguous_graph(
    blocks: nn.ModuleList, cache: SpanCache, context: int
) -> Callable[[Tensor], Tensor]:
    """The contiguous step captured in one CUDA graph (batch fixed): a reference for what
    the paged pool costs; the host cannot serve from it (one buffer per fixed batch)."""
    static: dict[str, Any] = {}

    def step(x: Tensor) -> Tensor:
        if not static:
            static["x"] = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    run_span(blocks, cache, static["x"], context)
            torch.cuda.current_stream().wait_stream(side)
            static["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(static["graph"]):
                static["out"] = run_span(blocks, cache, static["x"], context)
        static["x"].copy_(x)
        static["graph"].replay()
        return static["out"]

    return step


def measure_shape(
    shape: str,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    bandwidth_gbs: float,
) -> list[Row]:
    config = llama_config(shape, args.blocks)
    n = config.num_hidden_layers
    blocks = random_llama_blocks(config, device=device, dtype=dtype)
    w_bytes = weight_bytes(blocks)
    rows = []
    for batch in args.batches:
        caches = filled_caches(config, n, batch, args.context, device=device, dtype=dtype)
        floor_ms = (
            (w_bytes + kv_bytes_read(config, n, batch, args.context + 1, dtype))
            / (bandwidth_gbs * 1e9)
            * 1e3
        )
        x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=dtype)
        outputs: dict[str, Tensor] = {}
        steps = _variants(blocks, caches, args.context, device, use_graphs=args.graphs)
        for name, step in steps.items():
            outputs[name] = step(x).clone()
            ms = median_ms(functools.partial(step, x), args.steps, args.warmup, device)
            error = (
                None
                if name == "contiguous"
                else relative_error(outputs[name], outputs["contiguous"])
            )
            rows.append(
                Row(shape, batch, name, ms, batch / ms * 1e3, floor_ms, floor_ms / ms, error)
            )
        del caches, steps
    del blocks
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_quantized(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, bandwidth_gbs: float
) -> list[Row]:
    """int8 / nf4 spans of the first shape's block against the same blocks in bf16."""
    from stamen.models.quantization import quantize_block, quantized_nbytes

    shape = args.shapes[0]
    config = llama_config(shape, args.quant_blocks)
    n = config.num_hidden_layers
    rows = []
    for batch in args.batches:
        caches = filled_caches(config, n, batch, args.context, device=device, dtype=dtype)
        table, start = caches.table.to(device), caches.start.to(device)
        x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=dtype)
        reference = None
        # nf4 before int8: a failed capture of the int8 layers (they sync) must not come
        # before another mode's measurement
        for mode in ("none", *sorted(args.quant, key=("nf4", "int8").index)):
            blocks = random_llama_blocks(config, device=device, dtype=dtype)
            note = ""
            try:
                for block in blocks:
                    quantize_block(block, mode)
            except Exception as error:  # bitsandbytes missing or without this device
                rows.append(
                    Row(
                        shape,
                        batch,
                        f"paged-{mode}",
                        float("nan"),
                        float("nan"),
                        float("nan"),
                        float("nan"),
                        None,
                        f"skipped: {error!r}"[:120],
                    )
                )
                continue
            w_bytes = sum(quantized_nbytes(block) for block in blocks)
            floor_ms = (
                (w_bytes + kv_bytes_read(config, n, batch, args.context + 1, dtype))
                / (bandwidth_gbs * 1e9)
                * 1e3
            )
            step = functools.partial(run_paged_span, blocks, caches.pool, x, table, start)
            out = step().clone()
            ms = median_ms(step, args.steps, args.warmup, device)
            if mode == "none":
                reference, error = out, None
            else:
                error = relative_error(out, reference) if reference is not None else None
                graphs = DecodeGraphs(blocks, caches.pool, use_graphs=args.graphs)
                graphs.run(x, caches.table, caches.start)
                note = f"graphs captured: {graphs.graphs_captured}"
            name = (
                f"paged-{_SHORT_DTYPES.get(dtype, 'float')}" if mode == "none" else f"paged-{mode}"
            )
            rows.append(
                Row(shape, batch, name, ms, batch / ms * 1e3, floor_ms, floor_ms / ms, error, note)
            )
            del blocks
    return rows


# --- report --------------------------------------------------------------------------------


def header(device: torch.device, dtype: torch.dtype, bandwidth_gbs: float, args: Any) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return (
        f"{name or platform.machine()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"git {git_revision()}; {dtype} spans, context {args.context}, 1-token steps; "
        f"copy bandwidth {bandwidth_gbs:.0f} GB/s (read + write); medians of {args.steps} steps"
    )


def table(rows: list[Row]) -> str:
    lines = [
        f"{'shape':<6}{'B':>4} {'variant':<12}{'ms/step':>10}{'tokens/s':>11}"
        f"{'floor ms':>10}{'of floor':>9}{'rel err':>10}  note"
    ]
    for r in rows:
        error = "" if r.error is None else f"{r.error:.1e}"
        lines.append(
            f"{r.shape:<6}{r.batch:>4} {r.variant:<12}{r.ms:>10.3f}{r.tokens_s:>11.0f}"
            f"{r.floor_ms:>10.3f}{r.of_floor:>9.2f}{error:>10}  {r.note}"
        )
    return "\n".join(lines)


def _failed(shape: str, variant: str, error: Exception) -> Row:
    nan = float("nan")
    return Row(shape, 0, variant, nan, nan, nan, nan, None, f"failed: {error!r}"[:160])


def write_json(path: str | None, head: str, bandwidth_gbs: float, rows: list[Row]) -> None:
    if path:
        numbers = {
            "header": head,
            "bandwidth_gbs": bandwidth_gbs,
            "rows": [asdict(r) for r in rows],
        }
        with open(path, "w") as out:
            json.dump(numbers, out, indent=1)


def _csv(kind: type) -> Callable[[str], list[Any]]:
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (default when available) or cpu",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="span dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--shapes",
        type=_csv(str),
        default=["8b", "70b"],
        help=f"comma-separated, of {sorted(SHAPES)} (default 8b,70b)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="blocks per span (default: the shape's, 8 for 8b, 10 for 70b)",
    )
    parser.add_argument(
        "--batches",
        type=_csv(int),
        default=[1, 32],
        help="comma-separated batch sizes (rows decoding together)",
    )
    parser.add_argument("--context", type=int, default=128, help="tokens cached per row")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--no-graphs",
        dest="graphs",
        action="store_const",
        const=False,
        default=None,
        help="DecodeGraphs eager (use_graphs=False)",
    )
    parser.add_argument(
        "--quant",
        type=_csv(str),
        default=[],
        help="comma-separated of int8,nf4: bitsandbytes spans vs bf16",
    )
    parser.add_argument(
        "--quant-blocks",
        type=int,
        default=2,
        help="blocks in the quantized comparison (first shape's block)",
    )
    parser.add_argument(
        "--quant-only", action="store_true", help="only the quantized comparison (first shape)"
    )
    parser.add_argument("--json", default=None, help="write the rows and header here")
    args = parser.parse_args(argv)
    unknown = set(args.shapes) - set(SHAPES) or set(args.quant) - {"int8", "nf4"}
    if unknown:
        parser.error(f"unknown: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    # no_grad, not inference_mode: the compiled variant cannot trace inference tensors
    with torch.no_grad():
        _raise_clocks(device)
        bandwidth = copy_bandwidth_gbs(device)
        head = header(device, dtype, bandwidth, args)
        rows: list[Row] = []
        for shape in [] if args.quant_only else args.shapes:
            try:
                rows += measure_shape(shape, args, device, dtype, bandwidth)
            except Exception as error:  # one shape failing (memory, say) keeps the others
                rows.append(_failed(shape, "all", error))
            print(table([r for r in rows if r.shape == shape]), flush=True)
            write_json(args.json, head, bandwidth, rows)
        if args.quant:
            try:
                rows += measure_quantized(args, device, dtype, bandwidth)
            except Exception as error:  # keep the bf16 rows: report the failure as a row
                rows.append(_failed(args.shapes[0], "quant", error))
            write_json(args.json, head, bandwidth, rows)
    print()
    print(head)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
