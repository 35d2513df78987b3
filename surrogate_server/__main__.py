"""sdce-surrogate-server: serve a surrogate LM's top-k log-probs over gRPC (and HTTP) to SDCE trainers.

Usage::

    sdce-surrogate-server --model Qwen/Qwen3-0.6B --port 50051 --http_port 8080
    python -m surrogate_server --model ./my-surrogate --host 0.0.0.0 --max_batch_tokens 16384 \\
        --max_wait_ms 5 --auth_token_file /etc/sdce/token --tls_cert cert.pem --tls_key key.pem
    python train.py ... --surrogate_endpoint host:50051

Binds 127.0.0.1 unless --host says otherwise. When both servers listen it prints one line
to stdout, ``ready grpc=HOST:PORT http=HOST:PORT`` (the real ports with --port 0 /
--http_port 0); logs go to stderr. The auth token comes from --auth_token_file, else
from the environment variable SDCE_SURROGATE_TOKEN; without either, auth is off.
SIGTERM (or Ctrl-C): health NOT_SERVING, no new requests, in-flight requests finish
(up to --grace_s), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from typing import Any

import uvicorn

from surrogate_server.batcher import BatcherConfig
from surrogate_server.server import TOKEN_ENV, ServerConfig

log = logging.getLogger("surrogate_server")


def build_parser() -> argparse.ArgumentParser:
    """Process flags by hand; the limits are the fields of ServerConfig and BatcherConfig."""
    parser = argparse.ArgumentParser(prog="sdce-surrogate-server", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub name or local directory of a causal LM")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all; mind --auth_token_file)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    parser.add_argument("--http_port", type=int, default=8080, help="HTTP port (0: any free port)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", help="'auto' (bfloat16 on cuda), bfloat16, float16, float32")
    parser.add_argument("--chunk_tokens", type=int, default=1024, help="positions per lm_head/top-k block")
    parser.add_argument("--auth_token_file", default=None, help=f"file holding the shared secret (else ${TOKEN_ENV})")
    parser.add_argument("--grace_s", type=float, default=30.0, help="SIGTERM: how long in-flight requests may take")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code from the Hub")
    parser.add_argument("--log_level", default="INFO", help="logging level on stderr")
    _add_config_flags(parser, ServerConfig)
    _add_config_flags(parser, BatcherConfig)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass ``cls`` with a help text (nested dataclasses and cli=False skipped)."""
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        if isinstance(f.default, bool):
            flag = f"--{f.name}" if not f.default else f"--no_{f.name}"
            parser.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                help=f.metadata["help"])
        else:
            kind = str if f.default is None else type(f.default)
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])


def _pick(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if "help" in f.metadata}


def read_token(path: str | None) -> str | None:
    """The shared secret from ``path``, else from $SDCE_SURROGATE_TOKEN; None when neither is set."""
    if path is not None:
        with open(path) as file:
            token = file.read().strip()
        if not token:
            raise ValueError(f"--auth_token_file {path} is empty; put the shared secret in it")
        return token
    return os.environ.get(TOKEN_ENV) or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(**_pick(ServerConfig, args), auth_token=read_token(args.auth_token_file),
                              model_id=args.model, batcher=BatcherConfig(**_pick(BatcherConfig, args)))
    except (ValueError, OSError) as err:
        print(f"sdce-surrogate-server: error: {err}", file=sys.stderr)
        return 2
    from surrogate_server.engine import SurrogateEngine  # imported late: torch + transformers take seconds

    engine = SurrogateEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                             chunk_tokens=args.chunk_tokens, trust_remote_code=args.trust_remote_code)
    log.info("loaded %s; auth %s, tls %s", engine.describe(), "on" if config.auth_token else "off",
             "on" if config.tls_cert else "off")
    return asyncio.run(serve(engine, config, host=args.host, port=args.port, http_port=args.http_port,
                             grace_s=args.grace_s))


async def serve(engine: Any, config: ServerConfig, *, host: str, port: int, http_port: int, grace_s: float) -> int:
    """Run gRPC and HTTP on this event loop until SIGTERM/SIGINT, then drain; returns the exit code."""
    from surrogate_server.http import build_app
    from surrogate_server.server import SurrogateService, create_server

    service = SurrogateService(engine, config)
    grpc_server, grpc_port = create_server(service, host=host, port=port)
    http_socket = _bind(host, http_port)
    http = _EmbeddedUvicorn(uvicorn.Config(
        build_app(service), log_level="warning", access_log=False, lifespan="on",
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key, timeout_graceful_shutdown=int(grace_s) or 1))
    await service.start()
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
    while not http.started and not http_task.done():
        await asyncio.sleep(0.01)
    if http_task.done():
        await grpc_server.stop(None)
        http_task.result()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready grpc={host}:{grpc_port} http={host}:{http_socket.getsockname()[1]}", flush=True)
    await asyncio.wait([asyncio.create_task(stop.wait()), http_task], return_when=asyncio.FIRST_COMPLETED)
    log.info("draining: health NOT_SERVING, finishing in-flight requests (up to %.0f s)", grace_s)
    await service.start_draining()
    await grpc_server.stop(grace_s)
    http.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await http_task
    await service.close(timeout=grace_s)
    log.info("stopped")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket for uvicorn (so --http_port 0 gives a known port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn.Server that leaves signal handling to serve() (it would otherwise take SIGTERM for itself)."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


if __name__ == "__main__":
    sys.exit(main())
