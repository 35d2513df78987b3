"""Wire encoding shared by the surrogate server and its clients (protos/sdce/surrogate/v1).

Tensors travel as ``Tensor`` messages: a dtype, a shape and packed little-endian bytes.
Top-k guidance travels compactly: per position a count, then only the kept entries::

    counts, ids, logprobs = encode_topk(out.logprobs, out.ids, floor=math.log(0.02))
    logprobs, ids = decode_topk(counts, ids, logprobs, k)   # [B, T, k] f32 (-inf) / i64 (-1)

Every malformed message raises ``ValueError`` naming the field and what to change;
the server turns those into INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection

import numpy as np
import torch

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from surrogate_server.source import compact_topk, expand_topk
from surrogate_server.vocabulary import VocabularySpec

# Wire dtype -> little-endian numpy dtype. BFLOAT16 has no numpy type: it travels as its
# 16 raw bits and unpacks to float32 (exact).
_NUMPY = {
    pb.UINT8: np.dtype("<u1"),
    pb.INT16: np.dtype("<i2"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype("<u2"),
    pb.FLOAT32: np.dtype("<f4"),
}
_WIRE = {np.dtype(d).newbyteorder("="): code for code, d in _NUMPY.items() if code != pb.BFLOAT16}
_WIRE[np.dtype(bool)] = pb.UINT8


def dtype_name(code: int) -> str:
    """Wire dtype code -> its name in the proto ("INT32"); unknown codes read "<code 42>"."""
    try:
        return pb.DType.Name(code)
    except ValueError:
        return f"<code {code}>"


def pack(array: np.ndarray | torch.Tensor, dtype: int | None = None) -> pb.Tensor:
    """A numpy array or CPU-movable torch tensor -> ``Tensor`` message.

    Args:
        dtype: wire dtype (``pb.INT32``...); default: the array's own (bool -> UINT8).
            Values are cast to it (float32 -> BFLOAT16 rounds to nearest even).
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16 or dtype == pb.BFLOAT16:
            bits = array.to(torch.bfloat16).view(torch.int16).numpy()
            return pb.Tensor(dtype=pb.BFLOAT16, shape=bits.shape, data=bits.astype("<i2").tobytes())
        array = array.numpy()
    array = np.asarray(array)
    if dtype == pb.BFLOAT16:
        return pack(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), pb.BFLOAT16)
    if dtype is None:
        if array.dtype.newbyteorder("=") not in _WIRE:
            raise ValueError(f"dtype {array.dtype} has no wire dtype; use one of "
                             f"{sorted(str(d) for d in _WIRE)} or pass dtype=")
        dtype = _WIRE[array.dtype.newbyteorder("=")]
    data = np.ascontiguousarray(array, dtype=_NUMPY[dtype]).tobytes()
    return pb.Tensor(dtype=dtype, shape=array.shape, data=data)


def unpack(message: pb.Tensor, name: str = "tensor", *, dtypes: Collection[int] | None = None,
           ndim: int | None = None) -> np.ndarray:
    """``Tensor`` message -> read-only numpy array in native byte order (BFLOAT16 -> float32).

    Args:
        name: the field name used in error messages ("input_ids").
        dtypes: wire dtypes accepted; None accepts every known one.
        ndim: required number of dimensions; None accepts any.

    Raises:
        ValueError: unknown or refused dtype, wrong rank, negative dimension, or a byte
            length that is not prod(shape) * itemsize.
    """
    code = message.dtype
    if code not in _NUMPY or (dtypes is not None and code not in dtypes):
        allowed = dtypes if dtypes is not None else _NUMPY
        raise ValueError(f"{name} has dtype {dtype_name(code)}; send one of "
                         f"{', '.join(dtype_name(c) for c in sorted(allowed))}")
    shape = tuple(message.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(shape)}")
    if any(d < 0 for d in shape):
        raise ValueError(f"{name} has a negative dimension in shape {list(shape)}")
    itemsize = _NUMPY[code].itemsize
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise ValueError(f"{name} data holds {len(message.data)} bytes but shape {list(shape)} of "
                         f"{dtype_name(code)} needs {expected} ({itemsize} per element); "
                         "send len(data) == prod(shape) * itemsize, little-endian")
    array = np.frombuffer(message.data, dtype=_NUMPY[code]).reshape(shape)
    if code == pb.BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def permitted_id(mask: pb.Tensor) -> str:
    """The content address of a permitted-set mask: sha256 hex of its packed bytes."""
    return hashlib.sha256(mask.data).hexdigest()


def counts_dtype(k: int) -> int:
    """The narrowest wire dtype for per-position counts in [0, k]: UINT8 up to 255, else INT16."""
    if not 0 <= k <= np.iinfo(np.int16).max:
        raise ValueError(f"k must be in [0, {np.iinfo(np.int16).max}] to be encoded, got {k}")
    return pb.UINT8 if k <= np.iinfo(np.uint8).max else pb.INT16


def encode_topk(logprobs: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor,
                floor: float | None = None) -> tuple[pb.Tensor, pb.Tensor, pb.Tensor]:
    """[B, T, k] log-probs and ids -> compact (counts [B, T], ids [N] INT32, logprobs [N] FLOAT32) messages:
    the slots :func:`compact_topk` keeps."""
    if _numpy(logprobs).ndim != 3 or logprobs.shape != ids.shape:
        raise ValueError(f"logprobs and ids must both be [B, T, k], got {tuple(logprobs.shape)} and {tuple(ids.shape)}")
    counts, kept_ids, kept_logprobs = compact_topk(logprobs, ids, floor)
    return pack(counts, counts_dtype(logprobs.shape[-1])), pack(kept_ids, pb.INT32), pack(kept_logprobs, pb.FLOAT32)


def decode_topk(counts: pb.Tensor, ids: pb.Tensor, logprobs: pb.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_topk`.

    Returns:
        logprobs [B, T, k] float32 with -inf in empty slots, ids [B, T, k] int64 with -1.

    Raises:
        ValueError: wrong dtypes or ranks, a count outside [0, k], or sum(counts) not
            equal to the number of ids and of log-probs.
    """
    n = unpack(counts, "counts", dtypes=(pb.UINT8, pb.INT16), ndim=2)
    flat_ids = unpack(ids, "ids", dtypes=(pb.INT32, pb.INT64), ndim=1)
    flat_logprobs = unpack(logprobs, "logprobs", dtypes=(pb.FLOAT32,), ndim=1)
    out_logprobs, out_ids = expand_topk(n, flat_ids, flat_logprobs, k)
    return torch.from_numpy(out_logprobs), torch.from_numpy(out_ids)


def encode_vocabulary(spec: VocabularySpec) -> pb.Vocabulary:
    return pb.Vocabulary(tokens=spec.tokens, family=spec.family, special_tokens=spec.special_tokens,
                         control_ids=spec.control_ids)


def decode_vocabulary(message: pb.Vocabulary) -> VocabularySpec:
    """Inverse of :func:`encode_vocabulary`; ValueError for an unknown family or role."""
    return VocabularySpec(tokens=list(message.tokens), family=message.family,
                          special_tokens=dict(message.special_tokens), control_ids=list(message.control_ids))


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
