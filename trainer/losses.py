"""SDCE loss functions (docs/method.md §4): standard CE, surrogate-guided CE and bucket KL.

All three are sums over positions divided by one label count N, so that
micro-batches and data-parallel ranks that share the global N add up to the
loss of one big batch. Pure tensor code: no `.item()`, no host sync, no
data-dependent shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS_TYPES = ("surrogate", "kl", "standard")
IGNORE_INDEX = -100  # the label of a position without a target (the transformers convention)


def _validate(
    logits: Tensor, labels: Tensor, cand_ids: Tensor | None, cand_logprobs: Tensor | None, loss_type: str
) -> None:
    """Raise ValueError for arguments of sdce_loss that the caller must change."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if loss_type == "standard":
        return
    if cand_ids is None or cand_logprobs is None:
        raise ValueError(f"loss_type {loss_type!r} needs cand_ids and cand_logprobs (from select_candidates)")
    if cand_ids.shape != cand_logprobs.shape or cand_ids.shape[:2] != labels.shape or cand_ids.dim() != 3:
        raise ValueError(
            f"cand_ids {tuple(cand_ids.shape)} and cand_logprobs {tuple(cand_logprobs.shape)} "
            f"must both be [B, T, k] with [B, T] = {tuple(labels.shape)}"
        )


def _normaliser(num_labels: Tensor | int | None, count: Tensor, dtype: torch.dtype) -> Tensor | float:
    """The divisor N: the given global count, else this call's count; at least 1 so no labels gives 0, not NaN."""
    if num_labels is None:
        return count.to(dtype).clamp(min=1)
    if isinstance(num_labels, Tensor):
        return num_labels.to(device=count.device, dtype=dtype).clamp(min=1)
    return float(max(num_labels, 1))


def _masked_log_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """log softmax of x [..., k] over the `valid` entries of the last dim.

    Invalid entries (and rows with no valid entry) come out as 0, finite, with
    zero gradient, so that `weight * result` is safe when the weight is 0 there.
    """
    fill = torch.finfo(x.dtype).min  # finite: a row of only fills gives -log k, not NaN
    return torch.log_softmax(x.masked_fill(~valid, fill), dim=-1).masked_fill(~valid, 0.0)


