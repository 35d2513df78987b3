"""The client of the surrogate server: a ``SurrogateSource`` in another process or host.

With ``surrogate.endpoint`` set (``--surrogate_endpoint host:port[,host:port...]``)
the trainer never loads the surrogate. It learns the surrogate's vocabulary from
the server, aligns it with the base tokenizer, and asks for top-k guidance batch
by batch; the answer is the same ``TopK`` the in-process ``SurrogateEngine``
returns (docs/method.md §6). Needs only grpcio and protobuf (the ``client`` extra)::

    source = RemoteSurrogate("host:50051,host2:50051", token=read_token(path))
    spec = source.vocabulary()                          # align_vocabularies(base_tokenizer, spec)
    top = source.topk(s_ids, s_mask, k, permitted, logprob_floor)   # TopK [B, T, k], CPU
    source.stats()                                      # latency, bytes/token, retries ... since the last call

Failure model. Each ``topk`` call has ``timeout`` seconds, retries included.
Attempts go to the endpoint with the fewest requests in flight (round-robin among
equals) that is up and not backing off; an attempt that fails with UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED or CANCELLED puts its endpoint on
exponential backoff with jitter and goes to the next one. Any other status is a
bug in the request or the server and is raised at once (``ValueError`` for the
client's errors).

Circuit breaker. A transient failure also marks its endpoint down and starts a
background probe (GetInfo, backoff capped at ``backoff[1]`` seconds): an endpoint
that answers it (a live server that was only busy) is up again at once, one that
does not stays down until it does. While every endpoint is down, ``topk`` raises
``SurrogateUnavailable`` at once instead of waiting out ``timeout``, so the trainer
skips guidance (or stops, its ``surrogate.on_failure``) at full speed; guidance
resumes with the first call after a probe got an answer. Outages are logged once
each, when the last endpoint goes down and when one answers again. ``info`` and
``vocabulary`` (start-up) still wait up to ``timeout`` for a server. The permitted
set is registered once per endpoint under its content-addressed id and registered
again when a restarted server answers NOT_FOUND.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import grpc
import torch

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from protos.sdce.surrogate.v1 import surrogate_pb2_grpc as pb_grpc
from surrogate_server import codec
from surrogate_server.auth import TOKEN_ENV, bearer
from surrogate_server.source import SurrogateInfo, SurrogateUnavailable, TopK
from surrogate_server.vocabulary import VocabularySpec, tokenizer_from_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

T = TypeVar("T")

# Worth another attempt (elsewhere, or later): the server is down, overloaded, slow or draining.
TRANSIENT = frozenset(grpc.StatusCode[name] for name in (
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"))
# Mistakes in the request or the client's set-up: retrying cannot help.
CLIENT_ERRORS = frozenset(grpc.StatusCode[name] for name in (
    "INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED",
    "UNIMPLEMENTED"))
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
PROBE_TIMEOUT = 2.0  # seconds a probe waits for GetInfo (less when attempt_timeout is shorter)
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Pings only while calls are open and no more often than a server with gRPC's default
    # policy accepts (5 min; more often earns GOAWAY "too_many_pings"). A hung server is
    # caught sooner by the per-attempt deadline anyway.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # Reconnect to a restarted server within a second, not after gRPC's default backoff of up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Our own retry loop decides where an attempt goes; no hidden retries underneath it.
    ("grpc.enable_retries", 0),
)


@dataclasses.dataclass(eq=False)
class _Endpoint:
    """One server: its channel, what this client registered there, and its health as this client sees it."""

    address: str
    channel: grpc.Channel
    stub: pb_grpc.SurrogateStub
    outstanding: int = 0  # attempts in flight
    failures: int = 0  # consecutive transient failures
    retry_at: float = 0.0  # time.monotonic() before which no attempt goes here
    registered: set[str] = dataclasses.field(default_factory=set)  # permitted ids known to this server
    last_error: str = ""  # the latest transient failure, for the SurrogateUnavailable message
    down: bool = False  # circuit open: failed, and the probe has not had an answer since
    probed: bool = True  # the probe has tried it since it went down (False: its verdict is pending)
    probing: bool = False  # a probe thread watches it
    down_since: float = 0.0  # time.monotonic() when it went down


class _Window:
    """Request metrics since the last ``stats()`` call."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.tokens = 0
        self.bytes = 0
        self.retries = 0
        self.failures = 0
        self.reregistrations = 0
        self.queue_ms = 0.0
        self.compute_ms = 0.0


