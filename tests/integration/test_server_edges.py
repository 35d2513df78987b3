"""The surrogate server's edges under wrong input and SIGTERM: real `python -m surrogate_server` processes.

A fuzz run sends well over a thousand wrong requests (raw bytes on every method, random
fields, oversize messages and bodies, chunked bodies, bad tokens) and checks that each gets
a client error, that nothing is logged as a traceback, that memory stays flat and that
the server keeps serving the same answers. Then SIGTERM: a burst sent just before it and
busy clients get only OK or UNAVAILABLE, an open health watch does not slow the shutdown,
and SIGTERM during start-up exits 0.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import msgpack
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from protos.sdce.surrogate.v1 import surrogate_pb2_grpc as pb_grpc
from surrogate_server import codec
from surrogate_server.process import ServerProcess
from tests.integration.test_server import (
    AUTH,
    CODE,
    MAX_K,
    MAX_TOKENS,
    ROOT,
    TOKEN,
    random_ids,
    save_tiny_model,
    start_server,
    topk_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

LIMIT = 2**20  # --max_message_mb 1
CLIENT_ERRORS = {CODE.INVALID_ARGUMENT, CODE.NOT_FOUND, CODE.UNAUTHENTICATED, CODE.RESOURCE_EXHAUSTED,
                 CODE.FAILED_PRECONDITION}
# Every method the server serves: (service descriptor, request streaming, response streaming).
METHODS = {
    f"/{service.full_name}/{method.name}": (method.client_streaming, method.server_streaming)
    for service in (pb.DESCRIPTOR.services_by_name["Surrogate"], health_pb2.DESCRIPTOR.services_by_name["Health"],
                    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
    for method in service.methods
}
OPEN = {method for method in METHODS if method.startswith("/grpc.health.v1.Health/")}


def report(**figures: object) -> None:
    """Print measured figures (pytest -s shows them)."""
    print(" ".join(f"{name}={value}" for name, value in figures.items()), flush=True)


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)[1]) / 1024


# ---------------------------------------------------------------- raw calls

def raw_call(channel: grpc.Channel, method: str, messages: list[bytes], metadata: tuple = (),
             timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with raw bytes (no serializer), as a client of any language could; (code, details)."""
    request_streaming, response_streaming = METHODS[method]
    try:
        if request_streaming:
            list(channel.stream_stream(method)(iter(messages), metadata=metadata, timeout=timeout))
        elif response_streaming:
            list(channel.unary_stream(method)(messages[0], metadata=metadata, timeout=timeout))
        else:
            channel.unary_unary(method)(messages[0], metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return CODE.OK, ""


def corrupt(rng: np.random.Generator) -> bytes:
    """Bytes that parse as no protobuf message: wire type 7, a truncated field, an over-long varint."""
    tail = rng.bytes(int(rng.integers(0, 40)))
    return [b"\x0f" + tail, b"\x0a\x7f" + tail, b"\xff" * 11 + tail][int(rng.integers(3))]


def random_tensor(rng: np.random.Generator) -> pb.Tensor:
    """A Tensor with random fields: any dtype code, odd shapes (huge, negative, empty), random bytes."""
    if rng.random() < 0.4:  # well formed, perhaps with ids out of range
        values = rng.integers(-2, 520, (int(rng.integers(0, 4)), int(rng.integers(0, 20))))
        return codec.pack(values.astype(rng.choice([np.int32, np.int64, np.uint8, np.float32])))
    dims = [int(d) for d in rng.choice([-5, -1, 0, 1, 2, 3, 17, 300, 2**31, 2**62], int(rng.integers(0, 4)))]
    return pb.Tensor(dtype=int(rng.integers(-1, 12)), shape=dims, data=rng.bytes(int(rng.integers(0, 200))))


def random_topk(rng: np.random.Generator) -> pb.TopKRequest:
    request = pb.TopKRequest(request_id=str(rng.integers(1 << 30)), input_ids=random_tensor(rng),
                             k=int(rng.choice([-(2**31), -1, 0, 1, 3, MAX_K, MAX_K + 1, 2**31 - 1])),
                             permitted_id=str(rng.choice(["", "", "x", "0" * 64, "é" * 70])))
    if rng.random() < 0.3:
        request.attention_mask.CopyFrom(random_tensor(rng))
    if rng.random() < 0.3:
        request.logprob_floor = float(rng.choice([np.nan, np.inf, -np.inf, -3.0, 1e30]))
    return request


def random_msgpack(rng: np.random.Generator) -> bytes:
    """A msgpack body with the API's field names and random (often wrong) values."""
    def value(depth: int = 0) -> object:
        choice = int(rng.integers(9 if depth < 2 else 6))
        if choice == 6:
            return [value(depth + 1)]
        if choice == 7:
            return {"dtype": value(depth + 1), "shape": value(depth + 1), "data": value(depth + 1)}
        if choice == 8:
            return {"x": value(depth + 1)}
        return [None, int(rng.integers(-(2**40), 2**40)), float(rng.normal()), "INT32", rng.bytes(8), True][choice]

    names = ["request_id", "input_ids", "attention_mask", "k", "logprob_floor", "permitted_id", "mask", "colour"]
    body = {str(rng.choice(names)): value() for _ in range(int(rng.integers(0, 5)))}
    if rng.random() < 0.3:
        body["input_ids"] = {"dtype": str(rng.choice(["INT32", "INT64", "FLOAT64", "UINT8"])),
                             "shape": [int(d) for d in rng.integers(-1, 6, int(rng.integers(0, 3)))],
                             "data": rng.bytes(int(rng.integers(0, 64)))}
    return msgpack.packb(body if rng.random() < 0.9 else list(body), use_bin_type=True)


def post_chunked(address: str, path: str, total: int, token: str | None, chunk: int = 1 << 16) -> tuple[int, int]:
    """POST ``total`` bytes with Transfer-Encoding: chunked, stopping once the server answers; (status, sent)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                     f"Content-Type: application/msgpack\r\n{auth}\r\n".encode())
        piece, sent = f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n", 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(piece)
            except OSError:  # the server closed the connection: its answer is already here
                break
            sent += chunk
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), sent


def leave_mid_body(address: str, path: str, token: str) -> None:
    """Announce a 1000-byte body, send 10 bytes of it, hang up."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode() + b"\0" * 10)
        time.sleep(0.01)  # the handler is reading the body


# ---------------------------------------------------------------- the fuzzed server

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("edges_model"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Auth on, 1 MiB messages, no batching wait (the fuzz runs fast), the open metrics port."""
    token_file = tmp_path_factory.mktemp("edges") / "token"
    token_file.write_text(TOKEN)
    process = start_server(model_dir, "--auth_token_file", str(token_file), "--max_wait_ms", "0",
                           "--max_k", str(MAX_K), "--max_tokens_per_request", str(MAX_TOKENS),
                           "--max_message_mb", "1", "--metrics_port", "0")
    yield process
    process.stop()


class Outcomes:
    """Every call of the fuzz run by kind and status; checks that the server stays SERVING."""

    def __init__(self, server: ServerProcess, channel: grpc.Channel) -> None:
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._health = health_pb2_grpc.HealthStub(channel)
        self._http = server.http
        self.checks = 0

    def add(self, kind: str, code: grpc.StatusCode | int, details: str = "") -> None:
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        assert name not in ("UNKNOWN", "INTERNAL", "500"), (kind, name, details)
        self.seen[kind, name] += 1
        if self.total % 100 == 0:
            self.checks += 1
            assert self._health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert httpx.get(f"http://{self._http}/readyz", timeout=10).status_code == 200

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def test_wrong_requests_fail_alone_without_a_trace(server: ServerProcess) -> None:
    rng = np.random.default_rng(7)
    reference = topk_request(random_ids((2, 9), seed=3), k=5, request_id="ref")
    pid, url = server.proc.pid, f"http://{server.http}"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/msgpack"}
    with grpc.insecure_channel(server.grpc) as channel, httpx.Client(timeout=10) as http:
        stub = pb_grpc.SurrogateStub(channel)
        before = stub.TopK(reference, metadata=AUTH, timeout=10)
        outcomes = Outcomes(server, channel)
        fuzz(channel, stub, http, url, headers, rng, outcomes, rounds=1)  # warm-up: allocators, code paths
        rss, peak, warm_up = memory_mb(pid), memory_mb(pid, "VmHWM"), outcomes.total
        started = time.monotonic()
        fuzz(channel, stub, http, url, headers, rng, outcomes, rounds=4)
        big = {token: post_chunked(server.http, "/v1/topk", 300 * 2**20, token) for token in (TOKEN, None)}
        seconds = time.monotonic() - started
        rss_after, peak_after = memory_mb(pid), memory_mb(pid, "VmHWM")
        after = stub.TopK(reference, metadata=AUTH, timeout=10)
    report(requests=outcomes.total, measured=outcomes.total - warm_up, seconds=f"{seconds:.1f}",
           serving_checks=outcomes.checks, rss_mb=f"{rss:.0f}->{rss_after:.0f}",
           peak_mb=f"{peak:.0f}->{peak_after:.0f}",
           chunked_300mb={"token" if t else "no token": f"{s} after {n / 2**20:.1f} MiB" for t, (s, n) in big.items()})
    report(statuses=dict(sorted(collections.Counter(code for _, code in outcomes.seen.elements()).items())))
    assert outcomes.total >= 1000
    assert big[TOKEN][0] == 413 and big[None][0] == 401
    assert max(sent for _, sent in big.values()) < 64 * 2**20  # refused early, not read to the end
    assert rss_after - rss < 64 and peak_after - peak < 64, (rss, rss_after, peak, peak_after)
    assert (after.counts, after.ids, after.logprobs) == (before.counts, before.ids, before.logprobs)
    assert server.running()
    assert not re.search(r"Traceback|Unexpected|ERROR", server.output), server.output


def fuzz(channel: grpc.Channel, stub: pb_grpc.SurrogateStub, http: httpx.Client, url: str,
         headers: dict[str, str], rng: np.random.Generator, outcomes: Outcomes, rounds: int) -> None:
    """``rounds`` x about 280 wrong requests of every kind."""
    wrong_tokens = [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
    for _ in range(rounds):
        for method in METHODS:  # raw bytes on every method: with the token, without, with a wrong one
            for metadata in (AUTH, *wrong_tokens):
                for _ in range(2):
                    code, details = raw_call(channel, method, [corrupt(rng)], metadata)
                    expected = CODE.INVALID_ARGUMENT if metadata == AUTH or method in OPEN else CODE.UNAUTHENTICATED
                    assert code == expected, (method, metadata, code, details)
                    if code == CODE.INVALID_ARGUMENT:
                        assert "is not its request message" in details, details
                    outcomes.add("raw corrupt", code, details)
            if method != "/grpc.health.v1.Health/Watch":  # a Watch that parses stays open: by design
                for _ in range(3):
                    code, details = raw_call(channel, method, [rng.bytes(int(rng.integers(0, 60)))], AUTH)
                    assert code in CLIENT_ERRORS | {CODE.OK}, (method, code, details)
                    outcomes.add("raw random", code, details)
        for _ in range(120):  # random fields
            try:
                stub.TopK(random_topk(rng), metadata=AUTH, timeout=10)
                outcomes.add("topk fields", CODE.OK)
            except grpc.RpcError as err:
                assert err.code() in (CODE.INVALID_ARGUMENT, CODE.NOT_FOUND), (err.code(), err.details())
                outcomes.add("topk fields", err.code(), err.details())
        for _ in range(10):
            try:
                stub.RegisterPermitted(pb.RegisterPermittedRequest(mask=random_tensor(rng)), metadata=AUTH, timeout=10)
                outcomes.add("permitted fields", CODE.OK)
            except grpc.RpcError as err:
                assert err.code() == CODE.INVALID_ARGUMENT, err.details()
                outcomes.add("permitted fields", err.code(), err.details())
        for _ in range(3):  # a stream: good, random, then a corrupt message
            messages = [topk_request(random_ids((1, 4)), k=2, request_id="good").SerializeToString(),
                        random_topk(rng).SerializeToString(), corrupt(rng), b"never read"]
            call = channel.stream_stream("/sdce.surrogate.v1.Surrogate/TopKStream")(iter(messages), metadata=AUTH,
                                                                                   timeout=10)
            answers = [pb.TopKResponse.FromString(raw) for raw in iter_until_error(call)]
            assert "good" in {a.request_id for a in answers} and len(answers) <= 2
            assert call.code() == CODE.INVALID_ARGUMENT and "message 3 of" in call.details(), call.details()
            outcomes.add("stream corrupt", call.code(), call.details())
        oversize = pb.TopKRequest(input_ids=pb.Tensor(dtype=pb.INT32, shape=[1, 1], data=b"\0" * (LIMIT + 10)), k=1)
        for metadata in (AUTH, ()):
            with pytest.raises(grpc.RpcError) as caught:
                stub.TopK(oversize, metadata=metadata, timeout=10)
            assert caught.value.code() == CODE.RESOURCE_EXHAUSTED
            outcomes.add("grpc oversize", caught.value.code())
        for _ in range(40):  # HTTP: random bodies, raw bytes, bad tokens
            path = str(rng.choice(["/v1/topk", "/v1/permitted"]))
            body = random_msgpack(rng) if rng.random() < 0.8 else rng.bytes(int(rng.integers(0, 100)))
            reply = http.post(url + path, content=body, headers=headers)
            assert reply.status_code in (200, 400, 404), (reply.status_code, reply.text)
            outcomes.add("http body", reply.status_code)
        for auth in ({"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                     {"Authorization": TOKEN}, {}):
            reply = http.post(f"{url}/v1/topk", content=b"\0" * 100, headers=auth)
            assert reply.status_code == 401
            outcomes.add("http token", reply.status_code)
        reply = http.post(f"{url}/v1/topk", content=b"\0" * (LIMIT + 1), headers=headers)
        assert reply.status_code == 413 and "1048576-byte limit" in reply.json()["message"]
        outcomes.add("http oversize", reply.status_code)
        status, _ = post_chunked(url.removeprefix("http://"), "/v1/topk", 2 * LIMIT, TOKEN)
        assert status == 413
        outcomes.add("http chunked oversize", status)
        leave_mid_body(url.removeprefix("http://"), "/v1/topk", TOKEN)
        outcomes.add("http client left mid-body", "no answer")


def iter_until_error(call: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from call
    except grpc.RpcError:
        return


def test_metrics_port_needs_no_token_while_the_api_does(server: ServerProcess) -> None:
    assert server.metrics and server.metrics != server.http
    scraped = httpx.get(f"http://{server.metrics}/metrics", timeout=10)
    assert scraped.status_code == 200 and "sdce_surrogate_requests_total" in scraped.text
    assert httpx.get(f"http://{server.metrics}/v1/info", timeout=10).status_code == 404  # nothing else there
    assert httpx.get(f"http://{server.http}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"http://{server.http}/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                     timeout=10).status_code == 200
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.SurrogateStub(channel).GetInfo(pb.InfoRequest(), timeout=10)
    assert caught.value.code() == CODE.UNAUTHENTICATED


# ---------------------------------------------------------------- SIGTERM

def test_sigterm_answers_what_was_sent_and_a_health_watch_does_not_hold_it(model_dir: Path) -> None:
    """Two servers, the same load: a burst sent 5 ms before SIGTERM and 16 busy clients; one has a watch open."""
    flags = ("--max_wait_ms", "5", "--grace_s", "20", "--log_level", "INFO")  # INFO: the drain's log lines
    servers = [ServerProcess(model_dir, *flags, env={"SDCE_SURROGATE_TOKEN": ""}, cwd=ROOT) for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(ServerProcess.start, servers))
    try:
        with_watch = sigterm_under_load(servers[0], watch=True)
        without = sigterm_under_load(servers[1], watch=False)
    finally:
        for process in servers:
            process.kill()
    report(with_watch=with_watch, without_watch=without)
    for result in (with_watch, without):
        for codes in (result["burst"], result["busy"]):
            assert set(codes) <= {"OK", "UNAVAILABLE"} and codes.get("OK", 0) >= 1, result
        assert result["exit"] == 0
    assert with_watch["watch"] == ["SERVING", "NOT_SERVING", "OK"] and with_watch["watch_ended_s"] < 2
    # The grace is 20 s; a watch used to hold the stop for all of it.
    assert with_watch["shutdown_s"] < without["shutdown_s"] + 2 and with_watch["shutdown_s"] < 8
    assert with_watch["drain_s"] < without["drain_s"] + 1
    for process in servers:
        assert "Traceback" not in process.output, process.output


def sigterm_under_load(process: ServerProcess, watch: bool) -> dict[str, object]:
    codes: collections.Counter[str] = collections.Counter()  # of the busy clients
    lock, stop = threading.Lock(), threading.Event()
    channels = [grpc.insecure_channel(process.grpc) for _ in range(4)]
    statuses: list[str] = []
    watch_ended: list[float] = []

    def watch_health() -> None:
        try:
            for answer in health_pb2_grpc.HealthStub(channels[0]).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
            statuses.append("OK")
        except grpc.RpcError as err:
            statuses.append(err.code().name)
        watch_ended.append(time.monotonic())

    def busy(seed: int) -> None:  # sends until the server refuses, as a client of several replicas would
        with grpc.insecure_channel(process.grpc) as channel:
            call = pb_grpc.SurrogateStub(channel).TopK
            for i in range(2000):
                try:
                    call(topk_request(random_ids((1, 6), seed=seed * 10_000 + i), k=3), timeout=30)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                with lock:
                    codes[code] += 1
                if code != "OK" or stop.is_set():
                    return

    threads = [threading.Thread(target=busy, args=(seed,), daemon=True) for seed in range(16)]
    if watch:
        threads.append(threading.Thread(target=watch_health, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the busy clients are at it
    stubs = [pb_grpc.SurrogateStub(channel) for channel in channels]
    burst = [stubs[i % 4].TopK.future(topk_request(random_ids((1, 8), seed=500 + i), k=3), timeout=30)
             for i in range(64)]
    time.sleep(0.005)
    signalled = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    exit_code = process.proc.wait(timeout=60)
    shutdown_s = time.monotonic() - signalled
    burst_codes = collections.Counter(future.code().name for future in burst)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    for channel in channels:
        channel.close()
    return {"burst": dict(burst_codes), "busy": dict(codes), "exit": exit_code, "shutdown_s": round(shutdown_s, 2),
            "drain_s": round(logged_drain_s(process.output), 2), "watch": statuses,
            "watch_ended_s": round(watch_ended[0] - signalled, 2) if watch_ended else None}


def logged_drain_s(output: str) -> float:
    """Seconds from the server's 'draining' log line to its 'stopped' line."""
    def stamp(event: str) -> float:
        when = re.search(rf"^(\S+ \S+),(\d+) INFO surrogate_server: {event}", output, re.MULTILINE)
        return time.mktime(time.strptime(when[1], "%Y-%m-%d %H:%M:%S")) + int(when[2]) / 1000

    return stamp("stopped") - stamp("draining")


@pytest.mark.parametrize("moment", ["importing", "loading the model"])
def test_sigterm_during_start_up_exits_0_at_once(model_dir: Path, moment: str) -> None:
    command = [sys.executable, "-m", "surrogate_server", "--model", str(model_dir), "--port", "0",
               "--http_port", "0", "--log_level", "INFO"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SDCE_SURROGATE_TOKEN": ""})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        if moment == "importing":
            time.sleep(1.0)  # importing torch takes longer than this
        else:
            deadline = time.monotonic() + 60
            while "loading" not in lines.get(timeout=max(deadline - time.monotonic(), 0.01)):
                pass
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        seconds = time.monotonic() - signalled
    finally:
        proc.kill()
    output = "".join(lines.queue)
    report(moment=moment, exit=code, seconds=f"{seconds:.2f}")
    assert code == 0 and seconds < 5, output
    assert "Traceback" not in output, output
    if moment == "importing":
        assert "ready" not in output, output
