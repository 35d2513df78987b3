"""GuidanceCache and CachedSource: exact answers, content keys, several writers, torn shards, the size bound."""

import logging
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from surrogate_server.engine import SurrogateEngine
from surrogate_server.source import compact_topk
from surrogate_server.vocabulary import VocabularySpec
from trainer.cache import CachedSource, GuidanceCache, Namespace, namespaces, row_key, stored_surrogate

VOCAB = VocabularySpec(tokens=[f"t{i}" for i in range(64)], family="byte_level", special_tokens={}, control_ids=[])


def namespace(**changes) -> Namespace:
    fields = dict(surrogate="tiny", weights="w" * 64, vocabulary=VOCAB.fingerprint(), vocab_size=64,
                  dtype="float32", k=5, logprob_floor=math.log(0.05), permitted="p" * 64, alignment="bytes",
                  surrogate_length=16)
    return Namespace(**{**fields, **changes})


def answer(seed: int, length: int = 16, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logprobs = np.sort(np.log(rng.dirichlet(np.ones(64), size=length)), axis=-1)[:, ::-1][:, :k].copy()
    ids = rng.integers(0, 64, size=(length, k))
    counts, kept_ids, kept = compact_topk(logprobs, ids, math.log(0.05))
    return counts.astype(np.uint8), kept_ids, kept


def open_cache(root: Path, **options) -> GuidanceCache:
    return GuidanceCache(root, namespace(), max_bytes=options.pop("max_bytes", 10**9), vocabulary=VOCAB,
                         **{"refresh_seconds": 0.0, **options})


def assert_same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def engine() -> SurrogateEngine:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return SurrogateEngine(LlamaForCausalLM(config))


def test_cached_answers_are_the_engines_bit_for_bit_and_survive_a_restart(engine, tmp_path):
    ids = torch.randint(0, 64, (3, 16))
    mask = torch.ones_like(ids).index_fill_(1, torch.tensor([0, 7]), 0)
    floor = math.log(0.05)
    expected = engine.topk(ids, mask, 5)
    keep = (expected.logprobs >= floor) & (expected.ids >= 0)
    cache = open_cache(tmp_path)
    source = CachedSource(engine, cache)
    engine.stats()
    for _ in range(2):  # a miss (asks the engine), then a hit from memory
        got = source.topk(ids, mask, 5, logprob_floor=floor)
        assert torch.equal(got.ids, expected.ids.where(keep, -1))
        assert torch.equal(got.logprobs, expected.logprobs.where(keep, -math.inf))
    assert engine.stats()["guidance_requests"] == 1
    assert source.stats() == {"guidance_requests": 0.0, "guidance_cache_hits": 3.0, "guidance_cache_misses": 3.0,
                              "guidance_cache_dropped": 0.0}
    source.close()  # writes the shard
    reopened = CachedSource(engine, open_cache(tmp_path))
    again = reopened.topk(ids, mask, 5, logprob_floor=floor)
    assert torch.equal(again.ids, got.ids) and torch.equal(again.logprobs, got.logprobs)
    assert engine.stats()["guidance_requests"] == 0
    # Only the rows it lacks go to the engine: one new row in a batch of old ones.
    mixed = torch.cat([ids[:2], torch.randint(0, 64, (1, 16))])
    reopened.topk(mixed, torch.cat([mask[:2], torch.ones(1, 16, dtype=mask.dtype)]), 5, logprob_floor=floor)
    assert reopened.cache.totals == {"hits": 5, "misses": 1, "dropped": 0}


def test_rows_are_keyed_by_everything_the_surrogate_reads():
    ids, mask, positions = np.arange(8), np.ones(8), np.arange(8)
    keys = {row_key(ids, mask, None), row_key(ids, mask, positions), row_key(ids, np.r_[0, mask[1:]], None),
            row_key(ids[::-1], mask, None), row_key(ids, mask, np.r_[positions[:4], positions[:4]])}
    assert len(keys) == 5
    assert row_key(ids, mask, None) == row_key(ids.astype(np.int64), mask.astype(bool), None)
    assert len({namespace().id, namespace(weights="x" * 64).id, namespace(k=6).id, namespace(logprob_floor=None).id,
                namespace(alignment="tokens").id, namespace(permitted="q" * 64).id, namespace(dtype="bfloat16").id}) == 7


def _writer(root: str, first: int) -> None:
    cache = open_cache(Path(root), shard_rows=4)
    for seed in range(first, first + 10):  # 6 of them shared with the other writer
        cache.put(seed.to_bytes(16, "little"), answer(seed))
    cache.close()


def test_two_writer_processes_share_one_namespace(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(tmp_path), first)) for first in (0, 4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    (directory, _), = namespaces(tmp_path)
    # 3 shards each (4 + 4 + 2 rows), fewer for the second when it already found the shared rows there
    assert 4 <= len(list(directory.glob("shard-*.parquet"))) <= 6 and not list(directory.glob(".*"))
    reader = open_cache(tmp_path)
    found = reader.get([seed.to_bytes(16, "little") for seed in range(15)])
    for seed, got in enumerate(found[:14]):
        assert_same(got, answer(seed))
    assert found[14] is None


def test_a_torn_shard_is_skipped_and_a_full_cache_stores_nothing(tmp_path, caplog):
    cache = open_cache(tmp_path)
    cache.put(b"k" * 16, answer(1))
    cache.flush()
    shard, = cache.dir.glob("shard-*.parquet")
    torn = cache.dir / "shard-other-00000.parquet"
    torn.write_bytes(shard.read_bytes()[:-40])  # its footer missing: a writer killed mid-upload
    reader = open_cache(tmp_path)
    assert_same(reader.get([b"k" * 16])[0], answer(1))
    assert torn not in reader._shards

    with caplog.at_level(logging.WARNING, logger="trainer.cache"):
        full = open_cache(tmp_path / "small", max_bytes=1)
        full.put(b"x" * 16, answer(2))
        full.close()
    assert full.totals["dropped"] == 1 and not list(full.dir.glob("shard-*"))
    assert "is full" in caplog.text


def test_a_cache_alone_names_its_namespace_or_says_why_not(tmp_path):
    open_cache(tmp_path).close()
    with pytest.raises(ValueError, match="holds no namespace for this run .*k=9.*it holds: .*tiny k=5"):
        stored_surrogate(tmp_path, k=9)
    stored = stored_surrogate(tmp_path, k=5, alignment="bytes")
    assert stored.vocabulary() == VOCAB and stored.info().weights_fingerprint == "w" * 64
    with pytest.raises(ValueError, match="no guidance for 2 of this run's blocks.*sdce-precompute"):
        stored.topk(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), 5)
    GuidanceCache(tmp_path, namespace(weights="v" * 64), max_bytes=10**9, vocabulary=VOCAB).close()
    with pytest.raises(ValueError, match="2 namespaces"):
        stored_surrogate(tmp_path, k=5)
