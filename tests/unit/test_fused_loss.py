"""fused_sdce_loss against sdce_loss of the materialised logits hidden @ weight.T + bias (and its autograd)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.losses import LOSS_TYPES, fused_sdce_loss, sdce_loss

IGNORE = -100
AUX_TYPES = ("surrogate", "kl")
PARTS = ("ce", "aux", "z_loss", "num_labels", "guided_positions")


def make_case(batch: int = 3, seq: int = 7, hidden: int = 24, vocab: int = 300, k: int = 6, seed: int = 0,
              dtype: torch.dtype = torch.float32, bias: bool = True) -> dict:
    """hidden [B, T, H], weight [V, H], bias [V] (requiring grad); labels with ignores; candidates with empty
    slots and whole empty rows, log-probs from a real distribution over V + 3 ids (bucket sums stay <= 1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq)
    case = {
        "hidden": torch.randn(*shape, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
        "weight": (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.25).to(dtype)
        .requires_grad_(),
        "bias": torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None,
    }
    labels = torch.randint(0, vocab, shape, generator=g)
    case["labels"] = labels.masked_fill(torch.rand(shape, generator=g) < 0.25, IGNORE)
    cand_ids = torch.rand(*shape, vocab, generator=g).argsort(-1)[..., :k]
    surrogate = torch.log_softmax(2.0 * torch.randn(*shape, vocab + 3, generator=g, dtype=torch.float64), -1)
    empty = torch.rand(*shape, k, generator=g) < 0.3
    empty |= torch.rand(*shape, 1, generator=g) < 0.2  # whole rows without candidates
    case["cand_ids"] = cand_ids.masked_fill(empty, -1)
    case["cand_logprobs"] = surrogate.gather(-1, cand_ids).masked_fill(empty, -math.inf).to(dtype)
    return case


def leaves(case: dict) -> list[Tensor]:
    return [case[name] for name in ("hidden", "weight", "bias") if case[name] is not None]


def fused(case: dict, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    return fused_sdce_loss(case["hidden"], case["weight"], case["labels"], case["cand_ids"], case["cand_logprobs"],
                           bias=case["bias"], **kwargs)


def unfused(case: dict, chunk_tokens: int | None = None, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    logits = case["hidden"] @ case["weight"].T
    if case["bias"] is not None:
        logits = logits + case["bias"]
    return sdce_loss(logits, case["labels"], case["cand_ids"], case["cand_logprobs"], **kwargs)


def grads(loss: Tensor, case: dict) -> list[Tensor]:
    return list(torch.autograd.grad(loss, leaves(case)))


def assert_same(got: tuple[Tensor, dict], want: tuple[Tensor, dict], case: dict, rtol: float, atol: float) -> None:
    """Loss, parts and gradients of two (loss, parts) results agree."""
    (loss, parts), (want_loss, want_parts) = got, want
    assert loss.dtype == want_loss.dtype
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=0.0)
    assert set(parts) == set(PARTS) and all(not v.requires_grad for v in parts.values())
    for key in PARTS:
        torch.testing.assert_close(parts[key], want_parts[key], rtol=rtol, atol=atol)
    for got_grad, want_grad, leaf in zip(grads(loss, case), grads(want_loss, case), leaves(case)):
        assert got_grad.dtype == leaf.dtype and bool(got_grad.isfinite().all())
        torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=atol * float(want_grad.abs().max()))


TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("z_mult", [0.0, 1e-2])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_sdce_loss_of_the_logits(loss_type: str, z_mult: float, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    for seed, chunk_tokens in ((0, 5), (1, 1), (2, 21), (3, 1024)):  # B * T = 21: 5 does not divide it
        case = make_case(seed=seed, dtype=dtype, bias=seed != 1)
        kwargs = {"loss_type": loss_type, "surrogate_weight": 0.7, "z_loss_multiplier": z_mult}
        assert_same(fused(case, chunk_tokens=chunk_tokens, **kwargs), unfused(case, **kwargs), case, rtol, atol)


@pytest.mark.parametrize("loss_type", AUX_TYPES)
def test_surrogate_weight_as_tensor(loss_type: str) -> None:
    case = make_case(seed=4)
    kwargs = {"loss_type": loss_type, "chunk_tokens": 4}
    as_float = fused(case, surrogate_weight=0.3, **kwargs)
    assert_same(fused(case, surrogate_weight=torch.tensor(0.3), **kwargs), as_float, case, rtol=1e-6, atol=1e-7)
    assert_same(fused(case, surrogate_weight=torch.tensor(0.3), **kwargs),
                unfused(case, loss_type=loss_type, surrogate_weight=0.3), case, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z_mult", [0.0, 1e-2])
@pytest.mark.parametrize("loss_type", AUX_TYPES)
def test_zero_weight_is_standard(loss_type: str, z_mult: float) -> None:
    case = make_case(seed=5)
    standard, _ = fused(case, loss_type="standard", surrogate_weight=1.0, z_loss_multiplier=z_mult, chunk_tokens=4)
    standard_grads = grads(standard, case)
    for weight in (0.0, torch.tensor(0.0)):
        loss, _ = fused(case, loss_type=loss_type, surrogate_weight=weight, z_loss_multiplier=z_mult, chunk_tokens=4)
        assert torch.equal(loss, standard)
        assert all(torch.equal(a, b) for a, b in zip(grads(loss, case), standard_grads))
    assert_same(fused(case, loss_type=loss_type, surrogate_weight=0.0, z_loss_multiplier=z_mult),
                unfused(case, loss_type=loss_type, surrogate_weight=0.0, z_loss_multiplier=z_mult),
                case, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_with_a_global_label_count_add_up(loss_type: str) -> None:
    case = make_case(batch=4, seed=6)
    kwargs = {"loss_type": loss_type, "surrogate_weight": 0.4, "z_loss_multiplier": 1e-3, "chunk_tokens": 5}
    whole, whole_parts = fused(case, **kwargs)
    whole_grads = grads(whole, case)
    n = (case["labels"] != IGNORE).sum()
    for num_labels in (n, int(n)):
        halves = [{**case, **{key: case[key][i:i + 2] for key in ("hidden", "labels", "cand_ids", "cand_logprobs")}}
                  for i in (0, 2)]
        for leaf in leaves(case):
            leaf.grad = None
        total = whole.new_zeros(())
        summed_parts = dict.fromkeys(PARTS, 0)
        for half in halves:  # gradient accumulation: one backward per micro-batch
            loss, parts = fused(half, num_labels=num_labels, **kwargs)
            loss.backward()
            total = total + loss.detach()
            summed_parts = {key: summed_parts[key] + parts[key] for key in PARTS}
        torch.testing.assert_close(total, whole.detach(), rtol=1e-6, atol=0.0)
        for key in PARTS:
            torch.testing.assert_close(summed_parts[key], whole_parts[key], rtol=1e-6, atol=1e-7)
        for leaf, want in zip(leaves(case), whole_grads):
            torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_grad_forward(loss_type: str) -> None:
    case = make_case(seed=7)
    kwargs = {"loss_type": loss_type, "surrogate_weight": 0.5, "z_loss_multiplier": 1e-2, "chunk_tokens": 4}
    with_grad, with_grad_parts = fused(case, **kwargs)
    with torch.no_grad():
        loss, parts = fused(case, **kwargs)
    assert not loss.requires_grad
    assert torch.equal(loss, with_grad.detach())
    assert all(torch.equal(parts[key], with_grad_parts[key]) for key in PARTS)
    frozen = {**case, **{name: case[name].detach() for name in ("hidden", "weight", "bias")}}
    assert not fused(frozen, **kwargs)[0].requires_grad


def test_gradient_for_some_inputs_only() -> None:
    case = make_case(seed=8)
    kwargs = {"loss_type": "kl", "surrogate_weight": 0.5, "chunk_tokens": 4}
    want = dict(zip(("hidden", "weight", "bias"), grads(unfused(case, **kwargs)[0], case)))
    for name in ("hidden", "weight", "bias"):
        only = {**case, **{other: case[other].detach() for other in ("hidden", "weight", "bias") if other != name}}
        (got,) = torch.autograd.grad(fused(only, **kwargs)[0], [only[name]])
        torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-7)


class OpLog(TorchDispatchMode):
    """Records every aten op and the element counts of its tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        numel = max((o.numel() for o in outputs if isinstance(o, Tensor)), default=0)
        self.ops.append((func.__name__, numel))
        return out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_chunk_of_logits_at_a_time_and_three_matmuls(loss_type: str) -> None:
    batch, seq, hidden, vocab, chunk = 4, 16, 8, 400, 10  # V * H < chunk * V < B * T * V
    case = make_case(batch=batch, seq=seq, hidden=hidden, vocab=vocab, seed=9)
    kwargs = {"loss_type": loss_type, "surrogate_weight": 0.5, "z_loss_multiplier": 1e-3, "chunk_tokens": chunk}
    chunks = math.ceil(batch * seq / chunk)
    with OpLog() as log:
        loss, _ = fused(case, **kwargs)
        loss.backward()
    assert max(numel for _, numel in log.ops) == chunk * vocab
    matmuls = [name for name, _ in log.ops if name.split(".")[0] in ("mm", "addmm", "addmm_", "bmm", "matmul")]
    assert len(matmuls) == 3 * chunks  # logits, grad_hidden, grad_weight per chunk; no recompute in backward
    with torch.no_grad(), OpLog() as log:
        fused(case, **kwargs)
    assert len([name for name, _ in log.ops if name.split(".")[0] in ("mm", "addmm")]) == chunks


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16(loss_type: str) -> None:
    case = make_case(seed=10, hidden=64, vocab=500)
    kwargs = {"loss_type": loss_type, "surrogate_weight": 0.5, "z_loss_multiplier": 1e-3, "chunk_tokens": 8}
    exact, _ = fused(case, **kwargs)
    exact_grads = grads(exact, case)

    def close_to_fp32(loss: Tensor, got_grads: list[Tensor], want_dtypes: list[torch.dtype]) -> None:
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.detach(), exact.detach(), rtol=2e-2, atol=0.0)
        for got, want, dtype in zip(got_grads, exact_grads, want_dtypes):
            assert got.dtype == dtype
            scale = float(want.abs().max())
            torch.testing.assert_close(got.float(), want, rtol=0.0, atol=3e-2 * scale)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = fused(case, **kwargs)
        autocast_unfused, _ = unfused(case, **kwargs)
    close_to_fp32(autocast, grads(autocast, case), [torch.float32] * 3)
    torch.testing.assert_close(autocast.detach(), autocast_unfused.detach(), rtol=1e-3, atol=0.0)

    low = {**case, **{name: case[name].detach().bfloat16().requires_grad_() for name in ("hidden", "weight", "bias")}}
    loss, _ = fused(low, **kwargs)
    close_to_fp32(loss, grads(loss, low), [torch.bfloat16] * 3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nothing_to_learn_gives_zero_not_nan(loss_type: str) -> None:
    case = make_case(seed=11)
    kwargs = {"loss_type": loss_type, "surrogate_weight": 1.0, "z_loss_multiplier": 1e-3, "chunk_tokens": 4}
    loss, parts = fused({**case, "labels": torch.full_like(case["labels"], IGNORE)}, **kwargs)
    assert float(loss.detach()) == 0.0 and int(parts["num_labels"]) == 0
    assert all(float(g.abs().max()) == 0.0 for g in grads(loss, case))
    no_cands = {**case, "cand_ids": torch.full_like(case["cand_ids"], -1),
                "cand_logprobs": torch.full_like(case["cand_logprobs"], -math.inf)}
    loss, parts = fused(no_cands, **kwargs)
    assert float(parts["aux"]) == 0.0 and int(parts["guided_positions"]) == 0
    assert all(bool(g.isfinite().all()) for g in grads(loss, case))


@pytest.mark.parametrize("loss_type", AUX_TYPES)
def test_extreme_values_match_autograd(loss_type: str) -> None:
    """Near one-hot softmax, buckets covering the whole vocabulary (Q's tail floored) and p_s down to ~1e-100."""
    case = make_case(vocab=6, k=6, seed=12, dtype=torch.float64)
    with torch.no_grad():
        case["weight"].mul_(200.0)
    shape = case["labels"].shape
    case["cand_ids"] = torch.arange(6).expand(*shape, 6).contiguous()
    case["cand_logprobs"] = torch.log_softmax(torch.randn(*shape, 6, dtype=torch.float64) * 80, -1)
    kwargs = {"loss_type": loss_type, "surrogate_weight": 1.0, "z_loss_multiplier": 1e-4}
    assert_same(fused(case, chunk_tokens=4, **kwargs), unfused(case, **kwargs), case, rtol=1e-9, atol=1e-12)


def test_rejects_bad_arguments() -> None:
    case = make_case()
    kwargs = {"loss_type": "surrogate", "surrogate_weight": 1.0}
    with pytest.raises(ValueError, match="surrogate.*kl.*standard"):
        fused(case, loss_type="sdce", surrogate_weight=1.0)
    with pytest.raises(ValueError, match="needs cand_ids"):
        fused({**case, "cand_ids": None, "cand_logprobs": None}, **kwargs)
    with pytest.raises(ValueError, match=r"weight \[V, H\]"):
        fused({**case, "weight": case["weight"][:, :5]}, **kwargs)
    with pytest.raises(ValueError, match=r"bias \[V\]"):
        fused({**case, "bias": case["bias"][:5]}, **kwargs)
    with pytest.raises(ValueError, match=r"hidden \[B, T, H\]"):
        fused({**case, "hidden": case["hidden"][0]}, **kwargs)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused(case, chunk_tokens=0, **kwargs)


def test_scales_by_the_incoming_gradient_and_refuses_a_second_backward() -> None:
    case = make_case(seed=13)
    kwargs = {"loss_type": "surrogate", "surrogate_weight": 0.5, "chunk_tokens": 4}
    want = grads(3.0 * unfused(case, **kwargs)[0], case)
    loss, _ = fused(case, **kwargs)
    got = torch.autograd.grad(3.0 * loss, leaves(case), retain_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_tied_embedding_and_lm_head() -> None:
    """GPT-2 style: hidden comes from the same weight (the embedding); both gradients reach it."""
    case = make_case(seed=14, bias=False)
    tokens = torch.randint(0, case["weight"].shape[0], case["labels"].shape, generator=torch.Generator().manual_seed(0))
    kwargs = {"loss_type": "kl", "surrogate_weight": 0.5, "z_loss_multiplier": 1e-3}
    results = []
    for loss_fn, extra in ((fused, {"chunk_tokens": 4}), (unfused, {})):
        tied = {**case, "hidden": torch.tanh(torch.nn.functional.embedding(tokens, case["weight"]))}
        (weight_grad,) = torch.autograd.grad(loss_fn(tied, **kwargs, **extra)[0], [case["weight"]])
        results.append(weight_grad)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)
