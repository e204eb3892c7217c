"""`make demo`: the embedded default end to end, then an example request.

1. starts `swarm-api` with no peers: it launches a local swarm (a bootstrap and two hosts
   as child processes, splitting the bundled SmolLM2-135M-Instruct) and serves it;
2. waits until `/health` says a full chain of hosts exists;
3. asks a question through the official `openai` SDK and streams the answer;
4. keeps serving until Ctrl-C (or exits at once with `--exit`).

Usage: python -m stamen.demo [--port 8000] [--prompt TEXT] [--exit]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL_ID = "SmolLM2-135M-Instruct"


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until_healthy(server: subprocess.Popen[bytes], base_url: str, log: Path) -> bool:
    started = time.monotonic()
    while time.monotonic() - started < 600:
        if server.poll() is not None:
            print(f"\nswarm-api exited with {server.returncode}; its log:", file=sys.stderr)
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
            return False
        if _healthy(base_url):
            print(f" ready in {time.monotonic() - started:.0f} s")
            return True
        print(".", end="", flush=True)
        time.sleep(2)
    print("\nswarm-api did not become healthy in 10 minutes", file=sys.stderr)
    return False


def _ask(base_url: str, prompt: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="none")
    print(f"\nuser> {prompt}\nassistant> ", end="", flush=True)
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=96,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        elif chunk.usage is not None:
            seconds = time.perf_counter() - started
            print(f"\n({chunk.usage.completion_tokens} tokens in {seconds:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prompt", default="What is the capital of France? Answer briefly.")
    parser.add_argument("--exit", action="store_true", help="stop after the example request")
    args = parser.parse_args(argv)
    base_url = f"http://127.0.0.1:{args.port}"
    if _healthy(base_url):
        print(f"something already answers on port {args.port}; pass --port", file=sys.stderr)
        return 1

    log = Path(tempfile.mkdtemp(prefix="stamen-demo-")) / "swarm-api.log"
    command = [sys.executable, "-m", "stamen.api.cli", "--port", str(args.port)]
    print(f"starting a local swarm behind the API (log: {log})", end="", flush=True)
    with log.open("wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        if not _wait_until_healthy(server, base_url, log):
            return 1
        _ask(base_url, args.prompt)
        if args.exit:
            return 0
        print(f"\nOpenAI-compatible API at {base_url}/v1 (model {MODEL_ID!r}); Ctrl-C stops it.")
        server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    raise SystemExit(main())
