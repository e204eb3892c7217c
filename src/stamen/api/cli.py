"""`swarm-api`: the OpenAI-compatible HTTP front end of a Stamen swarm.

    swarm-api [--model PATH_OR_HUB_ID ...] [--initial-peers HOST:PORT ...]
              [--host 127.0.0.1] [--port 8000] [--api-key KEY | --api-keys-file FILE]
              [--data-dir DIR] [--owner NAME] [--max-file-bytes N] [--max-running-jobs N]

Settings come from flags, then `STAMEN_*` environment variables, then defaults, parsed
once in `main()`. `build_engines` is the one place that decides what runs the models:

- with `--initial-peers`, the swarm those peers belong to (`SwarmEngine`);
- without, the embedded default: a local swarm (one bootstrap and `--local-hosts` hosts
  as child processes, `LocalSwarm`) serving each model, stopped on exit. With no
  `--model` either, the bundled SmolLM2-135M-Instruct is served;
- with `--in-process`, every block in this process (`LocalEngine`), no swarm at all.

Fine-tuning (`/v1/files`, `/v1/fine_tuning/jobs`) keeps its files, jobs and checkpoints
under `--data-dir` (default `$XDG_DATA_HOME/stamen`, else `~/.local/share/stamen`), so
a restarted server lists them again and resumes unfinished jobs. Jobs are trained by
`stamen.api.tuning.SwarmTrainer` in this process, `--max-running-jobs` at a time.

Shutdown (SIGTERM, or SIGINT) takes at most `SHUTDOWN_BOUND_S` (5 s): at the signal the
app ends every generation in flight (streams get an error event, whole completions a
503) and readiness turns 503; uvicorn then gives connections `SHUTDOWN_GRACE_S` to close
before cancelling what is left; the lifespan closes the engines' sessions and stops an
embedded swarm (SIGTERM to its children, SIGKILL after `CHILD_STOP_S` per group). The
children also watch this process (`--parent-pid`) and stop within about a second if it
dies without cleaning up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from litestar import Litestar

from stamen.api import constrained
from stamen.api.app import EngineProvider, begin_shutdown, create_app
from stamen.api.engine import EngineClient, LocalEngine
from stamen.api.state import FineTuningSettings, ServingSettings
from stamen.api.swarm_engine import SwarmEngine
from stamen.api.training import Trainer
from stamen.models.loading import load_config
from stamen.models.registry import get_adapter
from stamen.swarm_core.client.swarm import ClientSettings
from stamen.swarm_core.local_swarm import LocalSwarm
from stamen.testing import bundled_smollm2_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
SHUTDOWN_GRACE_S = 2  # uvicorn waits this long for connections once generations ended
CHILD_STOP_S = 1.5  # an embedded swarm's hosts, then its bootstrap, get this long each
SHUTDOWN_BOUND_S = 5.0  # about SHUTDOWN_GRACE_S + 2 * CHILD_STOP_S: what tests hold us to


@dataclass(frozen=True)
class ModelSpec:
    ref: str  # path or hub id
    model_id: str | None  # the name clients use; None: derived from ref


@dataclass(frozen=True)
class ApiSettings:
    models: tuple[ModelSpec, ...]
    initial_peers: tuple[str, ...]
    in_process: bool
    local_hosts: int
    host: str
    port: int
    serving: ServingSettings
    log_level: str
    forwarding: bool = True  # swarm steps host to host (`ClientSettings.forwarding`)


def _env(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    return environ.get(f"STAMEN_{name}", default)


def _model_spec(text: str) -> ModelSpec:
    # "name=ref" names the model; a bare ref is named after its file or hub id
    name, sep, ref = text.partition("=")
    if sep and name and "/" not in name:
        return ModelSpec(ref, name)
    return ModelSpec(text, None)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-api",
        description="Serve models of a Stamen swarm behind an OpenAI-compatible HTTP API. "
        "Every option also reads STAMEN_<OPTION> from the environment (e.g. STAMEN_PORT).",
    )
    models = _env(environ, "MODEL")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model to serve: a local directory, a .gguf file or a hub id, optionally "
        "named as NAME=REF (repeatable; default: $STAMEN_MODEL, comma-separated)",
    )
    parser.set_defaults(env_models=models)
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=(_env(environ, "INITIAL_PEERS") or "").split(),
        help="DHT addresses (HOST:PORT) of the swarm to serve; none: start a local swarm",
    )
    parser.add_argument(
        "--local-hosts",
        type=int,
        default=int(_env(environ, "LOCAL_HOSTS", "2") or 2),
        help="hosts of the local swarm started when no --initial-peers are given (default 2)",
    )
    parser.add_argument(
        "--no-forwarding",
        dest="forwarding",
        action="store_false",
        default=(_env(environ, "FORWARDING", "1") or "1") not in ("0", "false", "no"),
        help="drive every hop of a decode step from this process instead of letting hosts "
        "hand hidden states to each other (default: forward; $STAMEN_FORWARDING=0 turns it off)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every block in this process instead of a swarm (no peers, no children)",
    )
    parser.add_argument("--host", default=_env(environ, "HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(_env(environ, "PORT", "8000") or 8000))
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key (repeatable; default: $STAMEN_API_KEY); none: no auth",
    )
    parser.add_argument(
        "--api-keys-file",
        type=Path,
        default=_env(environ, "API_KEYS_FILE"),
        help="file with one accepted API key per line",
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=int(_env(environ, "MAX_CONCURRENT_REQUESTS", "512") or 512),
        help="generations in flight before new ones get 429 (default 512)",
    )
    parser.add_argument(
        "--max-n",
        type=int,
        default=int(_env(environ, "MAX_N", "8") or 8),
        help="largest `n` (choices per request) accepted (default 8)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(_env(environ, "MAX_BODY_BYTES", str(4 << 20)) or 4 << 20),
        help="larger request bodies get 413 (default 4 MiB)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=int(_env(environ, "DEFAULT_MAX_TOKENS", "1024") or 1024),
        help="tokens a chat completion may generate when the request names no max_tokens "
        "(clamped to the room the context leaves; default 1024)",
    )
    parser.add_argument(
        "--keepalive-s",
        type=float,
        default=float(_env(environ, "KEEPALIVE_S", "10") or 10),
        help="seconds of silence in a stream before a keep-alive comment (default 10)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=_env(environ, "DATA_DIR") or _default_data_dir(environ),
        help="where fine-tuning files, jobs and checkpoints live (default "
        "$XDG_DATA_HOME/stamen, else ~/.local/share/stamen)",
    )
    parser.add_argument(
        "--owner",
        default=_env(environ, "OWNER", "stamen"),
        help="the owner named in fine-tuned model ids, ft:BASE:OWNER:SUFFIX:JOB (default stamen)",
    )
    parser.add_argument(
        "--max-file-bytes",
        type=int,
        default=int(_env(environ, "MAX_FILE_BYTES", str(512 << 20)) or 512 << 20),
        help="larger uploaded files get 413 (default 512 MiB)",
    )
    parser.add_argument(
        "--max-running-jobs",
        type=int,
        default=int(_env(environ, "MAX_RUNNING_JOBS", "1") or 1),
        help="fine-tuning jobs trained at once; the others wait queued (default 1)",
    )
    parser.add_argument("--log-level", default=_env(environ, "LOG_LEVEL", "INFO"))
    return parser


def _default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME", "~")) / ".local/share")
    return Path(base).expanduser() / "stamen"


def _api_keys(args: argparse.Namespace, environ: Mapping[str, str]) -> frozenset[str]:
    keys = set(args.api_key or ([environ["STAMEN_API_KEY"]] if "STAMEN_API_KEY" in environ else []))
    if args.api_keys_file is not None:
        lines = Path(args.api_keys_file).read_text().splitlines()
        keys.update(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    return frozenset(keys)


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> ApiSettings:
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    model_texts = args.model or [m for m in (args.env_models or "").split(",") if m]
    if not model_texts:
        bundled = bundled_smollm2_gguf()
        if bundled is None:
            parser.error("no model to serve: pass --model (or set STAMEN_MODEL)")
        model_texts = [f"{DEFAULT_MODEL_ID}={bundled}"]
    for name in (
        "max_concurrent_requests",
        "max_n",
        "max_body_bytes",
        "default_max_tokens",
        "max_file_bytes",
        "max_running_jobs",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.owner or ":" in args.owner:
        parser.error("--owner must be a non-empty name without ':' (it is part of model ids)")
    try:
        keys = _api_keys(args, environ)
    except OSError as error:
        parser.error(f"cannot read --api-keys-file: {error}")
    return ApiSettings(
        models=tuple(_model_spec(text) for text in model_texts),
        initial_peers=tuple(args.initial_peers),
        in_process=args.in_process,
        local_hosts=args.local_hosts,
        host=args.host,
        port=args.port,
        serving=ServingSettings(
            api_keys=keys,
            max_concurrent_requests=args.max_concurrent_requests,
            max_n=args.max_n,
            max_body_bytes=args.max_body_bytes,
            default_max_tokens=args.default_max_tokens,
            keepalive_s=args.keepalive_s,
            fine_tuning=FineTuningSettings(
                data_dir=Path(args.data_dir).expanduser(),
                owner=args.owner,
                max_file_bytes=args.max_file_bytes,
                max_running_jobs=args.max_running_jobs,
            ),
        ),
        log_level=args.log_level.upper(),
        forwarding=args.forwarding,
    )


def build_engines(settings: ApiSettings) -> EngineProvider:
    """The engine provider for the app's lifespan: what runs the models (module docstring)."""

    @asynccontextmanager
    async def provide() -> AsyncIterator[Sequence[EngineClient]]:
        async with contextlib.AsyncExitStack() as stack:
            engines: list[EngineClient] = []
            for spec in settings.models:
                engines.append(await _engine(spec, settings, stack))
            yield engines

    return provide


