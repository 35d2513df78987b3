"""sdce_loss against a slow per-position reference written straight from docs/method.md §4."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from trainer.losses import LOSS_TYPES, sdce_loss

IGNORE = -100
AUX_TYPES = ("surrogate", "kl")


def make_case(batch: int = 3, seq: int = 5, vocab: int = 13, k: int = 5, seed: int = 0, dtype=torch.float64):
    """Random logits (requiring grad), labels with ignores, candidates with empty slots and empty rows.

    Candidate log-probs come from a real distribution over vocab + 3 ids, so bucket sums stay <= 1.
    """
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = labels.masked_fill(torch.rand(batch, seq, generator=g) < 0.25, IGNORE)
    cand_ids = torch.rand(batch, seq, vocab, generator=g).argsort(-1)[..., :k]
    surrogate = torch.log_softmax(0.7 * torch.randn(batch, seq, vocab + 3, generator=g, dtype=torch.float64), -1)
    cand_lp = surrogate.gather(-1, cand_ids)
    empty = torch.rand(batch, seq, k, generator=g) < 0.3
    empty |= torch.rand(batch, seq, 1, generator=g) < 0.2  # whole rows without candidates
    return logits, labels, cand_ids.masked_fill(empty, -1), cand_lp.masked_fill(empty, -math.inf)


def reference_loss(logits, labels, cand_ids, cand_lp, loss_type, lam, z_mult=0.0, num_labels=None) -> Tensor:
    """Per-position Python loop, float64, no masking tricks."""
    z_all = logits.double()
    ce, aux, zl, count = z_all.new_zeros(()), z_all.new_zeros(()), z_all.new_zeros(()), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE:
                continue
            count += 1
            z = z_all[b, t]
            ce = ce - torch.log_softmax(z, -1)[y]
            zl = zl + torch.logsumexp(z, -1) ** 2
            slots = [j for j in range(cand_ids.shape[-1]) if int(cand_ids[b, t, j]) >= 0]
            if not slots or loss_type == "standard":
                continue
            ids = [int(cand_ids[b, t, j]) for j in slots]
            lps = [float(cand_lp[b, t, j]) for j in slots]
            if loss_type == "surrogate":
                w = torch.softmax(torch.tensor([-1.0 / math.exp(lp) for lp in lps], dtype=torch.float64), -1)
                aux = aux + (w * -torch.log_softmax(z[ids], -1)).sum()
            else:
                p = [math.exp(lp) for lp in lps]
                q = torch.softmax(z, -1)[ids]
                aux = aux + sum(pj * (math.log(pj) - torch.log(qj)) for pj, qj in zip(p, q) if pj > 0)
                p_tail, q_tail = 1.0 - sum(p), 1.0 - q.sum()
                if p_tail > 0:
                    aux = aux + p_tail * (math.log(p_tail) - torch.log(q_tail))
    n = max(count if num_labels is None else int(num_labels), 1)
    return (ce + lam * aux) / n + z_mult * zl / n


def grad(loss: Tensor, logits: Tensor) -> Tensor:
    return torch.autograd.grad(loss, logits)[0]


@pytest.mark.parametrize("z_mult", [0.0, 1e-2])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference_float64(loss_type: str, z_mult: float) -> None:
    for seed in range(3):
        logits, labels, cand_ids, cand_lp = make_case(seed=seed)
        loss, _ = sdce_loss(logits, labels, cand_ids, cand_lp, loss_type=loss_type, surrogate_weight=0.7,
                            z_loss_multiplier=z_mult)
        want = reference_loss(logits, labels, cand_ids, cand_lp, loss_type, 0.7, z_mult)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0.0)
        got_grad, want_grad = grad(loss, logits), grad(want, logits)
        assert bool(got_grad.isfinite().all())
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits(loss_type: str, dtype: torch.dtype) -> None:
    logits, labels, cand_ids, cand_lp = make_case(seed=7, dtype=dtype)
    loss, _ = sdce_loss(logits, labels, cand_ids, cand_lp.float(), loss_type=loss_type, surrogate_weight=0.5,
                        z_loss_multiplier=1e-3)
    assert loss.dtype == torch.float32
    exact = logits.detach().double().requires_grad_()  # the same values, bf16 ones included
    want = reference_loss(exact, labels, cand_ids, cand_lp.float(), loss_type, 0.5, 1e-3)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    got_grad = grad(loss, logits)
    assert got_grad.dtype == dtype and bool(got_grad.isfinite().all())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_grad.double(), grad(want, exact), rtol=tol, atol=tol * 0.1)


@pytest.mark.parametrize("z_mult", [0.0, 1e-2])
@pytest.mark.parametrize("loss_type", AUX_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_weight_is_standard_bit_for_bit(loss_type: str, z_mult: float, dtype: torch.dtype) -> None:
    logits, labels, cand_ids, cand_lp = make_case(seed=3, dtype=dtype)
    standard, _ = sdce_loss(logits, labels, None, None, loss_type="standard", surrogate_weight=1.0,
                            z_loss_multiplier=z_mult)
    standard_grad = grad(standard, logits)
    for weight in (0.0, torch.tensor(0.0)):
        loss, _ = sdce_loss(logits, labels, cand_ids, cand_lp, loss_type=loss_type, surrogate_weight=weight,
                            z_loss_multiplier=z_mult)
        assert torch.equal(loss, standard)
        assert torch.equal(grad(loss, logits), standard_grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_global_label_count_makes_micro_batches_add_up(loss_type: str) -> None:
    logits, labels, cand_ids, cand_lp = make_case(batch=8, seed=11)
    kwargs = {"loss_type": loss_type, "surrogate_weight": 0.3, "z_loss_multiplier": 1e-3}
    whole, whole_parts = sdce_loss(logits, labels, cand_ids, cand_lp, **kwargs)
    whole_grad = grad(whole, logits)
    n = (labels != IGNORE).sum()
    for num_labels in (n, int(n)):
        pieces = [sdce_loss(logits[i:i + 2], labels[i:i + 2], cand_ids[i:i + 2], cand_lp[i:i + 2],
                            num_labels=num_labels, **kwargs) for i in range(0, 8, 2)]
        torch.testing.assert_close(sum(loss for loss, _ in pieces), whole, rtol=1e-6, atol=0.0)
        for key in whole_parts:
            torch.testing.assert_close(sum(parts[key] for _, parts in pieces), whole_parts[key], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad(sum(loss for loss, _ in pieces), logits), whole_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_is_zero_when_base_matches_surrogate(dtype: torch.dtype) -> None:
    logits, labels, _, _ = make_case(seed=5, dtype=dtype)
    probs = torch.softmax(logits.detach().double(), -1)
    cand_lp, cand_ids = probs.log().topk(4, dim=-1)  # surrogate p_s(j) == base softmax at the buckets
    loss, parts = sdce_loss(logits, labels, cand_ids, cand_lp.to(dtype), loss_type="kl", surrogate_weight=1.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(float(parts["aux"])) < tol
    aux_grad = grad(loss, logits) - grad(sdce_loss(logits, labels, None, None, loss_type="standard",
                                                   surrogate_weight=0.0)[0], logits)
    assert float(aux_grad.abs().max()) < 10 * tol  # KL's minimum: zero gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_is_non_negative(dtype: torch.dtype) -> None:
    for seed in range(40):
        logits, labels, cand_ids, cand_lp = make_case(batch=1, seq=1, seed=seed, dtype=dtype)
        labels = labels.clamp(min=0)  # one labelled position: aux is its KL
        _, parts = sdce_loss(logits, labels, cand_ids, cand_lp, loss_type="kl", surrogate_weight=1.0)
        assert float(parts["aux"]) >= (-1e-12 if dtype == torch.float64 else -1e-6)


def test_parts() -> None:
    logits, labels, cand_ids, cand_lp = make_case(seed=2)
    loss, parts = sdce_loss(logits, labels, cand_ids, cand_lp, loss_type="surrogate", surrogate_weight=0.5,
                            z_loss_multiplier=0.1)
    labelled = labels != IGNORE
    n = int(labelled.sum())
    assert set(parts) == {"ce", "aux", "z_loss", "num_labels", "guided_positions"}
    assert all(not v.requires_grad for v in parts.values())
    assert int(parts["num_labels"]) == n
    assert int(parts["guided_positions"]) == int(((cand_ids >= 0).any(-1) & labelled).sum())
    z_ref = sum(float(torch.logsumexp(logits[b, t].detach(), -1)) ** 2 for b, t in labelled.nonzero().tolist()) / n
    assert math.isclose(float(parts["z_loss"]), z_ref, rel_tol=1e-9)
    recombined = parts["ce"] + 0.5 * parts["aux"] + 0.1 * parts["z_loss"]
    torch.testing.assert_close(loss.detach(), recombined, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nothing_to_learn_gives_zero_not_nan(loss_type: str) -> None:
    logits, labels, cand_ids, cand_lp = make_case(seed=4, dtype=torch.float32)
    no_labels = torch.full_like(labels, IGNORE)
    loss, parts = sdce_loss(logits, no_labels, cand_ids, cand_lp, loss_type=loss_type, surrogate_weight=1.0,
                            z_loss_multiplier=1e-3)
    assert float(loss.detach()) == 0.0 and int(parts["num_labels"]) == 0
    assert float(grad(loss, logits).abs().max()) == 0.0

    no_cands = torch.full_like(cand_ids, -1)
    loss, parts = sdce_loss(logits, labels, no_cands, torch.full_like(cand_lp, -math.inf), loss_type=loss_type,
                            surrogate_weight=1.0)
    assert float(parts["aux"]) == 0.0 and int(parts["guided_positions"]) == 0
    assert bool(grad(loss, logits).isfinite().all())


@pytest.mark.parametrize("loss_type", AUX_TYPES)
def test_extreme_values_stay_finite(loss_type: str) -> None:
    logits, labels, _, _ = make_case(vocab=6, k=6, seed=9, dtype=torch.float32)
    big = (logits.detach() * 500).requires_grad_()  # near one-hot softmax
    cand_ids = torch.arange(6).expand(*labels.shape, 6).contiguous()  # buckets cover the whole vocab: Q tail 0
    cand_lp = torch.log_softmax(torch.randn(*labels.shape, 6) * 80, -1)  # p_s down to ~1e-100 (threshold 0)
    loss, parts = sdce_loss(big, labels, cand_ids, cand_lp, loss_type=loss_type, surrogate_weight=1.0,
                            z_loss_multiplier=1e-4)
    assert bool(loss.isfinite()) and all(bool(v.isfinite()) for v in parts.values())
    assert bool(grad(loss, big).isfinite().all())


def test_surrogate_weight_as_tensor() -> None:
    logits, labels, cand_ids, cand_lp = make_case(seed=6)
    as_float, _ = sdce_loss(logits, labels, cand_ids, cand_lp, loss_type="kl", surrogate_weight=0.25)
    as_tensor, _ = sdce_loss(logits, labels, cand_ids, cand_lp, loss_type="kl",
                             surrogate_weight=torch.tensor(0.25, dtype=torch.float32))
    assert torch.equal(as_float, as_tensor)


def test_rejects_bad_arguments() -> None:
    logits, labels, cand_ids, cand_lp = make_case()
    with pytest.raises(ValueError, match="surrogate.*kl.*standard"):
        sdce_loss(logits, labels, cand_ids, cand_lp, loss_type="sdce", surrogate_weight=1.0)
    with pytest.raises(ValueError, match="needs cand_ids"):
        sdce_loss(logits, labels, None, None, loss_type="kl", surrogate_weight=1.0)
    with pytest.raises(ValueError, match=r"\[B, T, k\]"):
        sdce_loss(logits, labels, cand_ids[:, :2], cand_lp[:, :2], loss_type="surrogate", surrogate_weight=1.0)
