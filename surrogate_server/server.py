"""The surrogate gRPC server (protos/sdce/surrogate/v1/surrogate.proto) and its shared core.

    core = ServingCore(engine, ServerConfig(max_k=64))
    server, port = create_server(core, host="127.0.0.1", port=0)
    await core.start()             # health SERVING
    await server.start()
    ...
    deadline = time.monotonic() + 30
    await core.start_draining()    # health NOT_SERVING, watches end; calls already sent taken in, then
                                   # new TopK calls UNAVAILABLE and open streams stop reading
    await core.wait_idle(deadline) # every call received answered, and no new ones arriving
    await server.stop(grace=1)     # only now: grpc's stop cancels calls it holds but has not handed over
    await core.close()

``ServingCore`` holds what the gRPC edge (``GrpcEdge``) and the HTTP edge (``surrogate_server.http``) share: the
engine, the dynamic batcher, the registered permitted sets, request validation, health
and the per-instance Prometheus metrics. Every user error is a :class:`ServiceError`
with a status code and a message saying what to change; the edges map it to a gRPC
status, a streaming ``error_code`` or an HTTP status.

Auth: with ``ServerConfig.auth_token`` set, every RPC must carry the metadata
``authorization: Bearer <token>``, or it fails with UNAUTHENTICATED. The standard health
service stays open (load balancers and orchestrators probe without secrets; it reveals
nothing but SERVING / NOT_SERVING). Reflection requires the token like everything else.

Every RPC passes :class:`EdgeInterceptor` before a byte of it is parsed: auth first, then
the request messages are parsed by the edge, so bytes that are not the method's message
answer INVALID_ARGUMENT (grpc's own parsing would answer UNKNOWN and log a traceback).
A ``TopKStream`` ends with OK once the client closed its side and every request is
answered; with INVALID_ARGUMENT when a message on it does not parse, and with UNAVAILABLE
when the server starts draining: in both cases after the answers owed for the requests
before that point, and requests after it were not run (send them again, elsewhere).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from torch import Tensor

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from protos.sdce.surrogate.v1 import surrogate_pb2_grpc as pb_grpc
from surrogate_server import codec
from surrogate_server.auth import TOKEN_ENV, authorized
from surrogate_server.batcher import BatcherConfig, Closed, DynamicBatcher, Job, QueueFull
from surrogate_server.config_cli import option
from surrogate_server.engine import SurrogateEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Surrogate"].full_name  # "sdce.surrogate.v1.Surrogate"
PROTOCOL_VERSION = 1
SERVER_VERSION = "0.1.0"
_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
_QUIET_S = 0.2  # draining: a pause in arrivals this long means grpc holds no call not yet handed over
_BACKLOG_S = 1.0  # draining: how long calls are still taken in while they keep arriving (the backlog)


@dataclass
class ServerConfig:
    """Limits and security of one server (the options are also CLI flags, section ``server``)."""

    max_k: int = option(64, "Largest k a request may ask for.")
    max_tokens_per_request: int = option(
        16384, "Largest B*T of one request; larger batches are refused with INVALID_ARGUMENT.")
    max_permitted_sets: int = option(
        64, "Permitted sets kept in memory; the least recently used is forgotten (clients re-register).")
    max_message_mb: float = option(64.0, "gRPC send/receive and HTTP body limit, MiB.")
    tls_cert: str | None = option(None, "PEM certificate: serve gRPC and HTTP over TLS.")
    tls_key: str | None = option(None, "PEM private key of --tls_cert.")
    auth_token: str | None = None
    """Shared secret every call must carry; None = no auth. Never a CLI flag (it would show in ps)."""
    model_id: str = ""
    """The hub name or path reported by GetInfo; defaults to the model config's name."""
    batcher: BatcherConfig = field(default_factory=BatcherConfig)

    def __post_init__(self) -> None:
        for name in ("max_k", "max_tokens_per_request", "max_permitted_sets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        codec.counts_dtype(self.max_k)  # max_k must fit the counts encoding
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both --tls_cert and --tls_key, or neither")
        worst = self.max_tokens_per_request * (2 + 8 * self.max_k) + (64 << 10)  # + headroom for the rest
        if worst > self.max_message_bytes:
            raise ValueError(f"a response may take {worst / 2**20:.1f} MiB (max_tokens_per_request x (2 + 8 x max_k) "
                             f"bytes), over max_message_mb = {self.max_message_mb}; raise --max_message_mb or lower "
                             "--max_tokens_per_request / --max_k")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


class ServiceError(Exception):
    """A request the server refuses: a gRPC status code and a message saying what to change."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Metrics:
    """Prometheus metrics of one server instance, in their own registry (never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdce_surrogate_requests", "Calls by rpc and final status code",
                                ["rpc", "code"], registry=r)
        self.errors = Counter("sdce_surrogate_errors", "Failed calls by status code", ["code"], registry=r)
        self.tokens = Counter("sdce_surrogate_tokens", "Positions (B*T) answered", registry=r)
        self.batch_requests = Histogram("sdce_surrogate_batch_requests", "Requests merged into one forward",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128), registry=r)
        self.batch_tokens = Histogram("sdce_surrogate_batch_tokens", "Padded tokens in one forward",
                                      buckets=tuple(2.0**i for i in range(4, 20)), registry=r)
        self.queue_depth = Gauge("sdce_surrogate_queue_depth", "Requests waiting for a forward", registry=r)
        latency = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.queue_seconds = Histogram("sdce_surrogate_queue_seconds", "Time a request waited for its forward",
                                       buckets=latency, registry=r)
        self.compute_seconds = Histogram("sdce_surrogate_compute_seconds", "Time of the forward batch a request "
                                         "was part of", buckets=latency, registry=r)
        self.request_seconds = Histogram("sdce_surrogate_request_seconds", "Time from receipt to answer, by rpc",
                                         ["rpc"], buckets=latency, registry=r)

    def observe_batch(self, requests: int, tokens: int, compute_s: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_tokens.observe(tokens)

    def observe_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def observe_call(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(rpc, code.name).inc()
        if code != grpc.StatusCode.OK:
            self.errors.labels(code.name).inc()
        self.request_seconds.labels(rpc).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Health(health_pb2_grpc.HealthServicer):
    """The standard ``grpc.health.v1`` service, whose ``Watch`` streams end when draining starts.

    grpcio-health-checking's aio servicer keeps a ``Watch`` open until its client leaves,
    so one watcher held every graceful stop for the whole grace period. Here a watch sends
    each change and, once the server drains, NOT_SERVING and then ends (status OK).
    """

    def __init__(self) -> None:
        self._status = {"": _SERVING}
        self._draining = False
        self._changed: asyncio.Event | None = None  # set, then replaced, at every change; made on the loop

    def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Set ``service``'s status (ignored once draining: it stays NOT_SERVING)."""
        if not self._draining:
            self._status[service] = status
            self._notify()

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; open watches send it and end."""
        self._status = dict.fromkeys(self._status, _NOT_SERVING)
        self._draining = True
        self._notify()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service {request.service!r} here; ask for "
                                f"one of {sorted(self._status)}")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._status.items()})

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        last = None
        while True:
            changed = self._event()
            status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._draining:
                return
            await changed.wait()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class ServingCore:
    """What the gRPC and HTTP edges share; see the module docstring."""

    def __init__(self, engine: SurrogateEngine, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.batcher = DynamicBatcher(engine.topk, self.config.batcher, observer=self.metrics)
        self.health = Health()
        self.started = False
        self.draining = False  # health NOT_SERVING, shutting down
        self.refusing = False  # draining, and new TopK calls get UNAVAILABLE
        self._streams: set[asyncio.Task[None]] = set()  # stream readers, stopped when refusing
        self._calls: set[asyncio.Task[Any]] = set()  # Surrogate RPCs running (each whole call, sending included)
        self._last_arrival = -math.inf  # time.monotonic() when the newest RPC arrived
        self._permitted: OrderedDict[str, Tensor] = OrderedDict()  # permitted id -> bool [len]
        self._spec = engine.vocabulary() if engine.has_tokenizer else None
        self._info = self._build_info()

    @property
    def ready(self) -> bool:
        """Model loaded, serving started and not draining."""
        return self.started and not self.draining

    async def start(self) -> None:
        """Mark the service SERVING (idempotent)."""
        if not self.started:
            for name in ("", SERVICE_NAME):
                self.health.set(name, _SERVING)
            self.started = True

    async def start_draining(self, deadline: float = math.inf) -> None:
        """Health NOT_SERVING (watches end); then, once arrivals pause (at most 1 s, or until
        ``deadline``, a ``time.monotonic()`` value), new TopK calls UNAVAILABLE and open
        streams stop reading.

        The pause lets in what clients sent before the signal but grpc has not handed over
        yet (a burst sent just before SIGTERM): it is answered, not refused.
        """
        if not self.draining:
            self.draining = True
            self.health.enter_graceful_shutdown()
            await self.wait_idle(min(time.monotonic() + _BACKLOG_S, deadline), running=False)
            self.refusing = True
            for reader in list(self._streams):
                reader.cancel()

    def arrived(self, call: asyncio.Task[Any] | None) -> None:
        """Note an RPC that has just arrived; ``call`` (its task) is in flight until it ends."""
        self._last_arrival = time.monotonic()
        if call is not None:
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def wait_idle(self, deadline: float, quiet_s: float = _QUIET_S, running: bool = True) -> bool:
        """Wait until no RPC arrived for ``quiet_s`` and (``running``) no Surrogate RPC runs; False if
        ``deadline`` (a ``time.monotonic()`` value) came first.

        grpc's ``server.stop`` cancels the calls its core has received but not yet handed
        to the application, so it is called only after arrivals have stopped: until then
        each new call is answered (TopK: UNAVAILABLE).
        """
        while True:
            now = time.monotonic()
            if not (running and self._calls) and now - self._last_arrival >= quiet_s:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(0.01)

    async def close(self, timeout: float | None = None) -> None:
        """Drain and stop the batcher (queued requests still run)."""
        await self.start_draining()
        await self.batcher.close(timeout)

    async def call(self, rpc: str, fn: Callable[[], Awaitable[T] | T]) -> T:
        """Run one call of ``rpc``, recording its metrics; any unexpected error becomes INTERNAL."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            result = fn()
            return await result if inspect.isawaitable(result) else result
        except ServiceError as err:
            code = err.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", rpc)
            raise ServiceError(code, f"internal error in {rpc}: {type(err).__name__}: {err}") from err
        finally:
            self.metrics.observe_call(rpc, code, time.perf_counter() - started)

    def info(self) -> pb.InfoResponse:
        return self._info

    def vocabulary(self) -> pb.VocabularyResponse:
        if self._spec is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this server's model was loaded without a tokenizer; it has no vocabulary to send")
        return pb.VocabularyResponse(spec_json=self._spec.to_json(), vocabulary=codec.encode_vocabulary(self._spec),
                                     fingerprint=self._info.vocabulary_fingerprint,
                                     tokenizer_json=self.engine.tokenizer().backend_tokenizer.to_str())

    def register_permitted(self, request: pb.RegisterPermittedRequest) -> pb.RegisterPermittedResponse:
        """Store a permitted-id mask under its content address (LRU-bounded)."""
        vocab = self.engine.vocab_size
        mask = _unpack(request.mask, "mask", dtypes=(pb.UINT8,), ndim=1)
        if not 1 <= len(mask) <= vocab:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"mask must have between 1 and vocab_size = {vocab} "
                               f"entries (one per surrogate id), got {len(mask)}")
        if mask.max() > 1:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "mask must hold only 0 and 1")
        count = int(mask.sum(dtype=np.int64))
        if count == 0:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "the permitted set is empty; permit at least one id")
        key = codec.permitted_id(request.mask)
        self._permitted[key] = torch.from_numpy(mask.astype(bool))
        self._permitted.move_to_end(key)
        while len(self._permitted) > self.config.max_permitted_sets:
            self._permitted.popitem(last=False)
        return pb.RegisterPermittedResponse(permitted_id=key, permitted_count=count)

    async def topk(self, request: pb.TopKRequest) -> pb.TopKResponse:
        """Validate, queue for a shared forward, encode compactly."""
        if self.refusing:
            raise _draining()
        job = self._job(request)
        try:
            result = await self.batcher.submit(job)
        except QueueFull as err:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from err
        except Closed as err:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, str(err)) from err
        floor = request.logprob_floor if request.HasField("logprob_floor") else None
        counts, ids, logprobs = codec.encode_topk(result.logprobs, result.ids, floor=floor)
        self.metrics.tokens.inc(job.input_ids.numel())
        self.metrics.queue_seconds.observe(result.queue_ms / 1000)
        self.metrics.compute_seconds.observe(result.compute_ms / 1000)
        timings = pb.Timings(queue_ms=result.queue_ms, compute_ms=result.compute_ms,
                             batch_requests=result.batch_requests, batch_tokens=result.batch_tokens)
        return pb.TopKResponse(request_id=request.request_id, counts=counts, ids=ids, logprobs=logprobs,
                               timings=timings)

    async def score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        """Validate, then score on the engine (which serialises it with the batcher's forwards)."""
        if self.refusing:
            raise _draining()
        ids, mask, positions = self._inputs(request)
        targets = _unpack(request.targets, "targets", dtypes=(pb.INT32, pb.INT64), ndim=2)
        if targets.shape != ids.shape or targets.min() < -1 or targets.max() >= self.engine.vocab_size:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"targets must be [B, T] = {list(ids.shape)} of ids "
                               f"in [-1, {self.engine.vocab_size}) (-1 = none), got shape {list(targets.shape)}")
        logprobs = await asyncio.get_running_loop().run_in_executor(
            None, self.engine.score, ids, mask, torch.from_numpy(targets.astype(np.int64)), positions)
        self.metrics.tokens.inc(ids.numel())
        return pb.ScoreResponse(logprobs=codec.pack(logprobs.float(), pb.FLOAT32))

    def _job(self, request: pb.TopKRequest) -> Job:
        """The batcher job for a request, or ServiceError naming what is wrong with it."""
        invalid = functools.partial(ServiceError, grpc.StatusCode.INVALID_ARGUMENT)
        ids, mask, positions = self._inputs(request)
        if not 1 <= request.k <= self.config.max_k:
            raise invalid(f"k must be in [1, max_k = {self.config.max_k}], got {request.k}")
        if request.HasField("logprob_floor") and math.isnan(request.logprob_floor):
            raise invalid("logprob_floor is NaN; send a log-probability such as log(0.02), or leave it unset")
        permitted = None
        if request.permitted_id:
            permitted = self._permitted.get(request.permitted_id)
            if permitted is None:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, f"permitted set {request.permitted_id!r} is not "
                                   "registered here (the server restarted or forgot it); call RegisterPermitted "
                                   "again and retry")
            self._permitted.move_to_end(request.permitted_id)
        return Job.make(ids, mask, request.k, request.permitted_id, permitted, positions)

    def _inputs(self, request: pb.TopKRequest | pb.ScoreRequest) -> tuple[Tensor, Tensor, Tensor | None]:
        """A request's (input_ids, attention_mask, position_ids or None) as int64 tensors, or ServiceError
        naming what is wrong with them."""
        invalid = functools.partial(ServiceError, grpc.StatusCode.INVALID_ARGUMENT)
        ids = _unpack(request.input_ids, "input_ids", dtypes=(pb.INT32, pb.INT64), ndim=2)
        batch, length = ids.shape
        limit, vocab = self.config.max_tokens_per_request, self.engine.vocab_size
        if ids.size == 0:
            raise invalid(f"input_ids is empty (shape [{batch}, {length}]); send at least one position")
        if ids.size > limit:
            raise invalid(f"input_ids has B*T = {batch} x {length} = {ids.size} positions, over "
                          f"max_tokens_per_request = {limit}; split the batch into smaller requests")
        if self.engine.max_positions is not None and length > self.engine.max_positions:
            raise invalid(f"sequence length T = {length} exceeds the model's max_position_embeddings = "
                          f"{self.engine.max_positions}; send shorter sequences")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise invalid(f"input_ids must lie in [0, {vocab}) (the surrogate vocabulary), got values in "
                          f"[{low}, {high}]; map unaligned tokens to a valid placeholder id with attention_mask 0")
        if request.HasField("attention_mask"):
            mask = _unpack(request.attention_mask, "attention_mask", dtypes=(pb.UINT8,), ndim=2)
            if mask.shape != ids.shape:
                raise invalid(f"attention_mask shape {list(mask.shape)} must equal input_ids shape {list(ids.shape)}")
            if mask.max() > 1:
                raise invalid("attention_mask must hold only 0 and 1")
        else:
            mask = np.ones(ids.shape, np.int64)
        positions = None
        if request.HasField("position_ids"):
            positions = _unpack(request.position_ids, "position_ids", dtypes=(pb.INT32, pb.INT64), ndim=2)
            if positions.shape != ids.shape:
                raise invalid(f"position_ids shape {list(positions.shape)} must equal input_ids shape {list(ids.shape)}")
            if positions.min() < 0 or positions.max() >= length:
                raise invalid(f"position_ids must lie in [0, T = {length}), got values in "
                              f"[{int(positions.min())}, {int(positions.max())}]")
            positions = torch.from_numpy(positions.astype(np.int64))
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)), positions

    def _build_info(self) -> pb.InfoResponse:
        info, spec = self.engine.info(), self._spec
        tokenizer = self.engine.tokenizer() if spec is not None else None
        return pb.InfoResponse(
            protocol_version=PROTOCOL_VERSION, server_version=SERVER_VERSION,
            model_id=self.config.model_id or info.model_id, vocab_size=info.vocab_size,
            tokenizer_size=len(tokenizer) if tokenizer is not None else 0,
            tokenizer_family=spec.family if spec else "", special_tokens=spec.special_tokens if spec else {},
            vocabulary_fingerprint=info.vocabulary_fingerprint, max_k=self.config.max_k,
            max_tokens_per_request=self.config.max_tokens_per_request, dtype=info.dtype, device=info.device,
            weights_fingerprint=info.weights_fingerprint)