async def _engine(
    spec: ModelSpec, settings: ApiSettings, stack: contextlib.AsyncExitStack
) -> EngineClient:
    engine = await _start_engine(spec, settings, stack)
    # llguidance's view of the tokenizer, built now: converting it holds the GIL for a
    # few hundred ms, which the first structured or tool request would otherwise stall
    # every stream for.
    try:
        await asyncio.to_thread(constrained.ll_tokenizer, engine.tokenizer)
    except constrained.GrammarError as error:
        logger.warning("%s: constrained decoding is unavailable: %s", spec.ref, error)
    return engine


async def _start_engine(
    spec: ModelSpec, settings: ApiSettings, stack: contextlib.AsyncExitStack
) -> EngineClient:
    if settings.in_process:
        logger.info("loading %s in this process", spec.ref)
        return await asyncio.to_thread(LocalEngine.load, spec.ref, model_id=spec.model_id)
    peers = list(settings.initial_peers)
    if not peers:
        config = await asyncio.to_thread(load_config, spec.ref)
        num_blocks = get_adapter(config).num_blocks(config)
        logger.info(
            "no --initial-peers: starting a local swarm of %d hosts for %s",
            settings.local_hosts,
            spec.ref,
        )
        swarm = LocalSwarm(
            spec.ref, num_blocks, num_hosts=settings.local_hosts, stop_timeout_s=CHILD_STOP_S
        )
        await stack.enter_async_context(swarm)
        peers = swarm.initial_peers
    engine = await SwarmEngine.connect(
        spec.ref,
        peers,
        model_id=spec.model_id,
        settings=ClientSettings(forwarding=settings.forwarding),
    )
    stack.push_async_callback(engine.aclose)
    try:
        await engine.swarm.wait_for_coverage(timeout_s=120)
    except TimeoutError:
        logger.warning("%s: hosts do not cover every block yet; /health says 503", spec.ref)
    return engine


def _trainer() -> Trainer | None:
    try:
        from stamen.api.tuning import SwarmTrainer
    except ImportError as error:
        logger.error("fine-tuning is off: the trainer cannot be imported (%s)", error)
        return None
    return SwarmTrainer()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv, os.environ)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("kademlia", "rpcudp"):  # they log every datagram at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = create_app(settings.serving, build_engines(settings), trainer=_trainer())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    try:
        _Server(config, app).run()
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT once it has shut down cleanly
        pass
    return 0


class _Server(uvicorn.Server):
    """uvicorn, telling the app at the first SIGTERM/SIGINT, so that the generations in
    flight end before uvicorn starts waiting for their connections to close."""

    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler runs between two bytecodes of the loop: hand over, do not act.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(begin_shutdown, self._app)


if __name__ == "__main__":
    raise SystemExit(main())
