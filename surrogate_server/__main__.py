"""sdce-surrogate-server: serve a surrogate LM's top-k log-probs over gRPC (and HTTP) to SDCE trainers.

Usage::

    sdce-surrogate-server --model Qwen/Qwen3-0.6B --port 50051 --http_port 8000
    python -m surrogate_server --model ./my-surrogate --host 0.0.0.0 --max_batch_tokens 16384 \\
        --max_wait_ms 5 --auth_token_file /etc/sdce/token --tls_cert cert.pem --tls_key key.pem
    python -m surrogate_server --config server.yaml      # sections launch / server / batcher
    python train.py ... --surrogate_endpoint host:50051

Binds 127.0.0.1 unless --host says otherwise. When its servers listen it prints one line
to stdout, ``ready grpc=HOST:PORT http=HOST:PORT`` (the real ports with --port 0 /
--http_port 0), ending in `` metrics=HOST:PORT`` with --metrics_port; logs go to stderr.
The auth token comes from --auth_token_file, else from the environment variable
SDCE_SURROGATE_TOKEN; without either, auth is off.
SIGTERM (or Ctrl-C): health NOT_SERVING, every request already received is answered
(up to --grace_s), later ones get UNAVAILABLE, exit 0. Before it serves (importing
torch, loading the model) it exits 0 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

# Nothing here imports torch, grpc or uvicorn at import time: main() takes the signals first.
from surrogate_server import config_cli
from surrogate_server.auth import TOKEN_ENV, read_token
from surrogate_server.config_cli import option

if TYPE_CHECKING:
    from collections.abc import Iterable

    import grpc
    import uvicorn

    from surrogate_server.server import ServerConfig, ServingCore

log = logging.getLogger("surrogate_server")
_LAST_CALLS_S = 1.0  # grpc stop's grace once idle: calls arriving in the last instant get their UNAVAILABLE


@dataclass
class LaunchConfig:
    """The model and where the process serves it."""

    model: str | None = option(None, "Hub name or local directory of a causal LM (required).")
    host: str = option("127.0.0.1", "Interface to bind (0.0.0.0: all; then mind --auth_token_file).")
    port: int = option(50051, "gRPC port (0: any free port).")
    http_port: int = option(8000, "HTTP port: probes, metrics, msgpack top-k (0: any free port).")
    metrics_port: int | None = option(
        None, "Port serving only GET /metrics, without auth, for Prometheus (0: any free port; unset: none).")
    device: str = option("auto", "'auto' (cuda if available), 'cpu', 'cuda:1', ...")
    dtype: str = option("auto", "Model dtype: auto (bfloat16 on cuda, else float32), float32, bfloat16 or float16.")
    chunk_tokens: int = option(1024, "Positions per lm_head/log-softmax/top-k block.")
    auth_token_file: str | None = option(None, f"File holding the shared secret (else ${TOKEN_ENV}; neither: no auth).")
    grace_s: float = option(30.0, "SIGTERM: how long in-flight requests may take.")
    trust_remote_code: bool = option(False, "Allow the model's own code from the Hub.")
    log_level: str = option("INFO", "Logging level on stderr.")

    def __post_init__(self) -> None:
        from surrogate_server.source import TORCH_DTYPES  # torch: only once main() handles the signals

        if not self.model:
            raise ValueError("no model: pass --model HUB_NAME_OR_DIRECTORY")
        config_cli.check_choice("dtype", self.dtype, ("auto", *TORCH_DTYPES))
        if self.metrics_port and self.metrics_port in (self.port, self.http_port):
            raise ValueError(f"--metrics_port {self.metrics_port} is also the gRPC or HTTP port; give it its own")


def sections() -> dict[str, type]:
    """The config sections of the command line (the server's import torch: imported here, not at import time)."""
    from surrogate_server.batcher import BatcherConfig
    from surrogate_server.server import ServerConfig

    return {"launch": LaunchConfig, "server": ServerConfig, "batcher": BatcherConfig}


def parse_args(argv: Sequence[str] | None = None) -> tuple[LaunchConfig, ServerConfig]:
    """The launch settings and the server's config (its token read, its batcher set) from the command line."""
    parser = config_cli.build_parser(sections(), prog="sdce-surrogate-server", description=__doc__.split("\n\n")[0])
    overrides, _ = config_cli.parse_overrides(parser, argv)
    try:
        built = config_cli.build_sections(sections(), overrides)
        launch = built["launch"]
        config = dataclasses.replace(built["server"], auth_token=read_token(launch.auth_token_file),
                                     model_id=launch.model, batcher=built["batcher"])
    except ValueError as err:
        parser.error(str(err))
    return launch, config


def main(argv: list[str] | None = None) -> NoReturn:
    """The program: parse, load, serve until SIGTERM, drain, end the process (it does not return once serving)."""
    _exit_on_signals()  # until serve() takes them over
    launch, config = parse_args(argv)
    logging.basicConfig(level=launch.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from surrogate_server.engine import SurrogateEngine  # imported late: torch + transformers take seconds

    log.info("loading %s", launch.model)
    engine = SurrogateEngine.from_pretrained(launch.model, device=launch.device, dtype=launch.dtype,
                                             chunk_tokens=launch.chunk_tokens,
                                             trust_remote_code=launch.trust_remote_code)
    log.info("loaded %s; auth %s, tls %s", engine.info(), "on" if config.auth_token else "off",
             "on" if config.tls_cert else "off")
    code = asyncio.run(serve(engine, config, host=launch.host, port=launch.port, http_port=launch.http_port,
                             metrics_port=launch.metrics_port, grace_s=launch.grace_s))
    logging.shutdown()
    sys.stdout.flush()
    # Everything is answered and stopped; the interpreter's own teardown of torch & co would
    # add seconds (more on a busy host) to every shutdown, and leaves nothing to clean up.
    os._exit(code)


def _exit_on_signals() -> None:
    """SIGTERM / SIGINT exit 0 at once: nothing is served yet, and an orchestrator may stop a replica
    while it imports torch or loads its model (seconds to minutes)."""

    def exit_now(signum: int, frame: Any) -> None:
        os.write(2, f"{signal.Signals(signum).name} before serving: exiting\n".encode())
        os._exit(0)  # now: loader threads need no joining, nothing is served or owed

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, exit_now)


async def serve(engine: Any, config: ServerConfig, *, host: str, port: int, http_port: int, grace_s: float,
                metrics_port: int | None = None) -> int:
    """Run gRPC and HTTP (and the metrics port) on this event loop until SIGTERM/SIGINT, then drain; the exit code."""
    from surrogate_server.http import build_app, build_metrics_app
    from surrogate_server.server import ServingCore, create_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = ServingCore(engine, config)
    grpc_server, grpc_port = create_server(service, host=host, port=port)
    ports = {"http": (build_app(service), http_port, "on")}
    if metrics_port is not None:
        ports["metrics"] = (build_metrics_app(service), metrics_port, "off")
    servers = {name: _uvicorn(app, config, grace_s, lifespan) for name, (app, _, lifespan) in ports.items()}
    sockets = {name: _bind(host, number) for name, (_, number, _) in ports.items()}
    await service.start()
    await grpc_server.start()
    tasks = [asyncio.create_task(servers[name].serve(sockets=[sockets[name]])) for name in servers]
    while not all(server.started for server in servers.values()) and not any(task.done() for task in tasks):
        await asyncio.sleep(0.01)
    if any(task.done() for task in tasks):
        await grpc_server.stop(None)
        for task in tasks:
            if task.done():
                task.result()
        return 1
    listening = " ".join(f"{name}={host}:{sockets[name].getsockname()[1]}" for name in servers)
    print(f"ready grpc={host}:{grpc_port} {listening}", flush=True)
    await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
    await _drain(service, grpc_server, servers.values(), tasks, grace_s)
    return 0


async def _drain(service: ServingCore, grpc_server: grpc.aio.Server, servers: Iterable[uvicorn.Server],
                 tasks: list[asyncio.Task[Any]], grace_s: float) -> None:
    """Answer what was received, refuse what arrives, then stop; within ``grace_s`` seconds."""
    deadline = time.monotonic() + grace_s
    log.info("draining: health NOT_SERVING, finishing in-flight requests (up to %.0f s)", grace_s)
    await service.start_draining(deadline)
    if not await service.wait_idle(deadline):
        log.warning("the grace period (--grace_s %.0f) ended with calls still running; cancelling them", grace_s)
    for server in servers:
        server.config.timeout_graceful_shutdown = max(1, int(deadline - time.monotonic()))
        server.should_exit = True
    await grpc_server.stop(min(_LAST_CALLS_S, max(deadline - time.monotonic(), 0.0)))
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await service.close(timeout=max(deadline - time.monotonic(), 0.0))
    log.info("stopped")


def _uvicorn(app: Any, config: ServerConfig, grace_s: float, lifespan: str) -> uvicorn.Server:
    """A uvicorn server for ``app`` that leaves signal handling to serve() (it would take SIGTERM for itself)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan=lifespan, ssl_certfile=config.tls_cert,
        ssl_keyfile=config.tls_key, timeout_graceful_shutdown=int(grace_s) or 1))
    server.capture_signals = contextlib.nullcontext  # uvicorn.Server.serve runs `with self.capture_signals():`
    return server


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket for uvicorn (so --http_port 0 gives a known port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


if __name__ == "__main__":
    main()
