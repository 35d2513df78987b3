"""The surrogate server as users run it: `python -m surrogate_server` subprocesses on loopback, real channels.

One tiny Qwen3 (hidden 64, 2 layers) with a byte-level BPE tokenizer trained here is saved
once per session; one auth-on server answers most tests; the drain test starts its own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import json
import math
import queue
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import msgpack
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protos.sdce.surrogate.v1 import surrogate_pb2 as pb
from protos.sdce.surrogate.v1 import surrogate_pb2_grpc as pb_grpc
from surrogate_server import codec
from surrogate_server.engine import SurrogateEngine
from surrogate_server.process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_K, MAX_TOKENS, MAX_POSITIONS, MAX_QUEUE, MAX_SETS = 16, 512, 256, 6, 4
CODE = grpc.StatusCode


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("surrogate_model"))


def save_tiny_model(path: Path) -> Path:
    """A tiny Qwen3 and a 512-token byte-level BPE tokenizer, saved with save_pretrained in ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    texts = [obj.__doc__ for module in (json, collections, textwrap, inspect) for obj in vars(module).values()
             if callable(obj) and isinstance(obj.__doc__, str)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=511, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
                         max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False)
    Qwen3ForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> SurrogateEngine:
    return SurrogateEngine.from_pretrained(str(model_dir), device="cpu", dtype="float32")


