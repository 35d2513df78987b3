"""select_candidates, surrogate_inputs and at_base_positions against slow, obvious per-position references."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from trainer.guidance import at_base_positions, select_candidates, surrogate_inputs

IGNORE = -100


@dataclass(frozen=True)
class Tables:
    """Stand-in for trainer.alignment.VocabAlignment: only the two lookup tables."""

    base_to_surrogate: Tensor
    surrogate_to_base: Tensor


def make_alignment(vocab_base: int, vocab_surrogate: int, mapped: int, seed: int) -> Tables:
    """A random alignment, bijective on `mapped` ids: s2b[b2s[b]] == b wherever b maps."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randperm(vocab_base, generator=g)[:mapped]
    surr = torch.randperm(vocab_surrogate, generator=g)[:mapped]
    b2s = torch.full((vocab_base,), -1, dtype=torch.long)
    s2b = torch.full((vocab_surrogate,), -1, dtype=torch.long)
    b2s[base] = surr
    s2b[surr] = base
    return Tables(b2s, s2b)


def make_topk(batch: int, seq: int, vocab_surrogate: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
    """Surrogate top-K' like a server sends: distinct ids, descending log-probs, some trailing empty slots."""
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(2.0 * torch.randn(batch, seq, vocab_surrogate, generator=g), dim=-1)
    top_lp, top_ids = logprobs.topk(width, dim=-1)
    empty = torch.arange(width) >= torch.randint(0, width + 1, (batch, seq, 1), generator=g)
    return top_ids.masked_fill(empty, -1), top_lp.masked_fill(empty, -math.inf)


def make_labels(batch: int, seq: int, vocab_base: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab_base, (batch, seq), generator=g)
    return labels.masked_fill(torch.rand(batch, seq, generator=g) < 0.2, IGNORE)


def reference_select(topk_ids, topk_logprobs, labels, al, k, threshold, exclude_target):
    """Per-position Python loop straight from docs/method.md §3."""
    b2s, s2b = al.base_to_surrogate.tolist(), al.surrogate_to_base.tolist()
    batch, seq, _ = topk_ids.shape
    ids = torch.full((batch, seq, k), -1, dtype=torch.long)
    lps = torch.full((batch, seq, k), -math.inf, dtype=torch.float32)
    for b in range(batch):
        for t in range(seq):
            y = int(labels[b, t])
            if y == IGNORE or (exclude_target and b2s[y] == -1):
                continue
            chosen = []
            for v, lp in zip(topk_ids[b, t].tolist(), topk_logprobs[b, t].tolist()):
                if v < 0 or lp == -math.inf or s2b[v] == -1 or b2s[s2b[v]] != v:
                    continue
                if exclude_target and v == b2s[y]:
                    continue
                if threshold > 0 and lp < math.log(threshold):
                    continue
                chosen.append((s2b[v], lp))
            for j, (base_id, lp) in enumerate(chosen[:k]):
                ids[b, t, j], lps[b, t, j] = base_id, lp
    return ids, lps


@pytest.mark.parametrize("threshold", [0.0, 0.02, 0.1])
@pytest.mark.parametrize("exclude_target", [True, False])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_select_matches_reference(threshold: float, exclude_target: bool, k: int) -> None:
    al = make_alignment(vocab_base=40, vocab_surrogate=50, mapped=30, seed=k)
    topk_ids, topk_lp = make_topk(3, 7, 50, width=9, seed=k + 1)
    labels = make_labels(3, 7, 40, seed=k + 2)
    got = select_candidates(topk_ids, topk_lp, labels, al, k, threshold, exclude_target)
    want = reference_select(topk_ids, topk_lp, labels, al, k, threshold, exclude_target)
    assert got[0].dtype == torch.long and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_select_hand_case() -> None:
    # base 0..3 <-> surrogate 10 - base for 0..2; base 3 and surrogate 5 unmapped.
    al = Tables(torch.tensor([10, 9, 8, -1]), torch.tensor([-1] * 5 + [-1, -1, -1, 2, 1, 0]))
    ids = torch.tensor([[[9, 5, 10, 8, -1], [9, 5, 10, 8, -1], [9, 5, 10, 8, -1], [8, 9, 10, -1, -1]]])
    lp = torch.log(torch.tensor([[[0.5, 0.2, 0.1, 0.01, 0.0]] * 3 + [[0.4, 0.3, 0.2, 0.0, 0.0]]]))
    lp = lp.masked_fill(ids < 0, -math.inf)
    labels = torch.tensor([[1, 3, IGNORE, 0]])  # target 9; unmapped target; ignored; target 10
    cand, cand_lp = select_candidates(ids, lp, labels, al, k=2, threshold=0.02)
    assert cand.tolist() == [[[0, -1], [-1, -1], [-1, -1], [2, 1]]]
    assert torch.allclose(cand_lp[0, 0, :1], torch.log(torch.tensor([0.1])))
    assert cand_lp[0, 0, 1] == -math.inf
    kl_cand, _ = select_candidates(ids, lp, labels, al, k=4, threshold=0.0, exclude_target=False)
    assert kl_cand.tolist() == [[[1, 0, 2, -1], [1, 0, 2, -1], [-1] * 4, [2, 1, 0, -1]]]


def test_select_drops_non_representative_duplicates() -> None:
    # Surrogate ids 0 and 1 stand for the same bytes as base 0; b2s picks the lowest (0).
    al = Tables(torch.tensor([0, 2]), torch.tensor([0, 0, 1]))
    ids = torch.tensor([[[1, 0, 2]]])
    lp = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    cand, _ = select_candidates(ids, lp, torch.tensor([[1]]), al, k=3, threshold=0.0)
    assert cand.tolist() == [[[0, -1, -1]]]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    width=st.integers(1, 12),
    k_offset=st.integers(0, 11),
    threshold=st.sampled_from([0.0, 0.001, 0.02, 0.3, 0.999]),
    exclude_target=st.booleans(),
    mapped=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_select_invariants(batch, seq, width, k_offset, threshold, exclude_target, mapped, seed) -> None:
    k = max(1, width - k_offset)
    al = make_alignment(vocab_base=20, vocab_surrogate=25, mapped=mapped, seed=seed)
    topk_ids, topk_lp = make_topk(batch, seq, 25, width, seed + 1)
    labels = make_labels(batch, seq, 20, seed + 2)
    cand, cand_lp = select_candidates(topk_ids, topk_lp, labels, al, k, threshold, exclude_target)

    assert cand.shape == cand_lp.shape == (batch, seq, k)
    empty = cand < 0
    assert torch.equal(empty, cand_lp == -math.inf)
    assert torch.equal(empty, empty.cummax(-1).values)  # empty slots are trailing
    b2s, s2b = al.base_to_surrogate, al.surrogate_to_base
    mapped_back = b2s[cand.clamp(min=0)]
    assert bool((empty | ((mapped_back >= 0) & (s2b[mapped_back.clamp(min=0)] == cand))).all())
    if threshold > 0:
        assert bool((empty | (cand_lp >= math.log(threshold))).all())
    diffs = cand_lp[..., 1:] - cand_lp[..., :-1]
    assert bool(((diffs <= 0) | empty[..., 1:]).all())  # descending log-probs
    for row in cand.reshape(-1, k).tolist():
        kept = [c for c in row if c >= 0]
        assert len(kept) == len(set(kept))
    assert bool(empty[labels == IGNORE].all())
    if exclude_target:
        assert not bool((cand == labels.unsqueeze(-1)).any())
        unmapped_target = (labels != IGNORE) & (b2s[labels.clamp(min=0)] < 0)
        assert bool(empty[unmapped_target].all())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0, "threshold": 0.02}, "k must be >= 1"),
     ({"k": 2, "threshold": 1.0}, r"threshold must be in \[0, 1\)"),
     ({"k": 2, "threshold": -0.1}, r"threshold must be in \[0, 1\)"),
     ({"k": 5, "threshold": 0.02}, "K'=4")],
)
def test_select_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    al = make_alignment(10, 10, 5, seed=0)
    ids, lp = make_topk(1, 2, 10, width=4, seed=0)
    with pytest.raises(ValueError, match=message):
        select_candidates(ids, lp, torch.zeros(1, 2, dtype=torch.long), al, **kwargs)


