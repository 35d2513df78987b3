"""HTTP side of the surrogate server: probes, Prometheus metrics and a msgpack top-k endpoint.

Served by uvicorn in the same process and event loop as the gRPC server, over the same
ServingCore (same batcher: HTTP and gRPC requests share forward batches).

    GET  /healthz        200 while the process runs (open)
    GET  /readyz         200 when the model is loaded and the server is not draining, else 503 (open)
    GET  /metrics        Prometheus text format (also, without auth, alone on --metrics_port: build_metrics_app)
    GET  /v1/info        InfoResponse as JSON (proto field names)
    GET  /v1/vocabulary  VocabularyResponse as JSON
    POST /v1/permitted   msgpack {"mask": Tensor} -> msgpack {"permitted_id": str, "permitted_count": int}
    POST /v1/topk        msgpack TopKRequest -> msgpack TopKResponse

msgpack bodies carry the proto's fields under the same names; a Tensor is a map
``{"dtype": "INT32" (or its enum number), "shape": [B, T], "data": <bin, little-endian>}``::

    request  {"request_id": str, "input_ids": Tensor, "attention_mask": Tensor (optional),
              "k": int, "logprob_floor": float (optional), "permitted_id": str (optional)}
    response {"request_id": str, "counts": Tensor, "ids": Tensor, "logprobs": Tensor,
              "timings": {"queue_ms": float, "compute_ms": float, "batch_requests": int, "batch_tokens": int}}

Errors answer JSON ``{"code": "INVALID_ARGUMENT", "message": "..."}`` with 400 (invalid
argument), 401 (auth), 404 (unknown permitted set), 413 (body over --max_message_mb),
429 (queue full), 503 (draining), 499 (the client left before the end of its body) or
500 (a bug in the server). With a token configured, every route but /healthz and /readyz
needs the header ``Authorization: Bearer <token>``; it is checked before the body is read,
and the body is read only up to the limit (chunked ones too).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import msgpack
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from surrogate_server.auth import TOKEN_ENV, authorized
from surrogate_server.server import ServiceError, ServingCore

M = TypeVar("M", pb.TopKRequest, pb.RegisterPermittedRequest)
MSGPACK = "application/msgpack"
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's code); nobody reads the answer
}
_TENSOR_KEYS = {"dtype", "shape", "data"}
_REQUEST_TENSORS = {pb.TopKRequest: ("input_ids", "attention_mask", "position_ids"),
                    pb.RegisterPermittedRequest: ("mask",)}


def build_app(state: ServingCore) -> FastAPI:
    """The FastAPI app over ``state``; its lifespan starts the service and, at shutdown, drains it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        yield
        await state.close()

    app = FastAPI(title="SDCE surrogate server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    authorized = [Depends(functools.partial(_check_token, state))]

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.code == grpc.StatusCode.UNAUTHENTICATED else None
        return JSONResponse({"code": err.code.name, "message": err.message},
                            status_code=getattr(err, "http_status", _HTTP_STATUS.get(err.code, 500)), headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        status = "ready" if state.ready else ("draining" if state.draining else "starting")
        return JSONResponse({"status": status}, status_code=200 if state.ready else 503)

    @app.get("/metrics", dependencies=authorized)
    async def metrics() -> Response:
        return _exposition(state)

    @app.get("/v1/info", dependencies=authorized)
    async def info() -> dict[str, Any]:
        return _json(await state.call("HTTP.GetInfo", state.info))

    @app.get("/v1/vocabulary", dependencies=authorized)
    async def vocabulary() -> dict[str, Any]:
        return _json(await state.call("HTTP.GetVocabulary", state.vocabulary))

    @app.post("/v1/permitted", dependencies=authorized)
    async def permitted(request: Request) -> Response:
        message = _decode_body(await _body(request, state), pb.RegisterPermittedRequest)
        answer = await state.call("HTTP.RegisterPermitted", functools.partial(state.register_permitted, message))
        return _msgpack({"permitted_id": answer.permitted_id, "permitted_count": answer.permitted_count})

    @app.post("/v1/topk", dependencies=authorized)
    async def topk(request: Request) -> Response:
        message = _decode_body(await _body(request, state), pb.TopKRequest)
        answer = await state.call("HTTP.TopK", functools.partial(state.topk, message))
        return _msgpack({
            "request_id": answer.request_id,
            **{name: tensor_to_dict(getattr(answer, name)) for name in ("counts", "ids", "logprobs")},
            "timings": {field.name: getattr(answer.timings, field.name) for field in pb.Timings.DESCRIPTOR.fields},
        })

    return app


def build_metrics_app(state: ServingCore) -> FastAPI:
    """Only ``GET /metrics``, open: served on --metrics_port for scrapers that carry no token."""
    app = FastAPI(title="SDCE surrogate server metrics", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return _exposition(state)

    return app


def _exposition(state: ServingCore) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def tensor_to_dict(tensor: pb.Tensor) -> dict[str, Any]:
    """A Tensor message as the msgpack map of this API."""
    return {"dtype": pb.DType.Name(tensor.dtype), "shape": list(tensor.shape), "data": tensor.data}


def tensor_from_dict(value: Any, name: str) -> pb.Tensor:
    """The msgpack map of a Tensor -> the message; ServiceError(INVALID_ARGUMENT) naming what is wrong."""
    if not isinstance(value, dict) or set(value) != _TENSOR_KEYS:
        raise _invalid(f"{name} must be a map with exactly the keys {sorted(_TENSOR_KEYS)}")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if isinstance(dtype, str):
        if dtype not in pb.DType.keys():
            raise _invalid(f"{name}.dtype {dtype!r} is not one of {list(pb.DType.keys())}")
        dtype = pb.DType.Value(dtype)
    if not isinstance(data, bytes):
        raise _invalid(f"{name}.data must be msgpack bin (bytes), got {type(data).__name__}")
    try:
        return pb.Tensor(dtype=dtype, shape=shape, data=data)
    except (TypeError, ValueError) as err:
        raise _invalid(f"{name}: {err}") from err


def _decode_body(body: bytes, message_type: type[M]) -> M:
    """A msgpack map body -> the request message (Tensor maps converted)."""
    try:
        value = msgpack.unpackb(body, raw=False)
    except Exception as err:  # msgpack raises several unrelated types for malformed input
        raise _invalid(f"the body is not valid msgpack ({type(err).__name__}); send Content-Type {MSGPACK}") from err
    if not isinstance(value, dict):
        raise _invalid(f"the body must be a msgpack map, got {type(value).__name__}")
    fields = message_type.DESCRIPTOR.fields_by_name
    unknown = sorted(str(key) for key in value if key not in fields)
    if unknown:
        raise _invalid(f"unknown fields {unknown}; the fields are {sorted(fields)}")
    for name in _REQUEST_TENSORS[message_type]:
        if value.get(name) is not None:
            value[name] = tensor_from_dict(value[name], name)
    try:
        return message_type(**{key: item for key, item in value.items() if item is not None})
    except (TypeError, ValueError) as err:
        raise _invalid(f"bad field in the request body: {err}") from err


async def _body(request: Request, state: ServingCore) -> bytes:
    """The request body, read only up to the message limit: beyond it 413 (declared or chunked alike)."""
    limit = state.config.max_message_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"the body has {declared} bytes", limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(f"the body has more than {limit} bytes", limit)
    except ClientDisconnect as err:
        raise ServiceError(grpc.StatusCode.CANCELLED, "the client disconnected before the end of the body") from err
    return bytes(body)


class _TooLarge(ServiceError):
    """RESOURCE_EXHAUSTED, as gRPC answers an oversized message; HTTP 413."""

    http_status = 413


def _too_large(size: str, limit: int) -> ServiceError:
    return _TooLarge(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{size}, over the {limit}-byte limit "
                     "(--max_message_mb); send smaller batches")


async def _check_token(state: ServingCore, request: Request) -> None:
    token = state.config.auth_token
    if token is None:
        return
    if not authorized(request.headers.get("authorization"), token):
        state.metrics.observe_call(f"HTTP {request.url.path}", grpc.StatusCode.UNAUTHENTICATED, 0.0)
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                           f"missing or wrong auth token: send 'Authorization: Bearer <token>' with the server's "
                           f"token (its {TOKEN_ENV} or --auth_token_file)")


def _invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _msgpack(value: dict[str, Any]) -> Response:
    return Response(msgpack.packb(value, use_bin_type=True), media_type=MSGPACK)