def _masked_logsumexp(x: Tensor, valid: Tensor) -> Tensor:
    """logsumexp of x [..., k] over the `valid` entries -> [...]; ~finfo.min where none is valid."""
    return torch.logsumexp(x.masked_fill(~valid, torch.finfo(x.dtype).min), dim=-1)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate near 0 and far below; finite gradient for a < 0.

    Each branch gets a safe input, so the branch not taken cannot make NaN gradients.
    """
    near = a > -math.log(2.0)
    a_near = torch.where(near, a, -math.log(2.0))
    a_far = torch.where(near, -math.log(2.0), a)
    return torch.where(near, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def _surrogate_term(z_cand: Tensor, logprobs: Tensor, valid: Tensor) -> Tensor:
    """S_t = sum_j w_tj * l_tj over the valid candidates -> [B, T] (0 where none).

    Args:
        z_cand: [B, T, k] base logits at the candidate ids.
        logprobs: [B, T, k] surrogate log-probs (no gradient).
        valid: [B, T, k] bool, which slots hold a candidate.
    """
    # w = softmax(-1/p_s); clamping log p_s keeps 1/p_s finite for p_s ~ 0 (threshold 0).
    max_log = math.log(torch.finfo(logprobs.dtype).max) - 1.0
    neg_perplexity = -torch.exp(-logprobs.clamp(min=-max_log))
    weights = _masked_log_softmax(neg_perplexity, valid).exp() * valid
    log_q = _masked_log_softmax(z_cand, valid)
    return -(weights * log_q).sum(-1)


def _kl_term(log_q: Tensor, logprobs: Tensor, valid: Tensor) -> Tensor:
    """KL(P_t || Q_t) over the k bucket ids plus one tail bucket -> [B, T].

    Args:
        log_q: [B, T, k] base log-softmax at the bucket ids.
        logprobs: [B, T, k] surrogate log-probs (no gradient).
        valid: [B, T, k] bool, which slots hold a bucket.
    """
    p = torch.where(valid, logprobs.exp(), 0.0)
    log_p = torch.where(p > 0, logprobs, 0.0)  # 0 * log 0 = 0: keep the factor finite
    head = (p * (log_p - log_q)).sum(-1)

    # Tails 1 - sum in log space; sums a hair above 1 are rounding: P's tail is then 0,
    # Q's tail is floored at eps (below that fp cannot resolve it from top-k data).
    log_p_tail = _log1mexp(_masked_logsumexp(log_p, p > 0).clamp(max=0.0))
    p_tail = log_p_tail.exp()
    log_p_tail = torch.where(p_tail > 0, log_p_tail, 0.0)
    q_mass = _masked_logsumexp(log_q, valid).clamp(max=math.log1p(-torch.finfo(log_q.dtype).eps))
    return head + p_tail * (log_p_tail - _log1mexp(q_mass))


def _log_softmax_at(logits: Tensor, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """log softmax(z_t) [B, T, m] at `ids` [B, T, m], computed in `dtype`.

    One full-vocab log-softmax serves the CE and every candidate, so the backward
    is one pass over V, as for plain cross-entropy (whose nll_loss is this gather
    at the targets). The upcast copy of low-precision logits is freed on return.
    """
    return torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, ids)


def _aux_sum(loss_type: str, log_q: Tensor, logprobs: Tensor, valid: Tensor) -> Tensor:
    """sum_t S_t or sum_t KL_t; a position with no valid slot (no label, or no candidate) adds exactly 0.

    Args:
        log_q: [B, T, k] base log-softmax at the candidate ids (the candidate-set softmax
            of the surrogate term is shift invariant, so these serve it as well as logits).
    """
    if loss_type == "surrogate":
        per_position = _surrogate_term(log_q, logprobs, valid)
    else:
        per_position = _kl_term(log_q, logprobs, valid)
    return torch.where(valid.any(-1), per_position, 0.0).sum()


def sdce_loss(
    logits: Tensor,
    labels: Tensor,
    cand_ids: Tensor | None,
    cand_logprobs: Tensor | None,
    *,
    loss_type: str,
    surrogate_weight: float | Tensor,
    num_labels: Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    z_loss_multiplier: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SDCE loss L = (sum_t CE_t + lambda * sum_t aux_t) / N [+ z_mult * sum_t lse_t^2 / N].

    Memory and time as F.cross_entropy: one full-vocab log-softmax in fp32 that the
    CE and the candidates are gathered from; the aux terms work on [B, T, k] only.
    The z-loss adds one more pass over V in the backward (only when it is on).

    Args:
        logits: [B, T, V] base logits, any float dtype (computed in at least fp32).
        labels: [B, T] target ids, `ignore_index` where there is none.
        cand_ids: [B, T, k] base ids from select_candidates, -1 = empty (None for standard).
        cand_logprobs: [B, T, k] surrogate log-probs, -inf = empty; treated as data (detached).
        loss_type: "surrogate" (aux = S_t), "kl" (aux = bucket KL) or "standard" (no aux).
        surrogate_weight: lambda, a float or 0-dim tensor; lambda = 0 gives the standard
            loss bit for bit.
        num_labels: N, the label count of the whole optimizer step (all micro-batches and
            ranks); None counts this call's labels. Clamped to >= 1.
        z_loss_multiplier: weight of the z-loss, summed over labelled positions.

    Returns:
        (loss 0-dim, parts) where parts holds detached 0-dim tensors: "ce", "aux",
        "z_loss" (each a sum over this call / N, unweighted, so they add up across
        micro-batches), "num_labels" and "guided_positions" (counts in this call).
    """
    _validate(logits, labels, cand_ids, cand_logprobs, loss_type)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    labelled = labels != ignore_index
    targets = torch.where(labelled, labels, 0).long().unsqueeze(-1)  # [B, T, 1]
    ids = targets if loss_type == "standard" else torch.cat([targets, cand_ids.long().clamp(min=0)], dim=-1)
    log_probs = _log_softmax_at(logits, ids, dtype)  # [B, T, 1 (+ k)]: at y_t, then at the candidates
    ce_sum = torch.where(labelled, -log_probs[..., 0], 0.0).sum()
    count = labelled.sum()
    n = _normaliser(num_labels, count, dtype)
    # lse_t = z_t[y_t] - log softmax(z_t)[y_t]; its backward pass over V runs only when the z-loss is on.
    lse = torch.where(labelled, logits.gather(-1, targets).squeeze(-1).to(dtype) - log_probs[..., 0], 0.0)
    z_sum = lse.square().sum()

    if loss_type == "standard":
        aux_sum, guided = ce_sum.new_zeros(()), count.new_zeros(())
        loss = ce_sum / n
    else:
        valid = (cand_ids >= 0) & labelled.unsqueeze(-1)
        aux_sum = _aux_sum(loss_type, log_probs[..., 1:], cand_logprobs.detach().to(dtype), valid)
        guided = valid.any(-1).sum()
        weight = surrogate_weight.to(dtype) if isinstance(surrogate_weight, Tensor) else surrogate_weight
        loss = (ce_sum + weight * aux_sum) / n  # 0 * finite adds nothing: lambda = 0 is standard, bit for bit
    if z_loss_multiplier != 0.0:
        loss = loss + z_loss_multiplier * z_sum / n

    parts = {
        "ce": (ce_sum / n).detach(),
        "aux": (aux_sum / n).detach(),
        "z_loss": (z_sum / n).detach(),
        "num_labels": count,
        "guided_positions": guided,
    }
    return loss, parts
