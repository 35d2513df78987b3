"""surrogate_server.codec: Tensor packing and the compact top-k encoding, exact both ways."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from surrogate_server import codec

_NUMERIC = [np.uint8, np.int16, np.int32, np.int64, np.float16, np.float32]


@pytest.mark.parametrize("dtype", _NUMERIC)
def test_pack_unpack_round_trip(dtype: type) -> None:
    array = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
    message = codec.pack(array)
    assert list(message.shape) == [2, 3, 4]
    assert message.data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = codec.unpack(message)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_pack_is_little_endian_whatever_the_input_order() -> None:
    big = np.array([1, 256], dtype=">i4")
    assert codec.pack(big).data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_bool_packs_as_uint8_and_torch_round_trips() -> None:
    mask = torch.tensor([True, False, True])
    message = codec.pack(mask)
    assert message.dtype == pb.UINT8 and message.data == b"\x01\x00\x01"
    ids = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    assert np.array_equal(codec.unpack(codec.pack(ids)), ids.numpy())


def test_bfloat16_is_exact_from_torch_and_rounds_from_float32() -> None:
    x = torch.randn(3, 5).to(torch.bfloat16)
    message = codec.pack(x)
    assert message.dtype == pb.BFLOAT16 and len(message.data) == 30
    assert np.array_equal(codec.unpack(message), x.float().numpy())
    y = np.float32([1.0 + 2**-10])
    assert codec.unpack(codec.pack(y, pb.BFLOAT16))[0] == 1.0


def test_empty_and_scalar_shapes() -> None:
    assert codec.unpack(codec.pack(np.zeros((0, 7), np.int32))).shape == (0, 7)
    assert codec.unpack(codec.pack(np.float32(2.5))).item() == 2.5


@pytest.mark.parametrize(("message", "match"), [
    (pb.Tensor(dtype=pb.INT32, shape=[2, 3], data=b"\0" * 23), "holds 23 bytes but shape \\[2, 3\\] of INT32 needs 24"),
    (pb.Tensor(dtype=pb.INT32, shape=[2, -3], data=b""), "negative dimension"),
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"), "dtype DTYPE_UNSPECIFIED"),
    (pb.Tensor(dtype=99, shape=[1], data=b"\0"), "<code 99>"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1], data=b"\0" * 4),
     "input_ids has dtype FLOAT32; send one of INT32, INT64"),
    (pb.Tensor(dtype=pb.INT64, shape=[4], data=b"\0" * 32), "must have 2 dimensions, got shape \\[4\\]"),
])
def test_bad_buffers_name_the_problem(message: pb.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        codec.unpack(message, "input_ids", dtypes=(pb.INT32, pb.INT64), ndim=2)


def test_pack_refuses_unknown_dtypes() -> None:
    with pytest.raises(ValueError, match="no wire dtype"):
        codec.pack(np.zeros(2, np.complex64))


def test_permitted_id_is_sha256_of_the_packed_mask() -> None:
    mask = codec.pack(np.array([1, 0, 1], np.uint8))
    assert codec.permitted_id(mask) == hashlib.sha256(b"\x01\x00\x01").hexdigest()


@st.composite
def topk_outputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, float | None]:
    """Engine-like output: descending finite log-probs, then empty slots (-inf / -1) as a suffix."""
    batch, length = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    k = draw(st.sampled_from([1, 2, 5, 31, 300]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logprobs = -np.sort(rng.exponential(3.0, (batch, length, k)).astype(np.float32), axis=-1)
    ids = rng.integers(0, 2**31 - 1, (batch, length, k))
    filled = np.arange(k) < rng.integers(0, k + 1, (batch, length, 1))
    floor = draw(st.none() | st.floats(-8.0, 0.0, width=32))
    return np.where(filled, logprobs, -np.inf).astype(np.float32), np.where(filled, ids, -1), k, floor


@settings(max_examples=100, deadline=None)
@given(topk_outputs())
def test_topk_round_trip_is_exact(case: tuple[np.ndarray, np.ndarray, int, float | None]) -> None:
    logprobs, ids, k, floor = case
    counts, flat_ids, flat_logprobs = codec.encode_topk(logprobs, ids, floor=floor)
    assert counts.dtype == (pb.UINT8 if k <= 255 else pb.INT16)
    out_logprobs, out_ids = codec.decode_topk(counts, flat_ids, flat_logprobs, k)
    expected_empty = ~np.isfinite(logprobs) | (logprobs < floor if floor is not None else False)
    assert out_logprobs.dtype == torch.float32 and out_ids.dtype == torch.int64
    np.testing.assert_array_equal(out_logprobs.numpy(), np.where(expected_empty, -np.inf, logprobs))
    np.testing.assert_array_equal(out_ids.numpy(), np.where(expected_empty, -1, ids))
    assert len(flat_ids.data) == 4 * int((~expected_empty).sum())


def test_encode_accepts_torch_and_drops_below_floor() -> None:
    logprobs = torch.tensor([[[-0.1, -2.0, -5.0], [-1.0, -math.inf, -math.inf]]])
    ids = torch.tensor([[[7, 3, 9], [4, -1, -1]]])
    counts, flat_ids, flat_logprobs = codec.encode_topk(logprobs, ids, floor=math.log(0.02))
    assert codec.unpack(counts).tolist() == [[2, 1]]
    assert codec.unpack(flat_ids).tolist() == [7, 3, 4]
    assert codec.unpack(flat_logprobs).tolist() == pytest.approx([-0.1, -2.0, -1.0])


def _encoded() -> tuple[pb.Tensor, pb.Tensor, pb.Tensor]:
    return codec.encode_topk(np.float32([[[-1.0, -2.0, -np.inf]]]), np.array([[[5, 6, -1]]]))


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda c, i, l: (c, codec.pack(np.int32([5])), l), "sum\\(counts\\) = 2 must equal the number of ids \\(1\\)"),
    (lambda c, i, l: (c, i, codec.pack(np.float32([1, 2, 3]))), "and of logprobs \\(3\\)"),
    (lambda c, i, l: (codec.pack(np.uint8([[4]])), i, l), "counts must lie in \\[0, k=3\\]"),
    (lambda c, i, l: (codec.pack(np.int16([[-1]])), i, l), "counts must lie in"),
    (lambda c, i, l: (codec.pack(np.int32([[2]])), i, l), "counts has dtype INT32; send one of UINT8, INT16"),
    (lambda c, i, l: (c, codec.pack(np.float32([5, 6])), l), "ids has dtype FLOAT32"),
    (lambda c, i, l: (c, i, codec.pack(np.float16([1, 2]))), "logprobs has dtype FLOAT16"),
    (lambda c, i, l: (codec.pack(np.uint8([2])), i, l), "counts must have 2 dimensions"),
])
def test_decode_rejects_inconsistent_messages(mutate, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        codec.decode_topk(*mutate(*_encoded()), k=3)


def test_encode_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must both be \\[B, T, k\\]"):
        codec.encode_topk(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 4), np.int64))