def _draining(detail: str = "") -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is draining (shutting down)"
                        f"{'; ' + detail if detail else ''}; send the request to another replica or retry "
                        "after it restarts")


def _unpack(message: pb.Tensor, name: str, **kwargs: Any) -> np.ndarray:
    """codec.unpack with its ValueError as INVALID_ARGUMENT."""
    try:
        return codec.unpack(message, name, **kwargs)
    except ValueError as err:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err


class GrpcEdge(pb_grpc.SurrogateServicer):
    """The gRPC edge: ServingCore calls, ServiceError -> status (or error_code on the stream)."""

    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def GetInfo(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return await self._unary(context, "GetInfo", self._core.info)

    async def GetVocabulary(self, request: pb.VocabularyRequest,
                            context: grpc.aio.ServicerContext) -> pb.VocabularyResponse:
        return await self._unary(context, "GetVocabulary", self._core.vocabulary)

    async def RegisterPermitted(self, request: pb.RegisterPermittedRequest,
                                context: grpc.aio.ServicerContext) -> pb.RegisterPermittedResponse:
        return await self._unary(context, "RegisterPermitted",
                                 functools.partial(self._core.register_permitted, request))

    async def TopK(self, request: pb.TopKRequest, context: grpc.aio.ServicerContext) -> pb.TopKResponse:
        return await self._unary(context, "TopK", functools.partial(self._core.topk, request))

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await self._unary(context, "Score", functools.partial(self._core.score, request))

    async def TopKStream(self, request_iterator: AsyncIterator[pb.TopKRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TopKResponse]:
        """Answers in completion order; how the stream ends: see the module docstring."""
        if self._core.refusing:
            raise _draining()
        responses: asyncio.Queue[pb.TopKResponse | ServiceError | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.TopKRequest) -> None:
            responses.put_nowait(await self._stream_item(request))

        async def read() -> None:
            end = None  # the client closed its side
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            except asyncio.CancelledError:  # draining (or the call ended: then nobody reads `end`)
                end = _draining("this stream takes no more requests; those not answered on it were not run")
            except ServiceError as err:  # a message that does not parse
                end = ServiceError(err.code, f"{err.message}; the stream stopped reading there: requests "
                                   "before it were answered, later ones were not run")
            finally:
                if pending:
                    await asyncio.wait(set(pending))
                responses.put_nowait(end)

        reader = asyncio.create_task(read())
        self._core._streams.add(reader)
        reader.add_done_callback(self._core._streams.discard)
        try:
            while isinstance(response := await responses.get(), pb.TopKResponse):
                yield response
            if response is not None:
                raise response
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def _stream_item(self, request: pb.TopKRequest) -> pb.TopKResponse:
        try:
            return await self._core.call("TopKStream", functools.partial(self._core.topk, request))
        except ServiceError as err:
            return pb.TopKResponse(request_id=request.request_id, error_code=err.code.value[0],
                                   error_message=err.message)

    async def _unary(self, context: grpc.aio.ServicerContext, rpc: str, fn: Callable[[], Any]) -> Any:
        try:
            return await self._core.call(rpc, fn)
        except ServiceError as err:
            await context.abort(err.code, err.message)


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Sees every RPC before a byte of it is parsed: notes it for draining, checks auth, parses it (module docstring).

    A call refused for its token never has its request parsed; on a stream, bytes that are not the
    method's message answer INVALID_ARGUMENT once the messages before them are handled.
    """

    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED
        ours = details.method.startswith(f"/{SERVICE_NAME}/")
        self._core.arrived(asyncio.current_task() if ours else None)  # this task runs the whole call
        token, rpc = self._core.config.auth_token, details.method.rsplit("/", 1)[-1]
        if token and not details.method.startswith(_OPEN_METHOD_PREFIXES) and not _authorized(details, token):
            self._core.metrics.observe_call(rpc, grpc.StatusCode.UNAUTHENTICATED, 0.0)
            return _refusing(handler)
        return _parsing(handler, details.method, self._core.metrics if ours else None)


def _authorized(details: grpc.HandlerCallDetails, token: str) -> bool:
    values = [value for key, value in details.invocation_metadata or () if key == "authorization"]
    return authorized(values[0] if values and isinstance(values[0], str) else None, token)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with UNAUTHENTICATED, reading nothing."""
    message = ("missing or wrong auth token: send metadata 'authorization: Bearer <token>' with the server's "
               f"token (its {TOKEN_ENV} or --auth_token_file)")

    async def refuse(raw_request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _handler(handler, refuse, refuse, refuse, refuse)


def _parsing(handler: grpc.RpcMethodHandler, method: str, metrics: Metrics | None) -> grpc.RpcMethodHandler:
    """``handler`` taking raw bytes that it parses itself; a message that does not parse is INVALID_ARGUMENT."""
    deserialize = handler.request_deserializer or (lambda raw: raw)

    def parse(raw: bytes, position: str) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as err:
            if metrics is not None:
                metrics.observe_call(method.rsplit("/", 1)[-1], grpc.StatusCode.INVALID_ARGUMENT, 0.0)
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{position} of {method} is not its request "
                               f"message ({err}); send the serialized protobuf message") from None

    async def one(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw, "the request")
        except ServiceError as err:
            await context.abort(err.code, err.message)

    async def many(raw_iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        count = 0
        async for raw in raw_iterator:
            count += 1
            yield parse(raw, f"message {count}")

    async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await handler.unary_unary(await one(raw, context), context)

    async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in _responses(handler.unary_stream(await one(raw, context), context), context):
            yield response

    async def stream_unary(raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler.stream_unary(many(raw_iterator), context)
        except ServiceError as err:
            await context.abort(err.code, err.message)

    async def stream_stream(raw_iterator: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in _responses(handler.stream_stream(many(raw_iterator), context), context):
            yield response

    return _handler(handler, unary_unary, unary_stream, stream_unary, stream_stream)


async def _responses(result: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """What a response-streaming behaviour yields (it may instead write to ``context`` and return);
    a ServiceError it raises ends the call with that status."""
    try:
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:
            await result
    except ServiceError as err:
        await context.abort(err.code, err.message)


def _handler(handler: grpc.RpcMethodHandler, unary_unary: Callable[..., Any], unary_stream: Callable[..., Any],
             stream_unary: Callable[..., Any], stream_stream: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that takes raw bytes and runs the behaviour of its shape."""
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serializer)


def create_server(engine: SurrogateEngine | ServingCore, *, host: str = "127.0.0.1", port: int = 0,
                  config: ServerConfig | None = None) -> tuple[grpc.aio.Server, int]:
    """Build (not start) a grpc.aio server with the Surrogate service, health and reflection.

    Args:
        engine: the engine to serve, or a ServingCore around it (to share it with the HTTP app).
        host: interface to bind; 127.0.0.1 unless the server must be reachable from other hosts.
        port: 0 picks a free port.
        config: limits, auth and TLS; only with an engine (a core carries its own).

    Returns:
        The server and the port it is bound to. Call ``await core.start()`` and
        ``await server.start()`` from the event loop that will run it.
    """
    if isinstance(engine, ServingCore):
        if config is not None:
            raise ValueError("pass config to ServingCore(engine, config), not with a core")
        core = engine
    else:
        core = ServingCore(engine, config)
    config = core.config
    limit = config.max_message_bytes
    server = grpc.aio.server(interceptors=[EdgeInterceptor(core)], options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0)])
    pb_grpc.add_SurrogateServicer_to_server(GrpcEdge(core), server)
    health_pb2_grpc.add_HealthServicer_to_server(core.health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if config.tls_cert:
        with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    return server, bound