def start_server(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(model_dir, "--log_level", "WARNING", *flags, env=env, cwd=ROOT).start()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Auth on (token file), small limits, a 50 ms batching window and length buckets of 8."""
    folder = tmp_path_factory.mktemp("server")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    process = start_server(
        model_dir, "--auth_token_file", str(token_file), "--max_wait_ms", "50",
        "--length_bucket", "8", "--max_batch_tokens", "1024", "--max_k", str(MAX_K),
        "--max_tokens_per_request", str(MAX_TOKENS), "--max_queue", str(MAX_QUEUE),
        "--max_permitted_sets", str(MAX_SETS), "--max_message_mb", "1")
    yield process
    process.stop()
    assert "Traceback" not in process.output, process.output


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.SurrogateStub:
    return pb_grpc.SurrogateStub(channel)


def random_ids(shape: tuple[int, int], seed: int = 0, vocab: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def topk_request(ids: np.ndarray, k: int = 5, mask: np.ndarray | None = None, **fields) -> pb.TopKRequest:
    request = pb.TopKRequest(input_ids=codec.pack(ids.astype(np.int32)), k=k, **fields)
    if mask is not None:
        request.attention_mask.CopyFrom(codec.pack(mask.astype(np.uint8)))
    return request


def decoded(response: pb.TopKResponse, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return codec.decode_topk(response.counts, response.ids, response.logprobs, k)


def assert_matches_engine(response: pb.TopKResponse, engine: SurrogateEngine, ids: np.ndarray, k: int,
                          mask: np.ndarray | None = None, permitted: torch.Tensor | None = None,
                          floor: float | None = None) -> None:
    mask = np.ones_like(ids) if mask is None else mask
    top = engine.topk(torch.from_numpy(ids), torch.from_numpy(mask), k, permitted)
    expected_logprobs, expected_ids = codec.decode_topk(*codec.encode_topk(top.logprobs, top.ids, floor=floor), k)
    logprobs, out_ids = decoded(response, k)
    assert torch.equal(out_ids, expected_ids)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-5)


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"http://{server.http}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


# ---------------------------------------------------------------- wire contract

def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    package = Path("sdce/surrogate/v1")
    for name in ("surrogate_pb2.py", "surrogate_pb2.pyi", "surrogate_pb2_grpc.py"):
        assert (tmp_path / package / name).read_bytes() == (ROOT / "protos" / package / name).read_bytes(), (
            f"{name} is stale: run `python protos/generate.py` and commit the result")
    for folder in (Path("."), Path("sdce"), Path("sdce/surrogate"), package):
        assert (ROOT / "protos" / folder / "__init__.py").exists()


# ---------------------------------------------------------------- answers

def test_info_and_vocabulary_describe_the_model(stub: pb_grpc.SurrogateStub, engine: SurrogateEngine,
                                                model_dir: Path) -> None:
    from surrogate_server.vocabulary import VocabularySpec

    info = stub.GetInfo(pb.InfoRequest(), metadata=AUTH, timeout=10)
    assert (info.protocol_version, info.vocab_size, info.tokenizer_size) == (1, 512, 512)
    assert (info.max_k, info.max_tokens_per_request, info.dtype, info.device) == (MAX_K, MAX_TOKENS, "float32", "cpu")
    assert info.model_id == str(model_dir) and info.tokenizer_family == "byte_level"
    assert dict(info.special_tokens) == {"eos": 511, "bos": 511}
    vocabulary = stub.GetVocabulary(pb.VocabularyRequest(), metadata=AUTH, timeout=10)
    spec = VocabularySpec.from_dict(json.loads(vocabulary.spec_json))
    assert spec.fingerprint() == vocabulary.fingerprint == info.vocabulary_fingerprint
    assert spec == engine.vocabulary()


def test_topk_equals_the_engine_in_process(stub: pb_grpc.SurrogateStub, engine: SurrogateEngine) -> None:
    permitted = torch.from_numpy(np.random.default_rng(1).random(500) < 0.6)  # shorter than the vocabulary
    registered = stub.RegisterPermitted(pb.RegisterPermittedRequest(mask=codec.pack(permitted)),
                                        metadata=AUTH, timeout=10)
    assert registered.permitted_id == codec.permitted_id(codec.pack(permitted))
    assert registered.permitted_count == int(permitted.sum())
    ids = random_ids((3, 11), seed=2)
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # attends to nothing at first: empty rows
    mask[1, 5] = 0  # a placeholder in the middle
    floor = -6.3  # cuts part of the top 9 of a 512-token vocabulary
    response = stub.TopK(topk_request(ids, k=9, mask=mask, logprob_floor=floor, permitted_id=registered.permitted_id,
                                      request_id="r1"), metadata=AUTH, timeout=10)
    assert response.request_id == "r1" and response.timings.compute_ms > 0
    assert 0 < len(response.ids.data) // 4 < 3 * 11 * 9  # the floor cut some entries
    assert_matches_engine(response, engine, ids, 9, mask, permitted, floor)
    plain = stub.TopK(topk_request(ids, k=MAX_K), metadata=AUTH, timeout=10)
    assert_matches_engine(plain, engine, ids, MAX_K)


def test_packed_documents_through_the_server(stub: pb_grpc.SurrogateStub, engine: SurrogateEngine,
                                            server: ServerProcess) -> None:
    """position_ids on the wire: each document read alone, also batched with a request that has none."""
    ids = random_ids((2, 12), seed=5)
    positions = np.stack([np.r_[np.arange(5), np.arange(7)], np.r_[np.arange(9), np.arange(3)]])
    request = topk_request(ids, k=6)
    request.position_ids.CopyFrom(codec.pack(positions.astype(np.int32)))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one forward batch, likely: padding and defaults mixed
        packed = pool.submit(stub.TopK, request, metadata=AUTH, timeout=10)
        plain = pool.submit(stub.TopK, topk_request(random_ids((1, 7), seed=6), k=6), metadata=AUTH, timeout=10)
        response = packed.result()
        assert_matches_engine(plain.result(), engine, random_ids((1, 7), seed=6), 6)
    top = engine.topk(torch.from_numpy(ids), torch.ones(2, 12, dtype=torch.long), 6,
                      position_ids=torch.from_numpy(positions))
    logprobs, out_ids = decoded(response, 6)
    assert torch.equal(out_ids, top.ids)
    torch.testing.assert_close(logprobs, top.logprobs, rtol=0, atol=1e-5)
    request.position_ids.CopyFrom(codec.pack(np.full((2, 12), 12, dtype=np.int32)))
    with pytest.raises(grpc.RpcError) as err:
        stub.TopK(request, metadata=AUTH, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "position_ids" in err.value.details()


def test_stream_answers_each_request_and_fails_only_the_bad_one(stub: pb_grpc.SurrogateStub,
                                                                engine: SurrogateEngine) -> None:
    good = {str(i): random_ids((2, 5 + i), seed=10 + i) for i in range(4)}  # lengths 5-8 share a bucket
    requests = [topk_request(ids, k=4, request_id=name) for name, ids in good.items()]
    requests.insert(2, topk_request(random_ids((1, 4)), k=MAX_K + 1, request_id="bad"))
    responses = {r.request_id: r for r in stub.TopKStream(iter(requests), metadata=AUTH, timeout=30)}
    assert sorted(responses) == ["0", "1", "2", "3", "bad"]
    assert responses["bad"].error_code == CODE.INVALID_ARGUMENT.value[0]
    assert f"k must be in [1, max_k = {MAX_K}], got {MAX_K + 1}" in responses["bad"].error_message
    for name, ids in good.items():
        assert responses[name].error_code == 0
        assert_matches_engine(responses[name], engine, ids, 4)
    assert max(r.timings.batch_requests for r in responses.values()) >= 2  # one stream, shared forwards


def test_concurrent_clients_share_forward_batches(server: ServerProcess, engine: SurrogateEngine) -> None:
    before = metric(server, "sdce_surrogate_batch_requests_count") - metric(
        server, 'sdce_surrogate_batch_requests_bucket{le="1.0"}')
    channels = [grpc.insecure_channel(server.grpc) for _ in range(2)]  # two clients, two connections
    try:
        inputs = [random_ids((2, 7), seed=20), random_ids((1, 6), seed=21)]  # different lengths, one bucket
        futures = [pb_grpc.SurrogateStub(ch).TopK.future(topk_request(ids, k=3), metadata=AUTH, timeout=10)
                   for ch, ids in zip(channels, inputs)]
        responses = [future.result() for future in futures]
    finally:
        for ch in channels:
            ch.close()
    assert [r.timings.batch_requests for r in responses] == [2, 2]
    assert responses[0].timings.batch_tokens == 3 * 7  # padded to the longer request, not to the bucket
    for response, ids in zip(responses, inputs):
        assert_matches_engine(response, engine, ids, 3)
    after = metric(server, "sdce_surrogate_batch_requests_count") - metric(
        server, 'sdce_surrogate_batch_requests_bucket{le="1.0"}')
    assert after >= before + 1  # /metrics saw a forward of more than one request


def test_http_msgpack_equals_grpc(server: ServerProcess, stub: pb_grpc.SurrogateStub) -> None:
    ids = random_ids((2, 9), seed=30)
    via_grpc = stub.TopK(topk_request(ids, k=6, logprob_floor=-6.2, request_id="g"), metadata=AUTH, timeout=10)
    body = {"request_id": "h", "k": 6, "logprob_floor": -6.2,
            "input_ids": {"dtype": "INT64", "shape": [2, 9], "data": ids.astype("<i8").tobytes()}}
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/msgpack"}
    reply = httpx.post(f"http://{server.http}/v1/topk", content=msgpack.packb(body), headers=headers, timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/msgpack"
    answer = msgpack.unpackb(reply.content)
    assert answer["request_id"] == "h" and answer["timings"]["batch_tokens"] >= 18
    tensors = {name: pb.Tensor(dtype=pb.DType.Value(answer[name]["dtype"]), shape=answer[name]["shape"],
                               data=answer[name]["data"]) for name in ("counts", "ids", "logprobs")}
    assert tensors["counts"] == via_grpc.counts and tensors["ids"] == via_grpc.ids
    np.testing.assert_allclose(codec.unpack(tensors["logprobs"]), codec.unpack(via_grpc.logprobs), atol=1e-6)
    info = httpx.get(f"http://{server.http}/v1/info", headers=headers).json()
    assert info["vocab_size"] == "512" and info["max_k"] == MAX_K  # proto JSON: int64 as a string


def test_http_errors_have_status_and_message(server: ServerProcess) -> None:
    url, headers = f"http://{server.http}", {"Authorization": f"Bearer {TOKEN}"}
    ids = {"dtype": "INT32", "shape": [1, 3], "data": np.int32([1, 2, 3]).tobytes()}
    cases = [
        (b"\xc1 not msgpack", 400, "not valid msgpack"),
        (msgpack.packb({"input_ids": ids, "k": 3, "colour": 1}), 400, "unknown fields ['colour']"),
        (msgpack.packb({"input_ids": {**ids, "dtype": "FLOAT64"}, "k": 3}), 400, "input_ids.dtype 'FLOAT64'"),
        (msgpack.packb({"input_ids": ids, "k": 0}), 400, "k must be in"),
        (msgpack.packb({"input_ids": ids, "k": 2, "permitted_id": "abc"}), 404, "RegisterPermitted"),
        (b"\0" * (2**20 + 1), 413, "over the 1048576-byte limit"),
    ]
    for body, status, message in cases:
        reply = httpx.post(f"{url}/v1/topk", content=body, headers=headers, timeout=10)
        assert reply.status_code == status and message in reply.json()["message"], (status, reply.text)
    mask = {"dtype": "UINT8", "shape": [3], "data": b"\x01\x00\x01"}
    reply = httpx.post(f"{url}/v1/permitted", content=msgpack.packb({"mask": mask}), headers=headers, timeout=10)
    assert msgpack.unpackb(reply.content)["permitted_count"] == 2


# ---------------------------------------------------------------- bad input

_BAD_TOPK = {
    "ids out of range": (topk_request(np.array([[1, 512, 3]])), CODE.INVALID_ARGUMENT,
                         "input_ids must lie in [0, 512)"),
    "negative ids": (topk_request(np.array([[-1, 5]])), CODE.INVALID_ARGUMENT, "got values in [-1, 5]"),
    "short buffer": (pb.TopKRequest(input_ids=pb.Tensor(dtype=pb.INT32, shape=[2, 3], data=b"\0" * 20), k=2),
                     CODE.INVALID_ARGUMENT, "holds 20 bytes but shape [2, 3] of INT32 needs 24"),
    "float ids": (pb.TopKRequest(input_ids=codec.pack(np.float32([[1, 2]])), k=2), CODE.INVALID_ARGUMENT,
                  "input_ids has dtype FLOAT32; send one of INT32, INT64"),
    "1-d ids": (pb.TopKRequest(input_ids=codec.pack(np.int32([1, 2])), k=2), CODE.INVALID_ARGUMENT,
                "must have 2 dimensions"),
    "too many tokens": (topk_request(np.zeros((3, 200), np.int64)), CODE.INVALID_ARGUMENT,
                        f"600 positions, over max_tokens_per_request = {MAX_TOKENS}"),
    "too long": (topk_request(np.zeros((1, MAX_POSITIONS + 1), np.int64)), CODE.INVALID_ARGUMENT,
                 f"max_position_embeddings = {MAX_POSITIONS}"),
    "k = 0": (topk_request(np.zeros((1, 2), np.int64), k=0), CODE.INVALID_ARGUMENT, "k must be in [1, max_k"),
    "k over max": (topk_request(np.zeros((1, 2), np.int64), k=MAX_K + 1), CODE.INVALID_ARGUMENT, "got 17"),
    "empty batch": (topk_request(np.zeros((0, 4), np.int64)), CODE.INVALID_ARGUMENT, "input_ids is empty"),
    "no input": (pb.TopKRequest(k=2), CODE.INVALID_ARGUMENT, "input_ids has dtype DTYPE_UNSPECIFIED"),
    "mask shape": (topk_request(np.zeros((2, 3), np.int64), mask=np.ones((2, 4))), CODE.INVALID_ARGUMENT,
                   "attention_mask shape [2, 4] must equal input_ids shape [2, 3]"),
    "mask values": (topk_request(np.zeros((1, 2), np.int64), mask=np.array([[1, 2]])), CODE.INVALID_ARGUMENT,
                    "only 0 and 1"),
    "mask dtype": (pb.TopKRequest(input_ids=codec.pack(np.int32([[1]])), k=1,
                                  attention_mask=codec.pack(np.int64([[1]]))),
                   CODE.INVALID_ARGUMENT, "attention_mask has dtype INT64; send one of UINT8"),
    "nan floor": (topk_request(np.zeros((1, 2), np.int64), logprob_floor=math.nan), CODE.INVALID_ARGUMENT, "NaN"),
    "unknown permitted set": (topk_request(np.zeros((1, 2), np.int64), permitted_id="ab" * 32), CODE.NOT_FOUND,
                              "call RegisterPermitted again"),
}
_BAD_PERMITTED = {
    "too long": (np.ones(513, np.uint8), "between 1 and vocab_size = 512 entries"),
    "not 0/1": (np.array([0, 1, 2], np.uint8), "only 0 and 1"),
    "empty set": (np.zeros(10, np.uint8), "the permitted set is empty"),
    "wrong dtype": (np.ones(10, np.int32), "mask has dtype INT32; send one of UINT8"),
}


def valid_request_works(stub: pb_grpc.SurrogateStub) -> None:
    response = stub.TopK(topk_request(random_ids((1, 4)), k=2), metadata=AUTH, timeout=10)
    assert codec.unpack(response.counts).shape == (1, 4)


@pytest.mark.parametrize("case", sorted(_BAD_TOPK))
def test_bad_topk_requests_get_status_and_message(stub: pb_grpc.SurrogateStub, case: str) -> None:
    request, code, message = _BAD_TOPK[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.TopK(request, metadata=AUTH, timeout=10)
    assert caught.value.code() == code and message in caught.value.details(), caught.value.details()
    valid_request_works(stub)


@pytest.mark.parametrize("case", sorted(_BAD_PERMITTED))
def test_bad_permitted_sets_get_invalid_argument(stub: pb_grpc.SurrogateStub, case: str) -> None:
    mask, message = _BAD_PERMITTED[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RegisterPermitted(pb.RegisterPermittedRequest(mask=codec.pack(mask)), metadata=AUTH, timeout=10)
    assert caught.value.code() == CODE.INVALID_ARGUMENT and message in caught.value.details()


def test_forgotten_permitted_sets_are_not_found_until_registered_again(stub: pb_grpc.SurrogateStub) -> None:
    masks = [codec.pack((np.arange(512) % (i + 2) == 0).astype(np.uint8)) for i in range(MAX_SETS + 1)]
    ids = [stub.RegisterPermitted(pb.RegisterPermittedRequest(mask=m), metadata=AUTH).permitted_id for m in masks]
    request = topk_request(random_ids((1, 3)), k=2, permitted_id=ids[0])  # the least recently used: forgotten
    with pytest.raises(grpc.RpcError) as caught:
        stub.TopK(request, metadata=AUTH, timeout=10)
    assert caught.value.code() == CODE.NOT_FOUND
    assert stub.RegisterPermitted(pb.RegisterPermittedRequest(mask=masks[0]), metadata=AUTH).permitted_id == ids[0]
    stub.TopK(request, metadata=AUTH, timeout=10)


def test_full_queue_is_resource_exhausted(server: ServerProcess, stub: pb_grpc.SurrogateStub) -> None:
    futures = [stub.TopK.future(topk_request(random_ids((1, 8), seed=i), k=2), metadata=AUTH, timeout=20)
               for i in range(3 * MAX_QUEUE)]  # all within one 50 ms window, one bucket under the token budget
    codes = collections.Counter()
    for future in futures:
        codes[future.code()] += 1
        if future.code() == CODE.RESOURCE_EXHAUSTED:
            assert "--max_queue" in future.details()
    assert codes[CODE.OK] >= MAX_QUEUE and codes[CODE.RESOURCE_EXHAUSTED] >= 1, codes
    assert set(codes) <= {CODE.OK, CODE.RESOURCE_EXHAUSTED}
    assert metric(server, 'sdce_surrogate_errors_total{code="RESOURCE_EXHAUSTED"}') >= 1
    valid_request_works(stub)


def _tensors() -> st.SearchStrategy[pb.Tensor]:
    arbitrary = st.builds(pb.Tensor, dtype=st.integers(0, 9), shape=st.lists(st.integers(-2, 40), max_size=3),
                          data=st.binary(max_size=300))

    def packed(args: tuple[int, int, np.dtype, int, bool]) -> pb.Tensor:
        rows, length, dtype, seed, out_of_range = args
        values = np.random.default_rng(seed).integers(0, 512, (rows, length))
        if out_of_range:
            values.flat[seed % values.size] = [-1, 512][seed % 2]
        return codec.pack(values.astype(dtype))

    well_formed = st.tuples(st.integers(1, 3), st.integers(1, 12), st.sampled_from([np.int32, np.int64]),
                            st.integers(0, 2**32 - 1), st.sampled_from([False, False, False, True])).map(packed)
    return st.one_of(arbitrary, well_formed, well_formed)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(input_ids=_tensors(), mask=st.tuples(st.sampled_from([None, None, None, 1]), _tensors()).map(lambda m: m[0] and m[1]),
       k=st.one_of(st.integers(1, MAX_K), st.integers(-2, 24)),
       floor=st.none() | st.floats(width=32), permitted_id=st.sampled_from(["", "", "", "0" * 64, "x"]))
def test_fuzzed_requests_get_a_user_error_or_an_answer(stub: pb_grpc.SurrogateStub, input_ids: pb.Tensor,
                                                       mask: pb.Tensor | None, k: int, floor: float | None,
                                                       permitted_id: str) -> None:
    request = pb.TopKRequest(input_ids=input_ids, k=k, permitted_id=permitted_id)
    if mask is not None:
        request.attention_mask.CopyFrom(mask)
    if floor is not None:
        request.logprob_floor = floor
    try:
        response = stub.TopK(request, metadata=AUTH, timeout=10)
    except grpc.RpcError as err:
        event(err.code().name)
        assert err.code() in (CODE.INVALID_ARGUMENT, CODE.NOT_FOUND), (err.code(), err.details())
        assert err.details()
    else:
        event("OK")
        assert codec.unpack(response.counts).shape == tuple(input_ids.shape)


def test_server_still_answers_after_the_fuzzing(stub: pb_grpc.SurrogateStub, server: ServerProcess) -> None:
    valid_request_works(stub)
    assert server.proc.poll() is None
    assert metric(server, 'sdce_surrogate_errors_total{code="INTERNAL"}') == 0


# ---------------------------------------------------------------- auth, health, reflection

def test_auth_is_checked_on_every_rpc_and_http_call(server: ServerProcess, channel: grpc.Channel,
                                                    stub: pb_grpc.SurrogateStub) -> None:
    request = topk_request(random_ids((1, 3)), k=2)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        for call in (lambda: stub.GetInfo(pb.InfoRequest(), metadata=metadata, timeout=10),
                     lambda: stub.TopK(request, metadata=metadata, timeout=10),
                     lambda: list(stub.TopKStream(iter([request]), metadata=metadata, timeout=10))):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == CODE.UNAUTHENTICATED and "Bearer" in caught.value.details()
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    assert caught.value.code() == CODE.UNAUTHENTICATED
    for path in ("/metrics", "/v1/info"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            reply = httpx.get(f"http://{server.http}{path}", headers=headers)
            assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    reply = httpx.post(f"http://{server.http}/v1/topk", content=b"")
    assert reply.status_code == 401
    assert metric(server, 'sdce_surrogate_errors_total{code="UNAUTHENTICATED"}') >= 10
    # Probes stay open: orchestrators check health without secrets.
    assert httpx.get(f"http://{server.http}/healthz").status_code == 200
    assert httpx.get(f"http://{server.http}/readyz").json() == {"status": "ready"}


def test_health_and_reflection_answer(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sdce.surrogate.v1.Surrogate"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="sdce.surrogate.v1.Surrogate")]
    answers = list(reflection.ServerReflectionInfo(iter(requests), metadata=AUTH, timeout=10))
    services = {s.name for s in answers[0].list_services_response.service}
    assert {"sdce.surrogate.v1.Surrogate", "grpc.health.v1.Health"} <= services
    assert answers[1].file_descriptor_response.file_descriptor_proto


# ---------------------------------------------------------------- TLS (in process) and drain (own process)

def test_tls_server_answers_a_secure_channel(engine: SurrogateEngine, tmp_path: Path) -> None:
    from surrogate_server.server import ServerConfig, create_server

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                           "-keyout", str(key), "-out", str(cert)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a test certificate: {made.stderr.decode()[-200:]}")

    async def run() -> pb.InfoResponse:
        server, port = create_server(engine, config=ServerConfig(tls_cert=str(cert), tls_key=str(key)))
        await server.start()
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as secure:
                return await pb_grpc.SurrogateStub(secure).GetInfo(pb.InfoRequest(), timeout=10)
        finally:
            await server.stop(None)

    assert asyncio.run(run()).vocab_size == 512


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(model_dir: Path, tmp_path: Path,
                                                             engine: SurrogateEngine) -> None:
    # Auth off here: no token needed. A 1.5 s batching window keeps the requests in flight.
    process = start_server(model_dir, "--max_wait_ms", "1500", "--grace_s", "20", env={"SDCE_SURROGATE_TOKEN": ""})
    outgoing: queue.Queue[pb.TopKRequest | None] = queue.Queue()
    try:
        with grpc.insecure_channel(process.grpc) as channel:
            stub = pb_grpc.SurrogateStub(channel)
            assert stub.GetInfo(pb.InfoRequest(), timeout=10).vocab_size == 512
            inputs = [random_ids((1, 5), seed=40 + i) for i in range(4)]
            futures = [stub.TopK.future(topk_request(ids, k=3), timeout=30) for ids in inputs[:3]]
            stream = stub.TopKStream(iter(outgoing.get, None), timeout=30)  # left open by the client
            outgoing.put(topk_request(inputs[3], k=3, request_id="streamed"))
            deadline = time.monotonic() + 10
            while _queue_depth(process) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _queue_depth(process) == 4
            process.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while httpx.get(f"http://{process.http}/readyz").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert httpx.get(f"http://{process.http}/readyz").json() == {"status": "draining"}
            for future, ids in zip(futures, inputs):
                assert_matches_engine(future.result(), engine, ids, 3)
            streamed = next(stream)  # answered; then the stream ends: it takes no more requests
            assert streamed.request_id == "streamed"
            assert_matches_engine(streamed, engine, inputs[3], 3)
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
            assert ended.value.code() == CODE.UNAVAILABLE and "draining" in ended.value.details()
        assert process.proc.wait(timeout=30) == 0, process.output
    finally:
        outgoing.put(None)
        process.stop()
    assert "Traceback" not in process.output


def _queue_depth(process: ServerProcess) -> float:
    text = httpx.get(f"http://{process.http}/metrics").text
    return float(re.search(r"^sdce_surrogate_queue_depth (\S+)$", text, re.MULTILINE)[1])
