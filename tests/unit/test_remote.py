"""RemoteSurrogate's client logic against an in-process fake server (loopback, no subprocesses).

The fake answers from a real SurrogateEngine on a tiny model through the real wire
codec, and can be told to fail, forget registrations or demand a token, so retries,
failover, re-registration and error mapping are checked in milliseconds. The real
server process is exercised in tests/integration/test_remote_training.py.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from protos.sdce.surrogate.v1 import surrogate_pb2_grpc as pb_grpc
from surrogate_server import codec
from surrogate_server.auth import read_token
from surrogate_server.client import RemoteSurrogate
from surrogate_server.engine import SurrogateEngine
from surrogate_server.source import SurrogateUnavailable
from tests.tokenizer_factory import corpus, train_byte_level_bpe
from trainer.config import SurrogateConfig
from trainer.models import connect_surrogate

TOKEN = "s3cret"


class FakeSurrogate(pb_grpc.SurrogateServicer):
    """The wire contract around an in-process engine, with failure injection."""

    def __init__(self, engine: SurrogateEngine, max_tokens: int = 10_000):
        self.engine = engine
        self.spec = engine.vocabulary()
        self.fingerprint = self.spec.fingerprint()  # what GetInfo announces
        self.max_tokens = max_tokens
        self.masks: dict[str, torch.Tensor] = {}
        self.fail_with: list[grpc.StatusCode] = []  # statuses the next TopK calls answer with
        self.token: str | None = None
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.running = threading.Event()  # cleared: every call hangs until it is set (a stalled server)
        self.running.set()

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
        self.running.wait()
        if self.token and dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def GetInfo(self, request, context):
        self._enter("GetInfo", context)
        return pb.InfoResponse(
            protocol_version=1, model_id="tiny", vocab_size=self.engine.vocab_size,
            tokenizer_size=len(self.spec.tokens),
            tokenizer_family=self.spec.family, vocabulary_fingerprint=self.fingerprint, max_k=64,
            max_tokens_per_request=self.max_tokens, dtype="float32", device="cpu",
        )

    def GetVocabulary(self, request, context):
        self._enter("GetVocabulary", context)
        import json

        return pb.VocabularyResponse(spec_json=json.dumps(self.spec.to_dict()), fingerprint=self.spec.fingerprint())

    def RegisterPermitted(self, request, context):
        self._enter("RegisterPermitted", context)
        mask = torch.tensor(codec.unpack(request.mask, "mask", dtypes=(pb.UINT8,), ndim=1)).bool()
        pid = codec.permitted_id(request.mask)
        self.masks[pid] = mask
        return pb.RegisterPermittedResponse(permitted_id=pid, permitted_count=int(mask.sum()))

    def TopK(self, request, context):
        self._enter("TopK", context)
        with self.lock:
            failure = self.fail_with.pop(0) if self.fail_with else None
        if failure is not None:
            context.abort(failure, "injected")
        if request.permitted_id and request.permitted_id not in self.masks:
            context.abort(grpc.StatusCode.NOT_FOUND, f"permitted set {request.permitted_id} is not registered")
        ids = torch.tensor(codec.unpack(request.input_ids, "input_ids", ndim=2))
        if ids.numel() > self.max_tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many tokens")
        mask = torch.tensor(codec.unpack(request.attention_mask, "attention_mask", ndim=2))
        try:
            top = self.engine.topk(ids, mask, request.k, self.masks.get(request.permitted_id))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        floor = request.logprob_floor if request.HasField("logprob_floor") else None
        counts, out_ids, logprobs = codec.encode_topk(top.logprobs, top.ids, floor)
        return pb.TopKResponse(request_id=request.request_id, counts=counts, ids=out_ids, logprobs=logprobs)


@pytest.fixture(scope="module")
def engine() -> SurrogateEngine:
    tokenizer = train_byte_level_bpe(corpus(("json", "string")), 300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.2)
    return SurrogateEngine(LlamaForCausalLM(config), tokenizer)


def _serve(servicer: FakeSurrogate, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_SurrogateServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


@pytest.fixture
def fake(engine):
    servicer = FakeSurrogate(engine)
    server, port = _serve(servicer)
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(None)


def _dead_address() -> str:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _batch(engine: SurrogateEngine, seed: int = 0, rows: int = 3, length: int = 7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, engine.vocab_size, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 2] = 0
    permitted = torch.rand(engine.vocab_size - 4, generator=generator) < 0.7
    return ids, mask, permitted


def test_topk_equals_the_engine_and_splits_big_batches(engine, fake):
    fake.max_tokens = 14  # two rows of 7 per request: a [3, 7] batch goes as 2 + 1 rows
    ids, mask, permitted = _batch(engine)
    floor = math.log(0.01)
    with RemoteSurrogate([fake.address], timeout=5) as client:
        assert client.vocabulary() == engine.vocabulary()  # from spec_json: this fake is a first-release server
        got = client.topk(ids, mask, 9, permitted, floor)
        stats = client.stats()
    top = engine.topk(ids, mask, 9, permitted)
    want_logprobs, want_ids = codec.decode_topk(*codec.encode_topk(top.logprobs, top.ids, floor=floor), 9)
    assert torch.equal(got.ids, want_ids)
    torch.testing.assert_close(got.logprobs, want_logprobs, rtol=0, atol=1e-5)  # other batch shapes: other sums
    assert fake.calls["TopK"] == 2 and fake.calls["RegisterPermitted"] == 1
    assert stats["guidance_requests"] == 2 and stats["guidance_retries"] == 0
    assert 0 < stats["guidance_bytes_per_token"] < 9 * 8 + 8
    assert stats["guidance_latency_ms_p50"] > 0


def test_permitted_set_registers_once_and_again_after_a_restart(engine, fake):
    ids, mask, permitted = _batch(engine)
    with RemoteSurrogate([fake.address], timeout=5) as client:
        client.topk(ids, mask, 4, permitted)
        client.topk(ids, mask, 4, permitted)
        assert fake.calls["RegisterPermitted"] == 1
        fake.masks.clear()  # what a restart does to the server's memory
        again = client.topk(ids, mask, 4, permitted)
        assert fake.calls["RegisterPermitted"] == 2
        assert client.stats()["guidance_reregistrations"] == 1
    assert torch.equal(again.ids, engine.topk(ids, mask, 4, permitted).ids)


def test_transient_errors_are_retried(engine, fake):
    fake.fail_with = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    ids, mask, _ = _batch(engine)
    with RemoteSurrogate([fake.address], timeout=5, backoff=(0.01, 0.05)) as client:
        client.topk(ids, mask, 3)
        stats = client.stats()
        assert client.healthy()  # a server that answers, even UNAVAILABLE, is not down: its probe gets an answer
    assert fake.calls["TopK"] == 3 and stats["guidance_retries"] == 2 and stats["guidance_failures"] == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION])
def test_client_errors_raise_at_once(engine, fake, code):
    fake.fail_with = [code]
    ids, mask, _ = _batch(engine)
    with RemoteSurrogate([fake.address], timeout=5) as client:
        with pytest.raises(ValueError, match=code.name):
            client.topk(ids, mask, 3)
    assert fake.calls["TopK"] == 1


def test_bad_k_is_refused_before_the_wire(engine, fake):
    ids, mask, _ = _batch(engine)
    with RemoteSurrogate([fake.address], timeout=5) as client:
        with pytest.raises(ValueError, match="surrogate.k"):
            client.topk(ids, mask, 65)


def test_unreachable_servers_raise_surrogate_unavailable_at_the_deadline(engine):
    ids, mask, _ = _batch(engine)
    with RemoteSurrogate([_dead_address(), _dead_address()], timeout=0.6, backoff=(0.02, 0.1)) as client:
        started = time.monotonic()
        with pytest.raises(SurrogateUnavailable, match="UNAVAILABLE"):
            client.topk(ids, mask, 3)
        assert 0.5 < time.monotonic() - started < 3
        assert client.stats()["guidance_failures"] == 1


def test_requests_go_to_the_live_endpoint(engine, fake):
    ids, mask, permitted = _batch(engine)
    with RemoteSurrogate([_dead_address(), fake.address], timeout=5, backoff=(0.5, 2.0)) as client:
        for _ in range(4):
            client.topk(ids, mask, 3, permitted)
        # The dead one failed once and then backs off; everything was answered by the live one.
        assert client.stats()["guidance_retries"] <= 2
    assert fake.calls["TopK"] == 4


def test_load_is_shared_round_robin(engine):
    servers = [FakeSurrogate(engine) for _ in range(2)]
    started = [_serve(s) for s in servers]
    try:
        ids, mask, _ = _batch(engine)
        with RemoteSurrogate([f"127.0.0.1:{port}" for _, port in started], timeout=5) as client:
            for _ in range(6):
                client.topk(ids, mask, 3)
        assert [s.calls["TopK"] for s in servers] == [3, 3]
    finally:
        for server, _ in started:
            server.stop(None)


def test_an_endpoint_with_another_surrogate_is_refused(engine):
    servers = [FakeSurrogate(engine) for _ in range(2)]
    servers[1].fingerprint = "0" * 64
    started = [_serve(s) for s in servers]
    try:
        ids, mask, permitted = _batch(engine)
        with RemoteSurrogate([f"127.0.0.1:{port}" for _, port in started], timeout=5) as client:
            with pytest.raises(ValueError, match="every endpoint must serve the same surrogate"):
                for _ in range(2):  # round-robin: one of two requests reaches the odd server
                    client.topk(ids, mask, 3, permitted)
    finally:
        for server, _ in started:
            server.stop(None)


def test_empty_batch_answers_empty_without_a_request(engine, fake):
    with RemoteSurrogate([fake.address], timeout=5) as client:
        top = client.topk(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), 4)
    assert top.ids.shape == (2, 0, 4) and top.logprobs.shape == (2, 0, 4) and "TopK" not in fake.calls


def test_guidance_resumes_when_the_server_comes_back(engine):
    address = _dead_address()
    port = int(address.rsplit(":", 1)[1])
    ids, mask, permitted = _batch(engine)
    with RemoteSurrogate([address], timeout=0.4, backoff=(0.02, 0.1)) as client:
        with pytest.raises(SurrogateUnavailable):
            client.topk(ids, mask, 3, permitted)
        servicer = FakeSurrogate(engine)
        server, _ = _serve(servicer, port)
        try:
            deadline = time.monotonic() + 10  # the channel reconnects within its 1 s backoff cap
            while True:
                try:
                    client.topk(ids, mask, 3, permitted)
                    break
                except SurrogateUnavailable:
                    assert time.monotonic() < deadline, "the client did not reconnect"
        finally:
            server.stop(None)


def _down_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "every surrogate server is down" in r.getMessage()]


def test_while_every_server_is_down_topk_fails_at_once_and_resumes_when_one_answers(engine, caplog):
    """The circuit breaker: an outage costs no timeout per batch, is logged once, and ends by itself."""
    caplog.set_level(logging.INFO, logger="surrogate_server.client")
    servicer = FakeSurrogate(engine)
    server, port = _serve(servicer)
    ids, mask, permitted = _batch(engine)
    with RemoteSurrogate([f"127.0.0.1:{port}"], timeout=30, backoff=(0.02, 0.2)) as client:
        client.topk(ids, mask, 3, permitted)
        server.stop(None)  # the server is gone (SIGKILL, as far as the client can tell)
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(SurrogateUnavailable, match="every surrogate server is down.*UNAVAILABLE"):
                client.topk(ids, mask, 3, permitted)
        down_for = time.monotonic() - started
        assert down_for < 3, down_for  # not 20 x the 30 s timeout: the first call waits for the probe, the rest not
        assert not client.healthy() and len(_down_warnings(caplog)) == 1, caplog.text  # logged once, not per call
        restarted, _ = _serve(FakeSurrogate(engine), port)  # a new process: it never saw the permitted set
        try:
            back = time.monotonic()
            while True:
                try:
                    again = client.topk(ids, mask, 3, permitted)
                    break
                except SurrogateUnavailable:
                    assert time.monotonic() - back < 5, "guidance did not resume"
                    time.sleep(0.01)
            assert client.healthy()
            stats = client.stats()
        finally:
            restarted.stop(None)
    assert stats["guidance_failures"] >= 20 and stats["guidance_reregistrations"] == 1
    assert torch.equal(again.ids, engine.topk(ids, mask, 3, permitted).ids)
    assert len(_down_warnings(caplog)) == 1
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1


def test_with_two_endpoints_the_live_one_carries_the_load_when_the_other_dies(engine):
    servers = [FakeSurrogate(engine) for _ in range(2)]
    started = [_serve(s) for s in servers]
    ids, mask, permitted = _batch(engine)
    try:
        with RemoteSurrogate([f"127.0.0.1:{port}" for _, port in started], timeout=30) as client:
            for _ in range(4):
                client.topk(ids, mask, 3, permitted)
            started[0][0].stop(None)
            begun = time.monotonic()
            for _ in range(10):
                client.topk(ids, mask, 3, permitted)  # none fails: the one in flight on the dead server moves over
            assert time.monotonic() - begun < 3 and client.healthy()
            stats = client.stats()
    finally:
        started[1][0].stop(None)
    assert servers[0].calls["TopK"] == 2 and servers[1].calls["TopK"] == 2 + 10
    assert stats["guidance_failures"] == 0 and stats["guidance_retries"] <= 1


def test_a_stalled_server_costs_one_timeout_then_calls_fail_at_once(engine, fake, caplog):
    caplog.set_level(logging.WARNING, logger="surrogate_server.client")
    ids, mask, permitted = _batch(engine)
    with RemoteSurrogate([fake.address], timeout=0.5, backoff=(0.02, 0.1)) as client:
        client.topk(ids, mask, 3, permitted)
        fake.running.clear()  # every call (and probe) now hangs
        try:
            with pytest.raises(SurrogateUnavailable, match="within 0.5s.*DEADLINE_EXCEEDED"):
                client.topk(ids, mask, 3, permitted)
            # The probe (GetInfo, 0.5 s here) times out too: from then on nothing waits.
            deadline = time.monotonic() + 5
            while client.healthy() or not _down_warnings(caplog):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            started = time.monotonic()
            for _ in range(10):
                with pytest.raises(SurrogateUnavailable, match="every surrogate server is down"):
                    client.topk(ids, mask, 3, permitted)
            assert time.monotonic() - started < 0.5
        finally:
            fake.running.set()
        deadline = time.monotonic() + 5
        while not client.healthy():
            assert time.monotonic() < deadline, "the probe did not see the server answer again"
            time.sleep(0.02)
        client.topk(ids, mask, 3, permitted)


def test_token_travels_as_bearer_metadata(engine, fake, tmp_path, monkeypatch):
    fake.token = TOKEN
    ids, mask, _ = _batch(engine)
    with RemoteSurrogate([fake.address], timeout=5) as client:
        with pytest.raises(ValueError, match="auth_token_file"):
            client.topk(ids, mask, 3)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = SurrogateConfig(endpoint=f" {fake.address} ,", auth_token_file=str(token_file), request_timeout=5)
    with connect_surrogate(cfg, torch.device("cpu")) as client:
        assert client.endpoints == [fake.address]
        client.topk(ids, mask, 3)
    monkeypatch.setenv("SDCE_SURROGATE_TOKEN", TOKEN)
    assert read_token(None) == TOKEN


def test_close_ends_calls_that_are_still_retrying(engine):
    ids, mask, _ = _batch(engine)
    client = RemoteSurrogate([_dead_address()], timeout=30, backoff=(1.0, 5.0))
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, client.topk, ids, mask, 3)))
    thread.start()
    time.sleep(0.3)  # the call has failed once and is waiting out its backoff
    started = time.monotonic()
    client.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 2 and errors


def test_endpoint_must_be_host_port():
    with pytest.raises(ValueError, match="host:port"):
        RemoteSurrogate(["localhost"])
    with pytest.raises(ValueError, match="--surrogate_endpoint"):
        connect_surrogate(SurrogateConfig(endpoint=" , "), torch.device("cpu"))
