"""Run the surrogate server as a child process: for tests, benchmarks and notebooks.

    with ServerProcess("path/to/model", "--max_wait_ms", "5") as server:
        train(config_with(endpoint=server.grpc))

``start()`` returns once the server printed its ready line (``grpc``, ``http`` and, with
``--metrics_port``, ``metrics`` then hold the addresses); ``restart()`` brings it back on
the same gRPC port (what a trainer sees when a server node restarts).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

_READY = re.compile(r"ready grpc=(\S+) http=(\S+)(?: metrics=(\S+))?")


class ServerProcess:
    """``python -m surrogate_server --model MODEL FLAGS...`` on loopback, free ports by default."""

    def __init__(
        self,
        model: str | Path,
        *flags: str,
        env: dict[str, str | None] | None = None,
        boot_timeout: float = 120.0,
        cwd: str | Path | None = None,
    ):
        self.model = str(model)
        self.flags = flags
        # env: variables to set on top of this process's; None removes one.
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        self.boot_timeout = boot_timeout
        self.cwd = cwd
        self.port = 0  # the gRPC port; kept across restarts once known
        self.grpc = self.http = ""  # HOST:PORT addresses, set by start()
        self.metrics = ""  # HOST:PORT of the open /metrics port, with "--metrics_port", PORT among the flags
        self.proc: subprocess.Popen | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=500)  # stdout and stderr, last lines

    def start(self) -> ServerProcess:
        command = [sys.executable, "-m", "surrogate_server", "--model", self.model,
                   "--port", str(self.port), "--http_port", "0", *self.flags]
        self.proc = subprocess.Popen(command, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(self.boot_timeout) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"the surrogate server did not become ready; its output:\n{self.output}")
        return self

    def _drain(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        """Keep reading the server's output (so its pipe never fills); take the addresses from the ready line."""
        for line in proc.stdout:
            self.log.append(line.rstrip())
            if match := _READY.match(line):
                self.grpc, self.http, self.metrics = match[1], match[2], match[3] or ""
                self.port = int(self.grpc.rsplit(":", 1)[1])
                ready.set()
        ready.set()  # the process ended: start() notices and reports the output

    @property
    def output(self) -> str:
        return "\n".join(self.log)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the server drains in-flight requests), then kill after ``timeout``; the exit code."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, as far as clients can tell."""
        if self.running():
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self) -> ServerProcess:
        self.kill()
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self.start() if not self.running() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
