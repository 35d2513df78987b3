"""The control teacher (trainer.control.UnigramTeacher) against a slow, obvious reference, and its place in a run."""

import collections
import math

import datasets
import pytest
import torch

from surrogate_server.vocabulary import vocabulary_spec
from tests.tokenizer_factory import corpus, train_byte_level_bpe
from trainer.alignment import align_vocabularies
from trainer.config import build_config
from trainer.control import UnigramTeacher, count_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe([t for t in corpus() if t.strip()], 300)


@pytest.fixture(scope="module")
def counts(tokenizer) -> torch.Tensor:
    """Counts with many ties (zeros and small numbers), so that the tie order matters."""
    size = len(vocabulary_spec(tokenizer).tokens)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 4, (size,), generator=generator) * torch.randint(0, 2, (size,), generator=generator)


def reference_topk(counts: list[int], attention_mask: list[list[int]], k: int, permitted: list[bool] | None):
    """Position by position: permitted ids by descending (count + 1) / (N + V), then by id; empty rows where the
    mask is 0 up to and including the position; -1 / -inf in the slots past the permitted ids."""
    size, total = len(counts), sum(counts)
    allowed = [permitted is None or (i < len(permitted) and permitted[i]) for i in range(size)]
    ranked = sorted((i for i in range(size) if allowed[i]), key=lambda i: (-counts[i], i))[:k]
    row_ids = ranked + [-1] * (k - len(ranked))
    row_logprobs = [math.log((counts[i] + 1) / (total + size)) for i in ranked] + [-math.inf] * (k - len(ranked))
    ids, logprobs = [], []
    for mask_row in attention_mask:
        answered = [sum(mask_row[: t + 1]) > 0 for t in range(len(mask_row))]
        ids.append([row_ids if a else [-1] * k for a in answered])
        logprobs.append([row_logprobs if a else [-math.inf] * k for a in answered])
    return ids, logprobs


MASKS = [[[1, 1, 1, 1, 1]], [[0, 0, 1, 0, 1], [1, 0, 0, 1, 1], [0, 0, 0, 0, 0]]]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("k", [1, 7, 31])
@pytest.mark.parametrize("permitted", ["all", "some", "short", "few"])
def test_topk_matches_the_reference(tokenizer, counts, mask, k, permitted):
    size = counts.shape[0]
    generator = torch.Generator().manual_seed(k)
    masks = {
        "all": None,
        "some": torch.rand(size, generator=generator) < 0.5,
        "short": torch.ones(size // 2, dtype=torch.bool),  # ids past its length are not permitted
        "few": torch.zeros(size, dtype=torch.bool).index_fill_(0, torch.tensor([3, 50, 51, size - 1]), True),
    }[permitted]
    attention = torch.tensor(mask)
    input_ids = torch.randint(0, size, attention.shape, generator=generator)
    teacher = UnigramTeacher(tokenizer, counts)
    out = teacher.topk(input_ids, attention, k, masks, logprob_floor=math.log(0.02))
    ids, logprobs = reference_topk(counts.tolist(), mask, k, None if masks is None else masks.tolist())
    assert out.ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert out.ids.shape == out.logprobs.shape == (*attention.shape, k)
    assert out.ids.tolist() == ids
    torch.testing.assert_close(out.logprobs, torch.tensor(logprobs, dtype=torch.float32), rtol=0, atol=1e-6)
    assert teacher.stats() == {"guidance_requests": 1.0} and teacher.stats() == {"guidance_requests": 0.0}


def test_the_answer_ignores_the_context(tokenizer, counts):
    teacher = UnigramTeacher(tokenizer, counts)
    ones = torch.ones(2, 6, dtype=torch.long)
    a = teacher.topk(torch.zeros(2, 6, dtype=torch.long), ones, 5)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    b = teacher.topk(torch.randint(0, counts.shape[0], (2, 6)), ones, 5, position_ids=positions)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    assert (a.logprobs[..., :-1] >= a.logprobs[..., 1:]).all()


def test_malformed_requests_are_value_errors(tokenizer, counts):
    teacher = UnigramTeacher(tokenizer, counts)
    ids, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be"):
        teacher.topk(ids, mask, 0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        teacher.topk(ids, mask[:, :3], 3)
    with pytest.raises(ValueError, match="permitted must be"):
        teacher.topk(ids, mask, 3, torch.ones(counts.shape[0] + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="counts must be"):
        UnigramTeacher(tokenizer, counts[:-1])


def test_counts_are_the_blocks_token_counts(tokenizer):
    rows = [[5, 5, 7, 0], [0, 5, 1, 1], [2, 2, 2, 2]]
    blocks = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}).with_format("torch")
    size = len(vocabulary_spec(tokenizer).tokens)
    expected = collections.Counter(i for row in rows for i in row)
    assert count_tokens(blocks, size, batch_rows=2).tolist() == [expected.get(i, 0) for i in range(size)]
    teacher = UnigramTeacher.of_blocks(tokenizer, blocks)
    assert teacher.topk(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), 3).ids.tolist() == [[[2, 5, 0]]]
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        count_tokens(blocks, 6)


def test_the_base_vocabulary_aligns_with_itself(tokenizer, counts):
    teacher = UnigramTeacher(tokenizer, counts)
    alignment = align_vocabularies(tokenizer, teacher.vocabulary(), sample_text=" ".join(corpus()[:20]))
    assert torch.equal(alignment.base_to_surrogate, torch.arange(len(tokenizer)))
    assert teacher.tokenizer() is tokenizer and teacher.healthy()
    info = teacher.info()
    assert info.vocab_size == counts.shape[0] and info.vocabulary_fingerprint == teacher.vocabulary().fingerprint()


def test_a_guided_control_run_needs_no_surrogate():
    common = {"data": {"train_file": "train.jsonl"}}
    config = build_config({**common, "training": {"loss_type": "kl"}, "surrogate": {"control": "unigram"}})
    assert config.surrogate.control == "unigram" and config.surrogate.name_or_path is None
    with pytest.raises(ValueError, match="needs a surrogate"):
        build_config({**common, "training": {"loss_type": "kl"}})
    with pytest.raises(ValueError, match="drop --streaming"):
        build_config({"data": {"train_file": "a.jsonl", "streaming": True}, "surrogate": {"control": "unigram"},
                      "training": {"max_steps": 5}})
    with pytest.raises(ValueError, match="surrogate.control"):
        build_config({**common, "surrogate": {"control": "uniform"}})
