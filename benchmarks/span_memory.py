"""Peak memory of loading a span: proportional to the span, not to the model.

    .venv/bin/python benchmarks/span_memory.py [--hidden 768 --layers 16]

Every measurement runs in a fresh subprocess that imports stamen, loads one thing and
reports its peak RSS (`VmHWM`). The baseline row loads only the config, so
`peak - baseline` is what the blocks cost; the `weights` column is the size of the
loaded tensors themselves (float32). Two checkpoints:

- the bundled SmolLM2-135M GGUF (30 blocks, Q4_1/Q8_0, dequantized at load);
- a sharded safetensors directory of random Llama weights generated here in a temp dir
  (written tensor by tensor, never as one model in memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from stamen.testing import git_revision

MB = 1024 * 1024


def child(model_ref: str, what: str, start: int, end: int) -> None:
    """Runs in the subprocess: load, then print peak RSS and loaded bytes as JSON."""
    from stamen.models.loading import load_config, load_head, load_span

    loaded_bytes = 0
    if what == "config":
        load_config(model_ref)
    elif what == "span":
        span = load_span(model_ref, start, end)
        loaded_bytes = sum(p.nbytes for p in span.blocks.parameters())
    elif what == "model":
        span = load_span(model_ref, start, end)
        head = load_head(model_ref)
        tensors = list(span.blocks.parameters()) + list(head.parameters())
        loaded_bytes = sum(t.nbytes for t in {id(t): t for t in tensors}.values())
    print(json.dumps({"peak_bytes": peak_rss_bytes(), "loaded_bytes": loaded_bytes}))


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux keeps `ru_maxrss` across `execve`, so a child would report its parent's peak;
    `VmHWM` belongs to the process's own address space and starts fresh at exec.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB elsewhere


def measure(model_ref: str, what: str, start: int = 0, end: int = 0) -> dict[str, int]:
    command = [sys.executable, __file__, "--child", model_ref, what, str(start), str(end)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_random_llama(directory: Path, *, hidden: int, layers: int, shard_bytes: int) -> None:
    """A sharded Llama checkpoint with random weights, shapes taken from a meta model."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(directory / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in shapes.items():
        shard[name] = torch.randn(shape) * 0.02
        if sum(t.nbytes for t in shard.values()) >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def report(title: str, model_ref: str, num_blocks: int) -> None:
    baseline = measure(model_ref, "config")["peak_bytes"]
    rows = [("config only", measure(model_ref, "config"))]
    rows += [(f"{n} block(s)", measure(model_ref, "span", 0, n)) for n in (1, 10)]
    rows.append((f"whole model ({num_blocks} + head)", measure(model_ref, "model", 0, num_blocks)))
    print(f"\n{title}")
    print(f"{'load':<26}{'peak RSS MiB':>14}{'over config MiB':>17}{'weights MiB':>13}")
    for label, row in rows:
        over = (row["peak_bytes"] - baseline) / MB
        print(
            f"{label:<26}{row['peak_bytes'] / MB:>14.0f}{over:>17.0f}"
            f"{row['loaded_bytes'] / MB:>13.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model_ref, what, start, end = args.child
        child(model_ref, what, int(start), int(end))
        return 0

    from stamen.testing import bundled_smollm2_gguf

    revision = git_revision()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
        f"torch {torch.__version__}, git {revision}"
    )
    gguf = bundled_smollm2_gguf()
    if gguf is not None:
        report(f"GGUF {gguf.name} (float32)", str(gguf), 30)
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        write_random_llama(directory, hidden=args.hidden, layers=args.layers, shard_bytes=100 * MB)
        shards = len(list(directory.glob("model-*.safetensors")))
        title = f"sharded safetensors, random Llama hidden={args.hidden}, {args.layers} blocks, {shards} shards"
        report(title, str(directory), args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