def test_surrogate_inputs_placeholders_and_mask() -> None:
    al = Tables(torch.tensor([3, -1, 0, 1]), torch.tensor([2, 3, -1, 0]))
    input_ids = torch.tensor([[0, 1, 2, 3], [1, 1, 3, 0]])
    ids, mask = surrogate_inputs(input_ids, al, placeholder_id=7)
    assert ids.tolist() == [[3, 7, 0, 1], [7, 7, 1, 3]]
    assert mask.tolist() == [[1, 0, 1, 1], [0, 0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long

    base_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids, mask = surrogate_inputs(input_ids, al, placeholder_id=7, attention_mask=base_mask)
    assert mask.tolist() == [[1, 0, 1, 0], [0, 0, 1, 1]]
    assert ids.tolist() == [[3, 7, 0, 7], [7, 7, 1, 3]]


def test_accepts_the_real_vocab_alignment() -> None:
    vocab = pytest.importorskip("trainer.alignment")
    tables = make_alignment(vocab_base=40, vocab_surrogate=50, mapped=30, seed=1)
    real = vocab.VocabAlignment(tables.base_to_surrogate, tables.surrogate_to_base, coverage=1.0)
    topk_ids, topk_lp = make_topk(2, 4, 50, width=6, seed=2)
    labels = make_labels(2, 4, 40, seed=3)
    got = select_candidates(topk_ids, topk_lp, labels, real, 5, 0.02)
    want = select_candidates(topk_ids, topk_lp, labels, tables, 5, 0.02)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(surrogate_inputs(labels.clamp(min=0), real)[0], surrogate_inputs(labels.clamp(min=0), tables)[0])


def test_at_base_positions_reads_each_guided_position_and_blanks_the_rest() -> None:
    topk_ids, topk_lp = make_topk(2, 7, 50, width=4, seed=5)  # [B, S=7, 4]
    g = torch.Generator().manual_seed(6)
    guide_index = torch.randint(-1, 7, (2, 5), generator=g)  # [B, T=5], -1 = unguided
    ids, lps = at_base_positions(topk_ids, topk_lp, guide_index)
    assert ids.shape == lps.shape == (2, 5, 4)
    for b in range(2):
        for t in range(5):
            s = int(guide_index[b, t])
            if s < 0:
                assert (ids[b, t] == -1).all() and torch.isneginf(lps[b, t]).all()
            else:
                assert torch.equal(ids[b, t], topk_ids[b, s]) and torch.equal(lps[b, t], topk_lp[b, s])

