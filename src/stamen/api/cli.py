"""`swarm-api`: the OpenAI-compatible HTTP front end of a Stamen swarm.

    swarm-api --model PATH_OR_HUB_ID [--model ...] [--initial-peers ADDR ...]
              [--host 127.0.0.1] [--port 8000] [--api-key KEY | --api-keys-file FILE]

Settings come from flags, then `STAMEN_*` environment variables, then defaults, parsed
once in `main()`. `build_engines` is the one place that decides what runs the models:
for now every model runs in this process (`LocalEngine`); with peers, the swarm client
will take its place.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from stamen.api.app import EngineProvider, create_app
from stamen.api.engine import EngineClient, LocalEngine
from stamen.api.state import ServingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    ref: str  # path or hub id
    model_id: str | None  # the name clients use; None: derived from ref


@dataclass(frozen=True)
class ApiSettings:
    models: tuple[ModelSpec, ...]
    initial_peers: tuple[str, ...]
    host: str
    port: int
    serving: ServingSettings
    log_level: str


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
        help="addresses of swarm peers to join; none: run the models in this process",
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
        default=int(_env(environ, "MAX_CONCURRENT_REQUESTS", "64") or 64),
        help="generations in flight before new ones get 429 (default 64)",
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
        "--keepalive-s",
        type=float,
        default=float(_env(environ, "KEEPALIVE_S", "10") or 10),
        help="seconds of silence in a stream before a keep-alive comment (default 10)",
    )
    parser.add_argument("--log-level", default=_env(environ, "LOG_LEVEL", "INFO"))
    return parser


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
        parser.error("no model to serve: pass --model (or set STAMEN_MODEL)")
    for name in ("max_concurrent_requests", "max_n", "max_body_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        keys = _api_keys(args, environ)
    except OSError as error:
        parser.error(f"cannot read --api-keys-file: {error}")
    return ApiSettings(
        models=tuple(_model_spec(text) for text in model_texts),
        initial_peers=tuple(args.initial_peers),
        host=args.host,
        port=args.port,
        serving=ServingSettings(
            api_keys=keys,
            max_concurrent_requests=args.max_concurrent_requests,
            max_n=args.max_n,
            max_body_bytes=args.max_body_bytes,
            keepalive_s=args.keepalive_s,
        ),
        log_level=args.log_level.upper(),
    )


def build_engines(settings: ApiSettings) -> EngineProvider:
    """The engine provider for the app's lifespan: what runs the models.

    Without peers every model is loaded into this process. With peers, the swarm client
    replaces this function's body.
    """
    if settings.initial_peers:
        raise SystemExit("swarm-api: serving through peers needs the swarm client (not yet here)")

    @asynccontextmanager
    async def provide() -> AsyncIterator[Sequence[EngineClient]]:
        engines = []
        for spec in settings.models:
            logger.info("loading %s in this process", spec.ref)
            engines.append(
                await asyncio.to_thread(LocalEngine.load, spec.ref, model_id=spec.model_id)
            )
        yield engines

    return provide


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv, os.environ)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    app = create_app(settings.serving, build_engines(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