class RemoteSurrogate:
    """A ``SurrogateSource`` backed by one or more surrogate servers; thread-safe.

    Args:
        endpoints: ``host:port`` of each server (a list, or one comma-separated string); all
            must serve the same surrogate.
        token: shared secret sent as ``authorization: Bearer <token>`` metadata (None: no auth).
        tls_ca: PEM file of the CA that signed the servers' certificates (None: plaintext).
        timeout: seconds one call may take, retries included, before SurrogateUnavailable.
        attempt_timeout: seconds one attempt may take (default: all of ``timeout`` with one
            endpoint; half of it with several, so a hung server leaves time for another).
        backoff: (first, largest) pause in seconds before an endpoint that failed is tried again.
    """

    def __init__(
        self,
        endpoints: list[str] | str,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        timeout: float = 60.0,
        attempt_timeout: float | None = None,
        backoff: tuple[float, float] = (0.05, 2.0),
    ):
        if isinstance(endpoints, str):
            endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("no surrogate endpoint: pass --surrogate_endpoint host:port[,host:port...]")
        if timeout <= 0:
            raise ValueError(f"surrogate.request_timeout must be > 0 seconds, got {timeout}")
        for address in endpoints:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"surrogate endpoint {address!r} is not host:port")
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout or (timeout / 2 if len(endpoints) > 1 else timeout)
        self.backoff = backoff
        self._metadata = (("authorization", bearer(token)),) if token else ()
        credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None
        self._endpoints = [self._open(address, credentials) for address in endpoints]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # an endpoint came up or went down, or close()
        self._packed_permitted: tuple[torch.Tensor, pb.Tensor, str] | None = None
        self._turn = itertools.count()
        self._window = _Window()
        self._info: pb.InfoResponse | None = None
        self._vocabulary: pb.VocabularyResponse | None = None
        self._spec: VocabularySpec | None = None
        self._closed = threading.Event()

    @staticmethod
    def _open(address: str, credentials: grpc.ChannelCredentials | None) -> _Endpoint:
        if credentials is None:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        return _Endpoint(address, channel, pb_grpc.SurrogateStub(channel))

    @property
    def endpoints(self) -> list[str]:
        return [e.address for e in self._endpoints]

    # -- what the server runs --------------------------------------------------------
    def info(self) -> SurrogateInfo:
        """What the first server that answers runs (asked once)."""
        wire = self._wire_info()
        return SurrogateInfo(wire.model_id, wire.vocab_size, wire.vocabulary_fingerprint, wire.dtype, wire.device,
                             wire.weights_fingerprint)

    def _wire_info(self) -> pb.InfoResponse:
        """GetInfo of the first server that answers (cached after the first call)."""
        if self._info is None:
            self._info = self._call("GetInfo", lambda ep, t: ep.stub.GetInfo(pb.InfoRequest(), **self._opts(t)))
        return self._info

    def _opts(self, seconds: float) -> dict:
        """Per-call keyword arguments: the deadline and the auth metadata."""
        return {"timeout": seconds, "metadata": self._metadata}

    def vocabulary(self) -> VocabularySpec:
        """The surrogate's vocabulary from the server, checked against the fingerprint GetInfo announces (once)."""
        if self._spec is not None:
            return self._spec
        info = self._wire_info()
        response = self._vocabulary_response()
        if response.HasField("vocabulary"):
            spec = codec.decode_vocabulary(response.vocabulary)
        else:  # a server of the first release
            spec = VocabularySpec.from_json(response.spec_json)
        fingerprints = {spec.fingerprint(), response.fingerprint, info.vocabulary_fingerprint}
        if len(fingerprints) != 1:
            raise ValueError(
                f"the surrogate vocabulary from {self.endpoints} is inconsistent (fingerprints "
                f"{sorted(fingerprints)}): all endpoints must serve the same model and tokenizer"
            )
        log.info(
            "surrogate server %s: model %s, %d-token %s vocabulary, %s on %s",
            ",".join(self.endpoints), info.model_id, len(spec.tokens), spec.family, info.dtype, info.device,
        )
        self._spec = spec
        return spec

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The surrogate's tokenizer, sent by the server (no download); checked against its vocabulary."""
        if not self._vocabulary_response().tokenizer_json:
            raise ValueError(f"surrogate server {self.endpoints[0]} sends no tokenizer (a first-release server): "
                             "upgrade it, or use --surrogate_alignment tokens")
        return tokenizer_from_json(self._vocabulary_response().tokenizer_json, self.vocabulary())

    def _vocabulary_response(self) -> pb.VocabularyResponse:
        """GetVocabulary of the first server that answers (asked once: the tokenizer is megabytes)."""
        if self._vocabulary is None:
            request = pb.VocabularyRequest()
            self._vocabulary = self._call("GetVocabulary",
                                          lambda ep, t: ep.stub.GetVocabulary(request, **self._opts(t)))
        return self._vocabulary

    # -- guidance ----------------------------------------------------------------------
    def topk(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        permitted: torch.Tensor | None = None,
        logprob_floor: float | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> TopK:
        """Same contract as ``SurrogateEngine.topk``; the result is on the CPU.

        Raises SurrogateUnavailable when no server answered within ``timeout`` seconds,
        ValueError when a server rejects the request as malformed.
        """
        info = self._wire_info()
        if not 1 <= k <= info.max_k:
            raise ValueError(f"k={k} is outside the server's range [1, {info.max_k}]: lower surrogate.k")
        if input_ids.numel() == 0:  # the server refuses empty requests; the engine answers them empty
            shape = (*input_ids.shape, k)
            return TopK(logprobs=torch.full(shape, float("-inf")), ids=torch.full(shape, -1, dtype=torch.long))
        mask, permitted_id = self._packed(permitted, info.vocab_size)
        rows = self._row_chunks(input_ids.shape, info.max_tokens_per_request)
        parts = []
        for start, stop in rows:
            request = pb.TopKRequest(
                input_ids=codec.pack(input_ids[start:stop], pb.INT32),
                attention_mask=codec.pack(attention_mask[start:stop], pb.UINT8),
                k=k,
                logprob_floor=logprob_floor,
                permitted_id=permitted_id,
            )
            if position_ids is not None:
                request.position_ids.CopyFrom(codec.pack(position_ids[start:stop], pb.INT32))
            parts.append(self._request_topk(request, mask, permitted_id, k))
        if len(parts) == 1:
            return parts[0]
        return TopK(logprobs=torch.cat([p.logprobs for p in parts]), ids=torch.cat([p.ids for p in parts]))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as ``SurrogateEngine.score``; the result is on the CPU (a server of an earlier release
        answers UNIMPLEMENTED, raised as a ValueError)."""
        info = self._wire_info()
        parts = []
        for start, stop in self._row_chunks(input_ids.shape, info.max_tokens_per_request):
            request = pb.ScoreRequest(input_ids=codec.pack(input_ids[start:stop], pb.INT32),
                                      attention_mask=codec.pack(attention_mask[start:stop], pb.UINT8),
                                      targets=codec.pack(targets[start:stop], pb.INT32))
            if position_ids is not None:
                request.position_ids.CopyFrom(codec.pack(position_ids[start:stop], pb.INT32))
            response = self._call("Score", lambda ep, t: ep.stub.Score(request, **self._opts(t)), fail_fast=True)
            logprobs = codec.unpack(response.logprobs, "logprobs", dtypes=(pb.FLOAT32,), ndim=2)
            parts.append(torch.from_numpy(logprobs.copy()))
        return torch.cat(parts)

    def _request_topk(self, request: pb.TopKRequest, mask: pb.Tensor | None, permitted_id: str, k: int) -> TopK:
        batch, length = request.input_ids.shape
        started = time.perf_counter()
        response = self._call("TopK", lambda ep, t: self._topk_on(ep, request, mask, permitted_id, t), fail_fast=True)
        logprobs, ids = codec.decode_topk(response.counts, response.ids, response.logprobs, k)
        with self._lock:
            w = self._window
            w.latencies.append(time.perf_counter() - started)
            w.tokens += batch * length
            w.bytes += response.ByteSize()
            w.queue_ms += response.timings.queue_ms
            w.compute_ms += response.timings.compute_ms
        return TopK(logprobs=logprobs, ids=ids)

    def _topk_on(
        self, ep: _Endpoint, request: pb.TopKRequest, mask: pb.Tensor | None, permitted_id: str, budget: float
    ) -> pb.TopKResponse:
        """One attempt on one endpoint: register the permitted set if this server lacks it, then TopK."""
        deadline = time.monotonic() + budget
        if permitted_id and permitted_id not in ep.registered:
            self._register(ep, mask, permitted_id, deadline)
        try:
            return ep.stub.TopK(request, **self._opts(deadline - time.monotonic()))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND or not permitted_id:
                raise
        # The server restarted and forgot the set: register it again, once.
        with self._lock:
            ep.registered.discard(permitted_id)
            self._window.reregistrations += 1
        log.info("surrogate server %s lost the permitted set (restarted?): registering it again", ep.address)
        self._register(ep, mask, permitted_id, deadline)
        return ep.stub.TopK(request, **self._opts(deadline - time.monotonic()))

    def _register(self, ep: _Endpoint, mask: pb.Tensor, permitted_id: str, deadline: float) -> None:
        """Register the mask on ``ep``, first checking that ``ep`` (new to us, or restarted) serves our surrogate."""
        info = ep.stub.GetInfo(pb.InfoRequest(), **self._opts(deadline - time.monotonic()))
        expected = self._wire_info()
        served = (info.vocabulary_fingerprint, info.vocab_size, info.weights_fingerprint)
        if served != (expected.vocabulary_fingerprint, expected.vocab_size, expected.weights_fingerprint):
            raise ValueError(
                f"surrogate server {ep.address} serves {info.model_id!r} (vocabulary "
                f"{info.vocabulary_fingerprint[:12]}, {info.vocab_size} ids, weights {info.weights_fingerprint[:12]}), "
                f"not the {expected.model_id!r} this run aligned with ({expected.vocabulary_fingerprint[:12]}, "
                f"{expected.vocab_size} ids, weights {expected.weights_fingerprint[:12]}): every endpoint must serve "
                "the same surrogate"
            )
        response = ep.stub.RegisterPermitted(
            pb.RegisterPermittedRequest(mask=mask), **self._opts(deadline - time.monotonic())
        )
        if response.permitted_id != permitted_id:
            raise RuntimeError(
                f"surrogate server {ep.address} registered the permitted set as {response.permitted_id}, "
                f"expected sha256 {permitted_id}: client and server disagree on the mask encoding"
            )
        with self._lock:
            ep.registered.add(permitted_id)

    def _packed(self, permitted: torch.Tensor | None, vocab_size: int) -> tuple[pb.Tensor | None, str]:
        """The packed [vocab_size] UINT8 mask and its content-addressed id (sha256 hex); (None, "") for no mask.

        Reused while the caller passes the same tensor (the trainer does, with every request).
        """
        if permitted is None:
            return None, ""
        cached = self._packed_permitted
        if cached is not None and cached[0] is permitted:
            return cached[1], cached[2]
        if permitted.dim() != 1 or permitted.shape[0] > vocab_size:
            raise ValueError(
                f"permitted must be 1-D with at most {vocab_size} entries (the server's vocab_size), "
                f"got shape {tuple(permitted.shape)}"
            )
        full = torch.zeros(vocab_size, dtype=torch.uint8)
        full[: permitted.shape[0]] = permitted.to(torch.uint8)
        mask = codec.pack(full, pb.UINT8)
        permitted_id = codec.permitted_id(mask)
        self._packed_permitted = (permitted, mask, permitted_id)
        return mask, permitted_id

    @staticmethod
    def _row_chunks(shape: torch.Size, max_tokens: int) -> list[tuple[int, int]]:
        """Row ranges of a [B, T] batch such that each request holds at most ``max_tokens`` positions."""
        batch, length = shape
        if not max_tokens or batch * length <= max_tokens:
            return [(0, batch)]
        if length > max_tokens:
            raise ValueError(
                f"one sequence of {length} tokens exceeds the server's max_tokens_per_request={max_tokens}: "
                "lower data.max_seq_length or raise the server's limit"
            )
        rows = max_tokens // length
        return [(start, min(start + rows, batch)) for start in range(0, batch, rows)]

    # -- retries, failover and the circuit breaker ------------------------------------------
    def _call(self, what: str, attempt: Callable[[_Endpoint, float], T], *, fail_fast: bool = False) -> T:
        """Run ``attempt(endpoint, seconds)`` until one succeeds, failing over and backing off until the deadline.

        ``fail_fast``: give up at once while every endpoint is down (guidance), instead of
        waiting for one to come back until the deadline (start-up calls).
        """
        deadline = time.monotonic() + self.timeout
        while (ep := self._acquire(deadline, fail_fast)) is not None:
            budget = min(self.attempt_timeout, deadline - time.monotonic())
            try:
                result = attempt(ep, budget)
            except grpc.RpcError as err:
                if err.code() not in TRANSIENT:
                    self._release(ep)
                    raise _permanent_error(what, ep.address, err) from None
                self._release(ep, transient_error=f"{err.code().name}: {err.details()}")
                log.debug("%s on %s failed (%s); retrying", what, ep.address, ep.last_error)
                continue
            except BaseException:
                self._release(ep)
                raise
            self._release(ep, ok=True)
            return result
        with self._lock:
            self._window.failures += 1
            detail = "; ".join(f"{e.address}: {e.last_error}" for e in self._endpoints if e.failures) or "too slow"
            all_down = all(e.down and e.probed for e in self._endpoints)
        if fail_fast and all_down:
            raise SurrogateUnavailable(
                f"every surrogate server is down ({detail}): {what} given up without waiting; "
                "guidance resumes once one answers")
        raise SurrogateUnavailable(f"no surrogate server answered {what} within {self.timeout:g}s ({detail})")

    def _acquire(self, deadline: float, fail_fast: bool) -> _Endpoint | None:
        """The endpoint for the next attempt, waiting out backoff and pending probes; None past the deadline
        (or, with ``fail_fast``, as soon as every endpoint is known to be down)."""
        with self._changed:
            while True:
                if self._closed.is_set():
                    raise RuntimeError("this RemoteSurrogate is closed")
                now = time.monotonic()
                if now >= deadline:
                    return None
                up = [e for e in self._endpoints if not e.down]
                if fail_fast and not up and all(e.probed for e in self._endpoints):
                    return None
                turn = next(self._turn)
                n = len(self._endpoints)
                candidates = [self._endpoints[(turn + i) % n] for i in range(n)]
                candidates = [e for e in candidates if not e.down] if up or fail_fast else candidates
                ready = [e for e in candidates if e.retry_at <= now]
                if ready:
                    ep = min(ready, key=lambda e: e.outstanding)  # min keeps the round-robin order among ties
                    ep.outstanding += 1
                    return ep
                # Nothing to try yet: wait for a backoff to end, a probe's verdict or close().
                wake = min((e.retry_at for e in candidates), default=deadline)
                self._changed.wait(max(0.0, min(wake, deadline) - now))

    def _release(self, ep: _Endpoint, *, ok: bool = False, transient_error: str | None = None) -> None:
        """End an attempt on ``ep``: success closes its circuit, a transient error extends its backoff and opens it."""
        with self._lock:
            ep.outstanding -= 1
            if ok:
                self._mark_up(ep)
            elif transient_error is not None:
                first, largest = self.backoff
                # At least ~4 attempts fit in one call's timeout, however long the outage has been.
                pause = min(largest, self.timeout / 4, first * 2**ep.failures) * random.uniform(0.5, 1.0)
                ep.failures += 1
                ep.retry_at = time.monotonic() + pause
                ep.last_error = transient_error
                self._window.retries += 1
                if not ep.down:
                    ep.down, ep.probed, ep.down_since = True, False, time.monotonic()
                if not ep.probing:
                    ep.probing = True
                    threading.Thread(target=self._probe, args=(ep,), name=f"probe-{ep.address}", daemon=True).start()

    def _mark_up(self, ep: _Endpoint) -> None:
        """``ep`` answered (a call or the probe): close its circuit and end its backoff. Holds the lock."""
        if not (ep.down or ep.failures):
            return
        if ep.down and ep.probed:  # it was confirmed down: an outage ends
            log.warning("surrogate server %s answers again after %.1fs: guidance resumes",
                        ep.address, time.monotonic() - ep.down_since)
        elif ep.failures:
            log.info("surrogate server %s answers again", ep.address)
        ep.failures, ep.retry_at, ep.down, ep.probed = 0, 0.0, False, True
        self._changed.notify_all()

    def _probe(self, ep: _Endpoint) -> None:
        """Ask ``ep`` for GetInfo, backing off, for as long as it is down (any status but a transient one
        means a server answers: it is up). Runs in its own thread, one per endpoint at a time."""
        first, largest = self.backoff
        timeout = min(PROBE_TIMEOUT, self.attempt_timeout)
        pause, tries = 0.0, 0
        while not self._closed.wait(pause):
            with self._lock:  # the check and the exit are one step: a failure after it starts a new probe
                if not ep.down:
                    ep.probing = False
                    return
            try:
                ep.stub.GetInfo(pb.InfoRequest(), **self._opts(timeout))
            except grpc.RpcError as err:
                if err.code() in TRANSIENT:
                    self._confirm_down(ep, f"{err.code().name}: {err.details()}")
                    pause, tries = min(largest, first * 2**tries) * random.uniform(0.5, 1.0), tries + 1
                    continue
            except ValueError:
                if self._closed.is_set():  # close() closed the channel under the call
                    break
                raise
            with self._lock:
                self._mark_up(ep)
            pause, tries = 0.0, 0
        with self._lock:
            ep.probing = False

    def _confirm_down(self, ep: _Endpoint, error: str) -> None:
        """The probe found ``ep`` unreachable: it stays down. Logged once per outage, before the calls it fails."""
        with self._lock:
            if not ep.down:  # a call got through since the probe started
                return
            first_verdict, ep.probed, ep.last_error = not ep.probed, True, error
            if first_verdict and all(e.down and e.probed for e in self._endpoints):
                log.warning("every surrogate server is down (%s): guidance requests fail at once, without waiting, "
                            "until one answers (probed every <= %gs)",
                            "; ".join(f"{e.address}: {e.last_error}" for e in self._endpoints), self.backoff[1])
            elif first_verdict:
                log.warning("surrogate server %s is down (%s): the others take its requests", ep.address, error)
            self._changed.notify_all()

    # -- metrics and lifetime --------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Guidance request metrics since the previous call (for the trainer's logs).

        Latency is per topk request as the trainer sees it, retries included; bytes
        are the serialized responses (log-probs and ids on the wire) per position asked.
        """
        with self._lock:
            w, self._window = self._window, _Window()
        requests = len(w.latencies)
        stats = {
            "guidance_requests": float(requests),
            "guidance_retries": float(w.retries),
            "guidance_failures": float(w.failures),
        }
        if requests:
            stats.update(
                guidance_latency_ms_mean=1e3 * statistics.fmean(w.latencies),
                guidance_latency_ms_p50=1e3 * statistics.median(w.latencies),
                guidance_bytes_per_token=w.bytes / max(w.tokens, 1),
                guidance_server_queue_ms=w.queue_ms / requests,
                guidance_server_compute_ms=w.compute_ms / requests,
            )
        if w.reregistrations:
            stats["guidance_reregistrations"] = float(w.reregistrations)
        return stats

    def healthy(self) -> bool:
        """Whether some endpoint is up: its circuit closed (no call is made)."""
        with self._lock:
            return any(not e.down for e in self._endpoints)

    def close(self) -> None:
        """Close the channels; calls still retrying (prefetches nobody will use) end at once with RuntimeError."""
        with self._changed:
            self._closed.set()
            self._changed.notify_all()
        for ep in self._endpoints:
            ep.channel.close()

    def __enter__(self) -> RemoteSurrogate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteSurrogate({','.join(self.endpoints)}, timeout={self.timeout:g}s)"


def _permanent_error(what: str, address: str, err: grpc.RpcError) -> Exception:
    """The exception for a status that retrying cannot fix: ValueError for the client's mistakes."""
    code, details = err.code(), err.details()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return ValueError(
            f"surrogate server {address} refused {what} ({code.name}: {details}): put its shared secret in "
            f"surrogate.auth_token_file (--surrogate_auth_token_file) or ${TOKEN_ENV}"
        )
    if code in CLIENT_ERRORS:
        return ValueError(f"surrogate server {address} rejected {what} ({code.name}): {details}")
    return RuntimeError(f"surrogate server {address} failed {what} ({code.name}): {details}")
