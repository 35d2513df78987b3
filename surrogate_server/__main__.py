"""sdce-surrogate-server: serve a surrogate LM's top-k log-probs over gRPC (and HTTP) to SDCE trainers.

Usage::

    sdce-surrogate-server --model Qwen/Qwen3-0.6B --port 50051 --http_port 8000
    python -m surrogate_server --model ./my-surrogate --host 0.0.0.0 --max_batch_tokens 16384 \\
        --max_wait_ms 5 --auth_token_file /etc/sdce/token --tls_cert cert.pem --tls_key key.pem
    python -m surrogate_server --config server.yaml      # sections launch / server / batcher
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
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import uvicorn

from surrogate_server import config_cli
from surrogate_server.auth import TOKEN_ENV, read_token
from surrogate_server.batcher import BatcherConfig
from surrogate_server.config_cli import option
from surrogate_server.server import ServerConfig
from surrogate_server.source import TORCH_DTYPES

log = logging.getLogger("surrogate_server")


@dataclass
class LaunchConfig:
    """The model and where the process serves it."""

    model: str | None = option(None, "Hub name or local directory of a causal LM (required).")
    host: str = option("127.0.0.1", "Interface to bind (0.0.0.0: all; then mind --auth_token_file).")
    port: int = option(50051, "gRPC port (0: any free port).")
    http_port: int = option(8000, "HTTP port: probes, metrics, msgpack top-k (0: any free port).")
    device: str = option("auto", "'auto' (cuda if available), 'cpu', 'cuda:1', ...")
    dtype: str = option("auto", "Model dtype; auto: bfloat16 on cuda, else float32.", choices=("auto", *TORCH_DTYPES))
    chunk_tokens: int = option(1024, "Positions per lm_head/log-softmax/top-k block.")
    auth_token_file: str | None = option(None, f"File holding the shared secret (else ${TOKEN_ENV}; neither: no auth).")
    grace_s: float = option(30.0, "SIGTERM: how long in-flight requests may take.")
    trust_remote_code: bool = option(False, "Allow the model's own code from the Hub.")
    log_level: str = option("INFO", "Logging level on stderr.")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("no model: pass --model HUB_NAME_OR_DIRECTORY")


SECTIONS = {"launch": LaunchConfig, "server": ServerConfig, "batcher": BatcherConfig}


def build_parser() -> argparse.ArgumentParser:
    return config_cli.build_parser(SECTIONS, prog="sdce-surrogate-server", description=__doc__.split("\n\n")[0])


def parse_args(argv: Sequence[str] | None = None) -> tuple[LaunchConfig, ServerConfig]:
    """The launch settings and the server's config (its token read, its batcher set) from the command line."""
    parser = build_parser()
    overrides, _ = config_cli.parse_overrides(parser, argv)
    try:
        built = config_cli.build_sections(SECTIONS, overrides)
        launch = built["launch"]
        config = dataclasses.replace(built["server"], auth_token=read_token(launch.auth_token_file),
                                     model_id=launch.model, batcher=built["batcher"])
    except ValueError as err:
        parser.error(str(err))
    return launch, config


def main(argv: list[str] | None = None) -> int:
    launch, config = parse_args(argv)
    logging.basicConfig(level=launch.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from surrogate_server.engine import SurrogateEngine  # imported late: torch + transformers take seconds

    engine = SurrogateEngine.from_pretrained(launch.model, device=launch.device, dtype=launch.dtype,
                                             chunk_tokens=launch.chunk_tokens,
                                             trust_remote_code=launch.trust_remote_code)
    log.info("loaded %s; auth %s, tls %s", engine.info(), "on" if config.auth_token else "off",
             "on" if config.tls_cert else "off")
    return asyncio.run(serve(engine, config, host=launch.host, port=launch.port, http_port=launch.http_port,
                             grace_s=launch.grace_s))


async def serve(engine: Any, config: ServerConfig, *, host: str, port: int, http_port: int, grace_s: float) -> int:
    """Run gRPC and HTTP on this event loop until SIGTERM/SIGINT, then drain; returns the exit code."""
    from surrogate_server.http import build_app
    from surrogate_server.server import ServingCore, create_server

    service = ServingCore(engine, config)
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
