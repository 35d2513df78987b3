"""SDCE loss functions (docs/method.md §4): standard CE, surrogate-guided CE and bucket KL.

All three are sums over positions divided by one label count N, so that
micro-batches and data-parallel ranks that share the global N add up to the
loss of one big batch. Pure tensor code: no `.item()`, no host sync, no
data-dependent shapes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

LOSS_TYPES = ("surrogate", "kl", "standard")
IGNORE_INDEX = -100  # the label of a position without a target (the transformers convention)


def _validate(
    scores: Tensor, labels: Tensor, cand_ids: Tensor | None, cand_logprobs: Tensor | None, loss_type: str,
    scores_name: str = "logits [B, T, V]",
) -> None:
    """Raise ValueError for arguments of sdce_loss (scores: the logits) that the caller must change."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if scores.dim() != 3 or labels.shape != scores.shape[:2]:
        raise ValueError(
            f"expected {scores_name} and labels [B, T], got {tuple(scores.shape)} and {tuple(labels.shape)}"
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


def _surrogate_term(log_q: Tensor, logprobs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """S_t = sum_j w_tj * l_tj over the valid candidates -> [...] (0 where none), and dS/dlog_q -> [..., k].

    The gradient (0 at invalid slots) is dS/dz_j = q_j * sum_i w_i - w_j with q the candidate-set softmax
    (sum_i w_i = 1 for a row with candidates); fused_sdce_loss uses it, sdce_loss leaves it to autograd.

    Args:
        log_q: [..., k] base log-softmax at the candidate ids (the candidate-set softmax is shift
            invariant, so these serve as well as logits).
        logprobs: [..., k] surrogate log-probs (no gradient).
        valid: [..., k] bool, which slots hold a candidate.
    """
    weights = _candidate_weights(logprobs, valid)
    log_q_set = _masked_log_softmax(log_q, valid)
    grad = (log_q_set.exp() * weights.sum(-1, keepdim=True) - weights) * valid
    return -(weights * log_q_set).sum(-1), grad


def _candidate_weights(logprobs: Tensor, valid: Tensor) -> Tensor:
    """w_tj = softmax over the valid slots of -1/p_s(j) -> [B, T, k], 0 at invalid slots."""
    # Clamping log p_s keeps 1/p_s finite for p_s ~ 0 (threshold 0).
    max_log = math.log(torch.finfo(logprobs.dtype).max) - 1.0
    neg_perplexity = -torch.exp(-logprobs.clamp(min=-max_log))
    return _masked_log_softmax(neg_perplexity, valid).exp() * valid


def _kl_term(log_q: Tensor, logprobs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """KL(P_t || Q_t) over the k bucket ids plus one tail bucket -> [...], and dKL/dlog_q -> [..., k].

    KL = sum_j p_j (log p_j - log q_j) + p_tail (log p_tail - log(1 - m)) with m = sum_j q_j, so
    dKL/dlog q_j = -p_j + p_tail * m / (1 - m) * q_j / m (0 at invalid slots; none where m is floored
    at 1 - eps). fused_sdce_loss uses the gradient, sdce_loss leaves it to autograd.

    Args:
        log_q: [..., k] base log-softmax at the bucket ids.
        logprobs: [..., k] surrogate log-probs (no gradient).
        valid: [..., k] bool, which slots hold a bucket.
    """
    p, log_p, p_tail, log_p_tail = _surrogate_buckets(logprobs, valid)
    head = (p * (log_p - log_q)).sum(-1)
    log_mass = _masked_logsumexp(log_q, valid)
    # Q's tail is floored at eps: below that fp cannot resolve it from top-k data.
    q_mass = log_mass.clamp(max=_q_mass_max(log_q.dtype))
    log_q_tail = _log1mexp(q_mass)
    tail_grad = torch.where(log_mass <= q_mass, p_tail * torch.exp(q_mass - log_q_tail), 0.0)
    share = torch.where(valid, torch.exp(log_q - log_mass.unsqueeze(-1)), 0.0)  # q_j / m
    return head + p_tail * (log_p_tail - log_q_tail), tail_grad.unsqueeze(-1) * share - p


def _q_mass_max(dtype: torch.dtype) -> float:
    """The largest log of Q's head mass that _kl_term resolves: log(1 - eps)."""
    return math.log1p(-torch.finfo(dtype).eps)


def _surrogate_buckets(logprobs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """P's bucket probabilities and logs [B, T, k] and its tail bucket and log [B, T] (logs 0 where p = 0).

    The tail 1 - sum is taken in log space; a sum a hair above 1 is rounding and gives tail 0.
    """
    p = torch.where(valid, logprobs.exp(), 0.0)
    log_p = torch.where(p > 0, logprobs, 0.0)  # 0 * log 0 = 0: keep the factor finite
    log_p_tail = _log1mexp(_masked_logsumexp(log_p, p > 0).clamp(max=0.0))
    p_tail = log_p_tail.exp()
    return p, log_p, p_tail, torch.where(p_tail > 0, log_p_tail, 0.0)


_AUX_TERMS = {"surrogate": _surrogate_term, "kl": _kl_term}


def _log_softmax_at(logits: Tensor, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """log softmax(z_t) [B, T, m] at `ids` [B, T, m], computed in `dtype`.

    One full-vocab log-softmax serves the CE and every candidate, so the backward
    is one pass over V, as for plain cross-entropy (whose nll_loss is this gather
    at the targets). The upcast copy of low-precision logits is freed on return.
    """
    return torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, ids)


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
        guided_at = valid.any(-1)  # positions with no valid slot (no label, no candidate) add exactly 0
        per_position, _ = _AUX_TERMS[loss_type](log_probs[..., 1:], cand_logprobs.detach().to(dtype), valid)
        aux_sum = torch.where(guided_at, per_position, 0.0).sum()  # the gradient: autograd's
        guided = guided_at.sum()
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


# --- Fused LM head + SDCE loss: no full-vocabulary logits --------------------------------------------------------

DEFAULT_CHUNK_TOKENS = 512  # fp32 logits of one chunk: 103 MB at V = 50,257, 311 MB at V = 151,936


@dataclasses.dataclass(frozen=True)
class _FusedSpec:
    """The static settings of one fused_sdce_loss call."""

    loss_type: str
    z_loss_multiplier: float
    chunk_tokens: int
    matmul_dtype: torch.dtype  # of the three matmuls (the autocast dtype under autocast)
    softmax_dtype: torch.dtype  # of everything over V: at least fp32


@dataclasses.dataclass(frozen=True)
class _FusedBatch:
    """The data of one call, flattened to M = B * T rows; no gradient flows into any of it."""

    labelled: Tensor  # [M] bool
    ids: Tensor  # [M, 1 (+ k)] long: the target (0 where none), then the candidates (0 where empty)
    cand_logprobs: Tensor | None  # [M, k] in softmax_dtype
    valid: Tensor | None  # [M, k] bool: a candidate at a labelled position
    n: Tensor | float  # the divisor N
    weight: Tensor | float  # lambda


def _fused_chunk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, batch: _FusedBatch, rows: slice, spec: _FusedSpec,
    want_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Loss sums over rows of one chunk -> (ce_sum, aux_sum, z_sum, dL/dlogits [c, V] in softmax_dtype or None).

    Holds one [c, V] buffer in softmax_dtype (plus, for a low-precision matmul, its [c, V] input or output copy)
    and overwrites it in place: logits -> exp(z - max) -> the gradient.
    """
    h = hidden[rows]
    logits = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    z = logits.to(spec.softmax_dtype)  # the same tensor when the matmul already ran in softmax_dtype
    del logits
    ids, labelled = batch.ids[rows], batch.labelled[rows]
    z_at = z.gather(1, ids)  # [c, 1 (+ k)]
    z_max = z.amax(1, keepdim=True)
    exp_sum = z.sub_(z_max).exp_().sum(1, keepdim=True)  # z now holds exp(z - max)
    lse = (z_max + exp_sum.log()).squeeze(1)  # [c]
    log_probs = z_at - lse.unsqueeze(1)  # log softmax at the target, then at the candidates
    ce_sum = torch.where(labelled, -log_probs[:, 0], 0.0).sum()
    z_sum = torch.where(labelled, lse, 0.0).square().sum()
    inv_n = 1.0 / batch.n
    slot_grad = (labelled.to(z.dtype) * -inv_n).unsqueeze(1)  # dL/dlog softmax at the target: CE
    if spec.loss_type == "standard":
        aux_sum = ce_sum.new_zeros(())
    else:
        valid = batch.valid[rows]
        per_position, aux_grad = _AUX_TERMS[spec.loss_type](log_probs[:, 1:], batch.cand_logprobs[rows], valid)
        guided = valid.any(-1)
        aux_sum = torch.where(guided, per_position, 0.0).sum()
        aux_grad = torch.where(guided.unsqueeze(1), aux_grad, 0.0) * (batch.weight * inv_n)
        slot_grad = torch.cat([slot_grad, aux_grad], 1)
    if not want_grad:
        return ce_sum, aux_sum, z_sum, None
    # d log softmax(z)[i] / dz = onehot(i) - softmax(z); d lse / dz = softmax(z).
    lse_grad = torch.where(labelled, (2.0 * spec.z_loss_multiplier) * lse * inv_n, 0.0)
    softmax_coef = lse_grad - slot_grad.sum(1)  # [c]
    z.mul_(softmax_coef.unsqueeze(1) / exp_sum).scatter_add_(1, ids, slot_grad)
    return ce_sum, aux_sum, z_sum, z


def _fused_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, batch: _FusedBatch, spec: _FusedSpec,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Loss, the sums [ce, aux, z] and the gradients of the loss w.r.t. (hidden, weight, bias) where asked.

    hidden [M, H], weight [V, H], bias [V] or None, each in its own dtype; the matmuls cast to matmul_dtype.
    """
    mdt, sdt = spec.matmul_dtype, spec.softmax_dtype
    h, w = hidden.to(mdt), weight.to(mdt)
    b = None if bias is None else bias.to(mdt)
    want_grad = any(needs_grad)
    grad_h = torch.empty_like(hidden) if needs_grad[0] else None
    # grad_weight and grad_bias add up over chunks in at least fp32.
    grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, sdt), device=weight.device) \
        if needs_grad[1] else None
    grad_b = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, sdt), device=bias.device) \
        if needs_grad[2] else None
    sums = []
    for start in range(0, h.shape[0], spec.chunk_tokens):  # static: the last chunk may be shorter
        rows = slice(start, min(start + spec.chunk_tokens, h.shape[0]))
        *chunk_sums, grad_z = _fused_chunk(h, w, b, batch, rows, spec, want_grad)
        sums.append(torch.stack(chunk_sums))
        if grad_z is None:
            continue
        grad_logits = grad_z.to(mdt)  # [c, V]
        if grad_h is not None:
            grad_h[rows] = torch.mm(grad_logits, w)
        if grad_w is not None:
            if grad_w.dtype == mdt:
                grad_w.addmm_(grad_logits.t(), h[rows])
            else:
                grad_w += torch.mm(grad_logits.t(), h[rows])
        if grad_b is not None:
            grad_b += grad_z.sum(0)
        del grad_z, grad_logits
    totals = torch.stack(sums).sum(0)  # [ce, aux, z]
    ce_sum, aux_sum, z_sum = totals.unbind()
    loss = ce_sum / batch.n if spec.loss_type == "standard" else (ce_sum + batch.weight * aux_sum) / batch.n
    if spec.z_loss_multiplier != 0.0:
        loss = loss + spec.z_loss_multiplier * z_sum / batch.n
    grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return loss, totals, (grad_h, grad_w, grad_b)


class _FusedSDCE(torch.autograd.Function):
    """The loss as one autograd node: the forward computes the gradients too, the backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, batch: _FusedBatch, spec: _FusedSpec):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, sums, grads = _fused_forward(hidden, weight, bias, batch, spec, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(sums)
        ctx.used = False
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_sums: Tensor):
        # In place: a copy would double the memory of grad_weight. So a second backward cannot work.
        if ctx.used:
            raise RuntimeError("fused_sdce_loss supports one backward per forward (it scales its gradients in place)")
        ctx.used = True
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors)
        return *scaled, None, None


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the LM head matmul: the autocast dtype where autocast is on, else the inputs' common dtype."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return dtype


def fused_sdce_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    cand_ids: Tensor | None,
    cand_logprobs: Tensor | None,
    *,
    loss_type: str,
    surrogate_weight: float | Tensor,
    num_labels: Tensor | int | None = None,
    z_loss_multiplier: float = 0.0,
    bias: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sdce_loss(hidden @ weight.T + bias, ...) without ever holding the [B, T, V] logits.

    The LM head and the loss run chunk by chunk over the B * T positions: per chunk one matmul gives its logits,
    one pass over V gives the log-sum-exp that CE, the candidate terms and the z-loss all use, and, when a
    gradient is wanted, the gradient of the loss w.r.t. those logits (closed form: softmax minus one-hot for CE,
    plus the candidate and z-loss terms) is built in the same buffer and turned into the chunk's share of the
    gradients of hidden, weight and bias by two more matmuls. The backward only scales the stored gradients by
    the incoming gradient. So: 3 matmuls in all, as for the unfused path, and at most one chunk of logits alive
    at any time. Under no_grad (or when no input requires grad) only the forward runs: 1 matmul.

    Peak memory above the inputs (C = chunk_tokens, M = B * T, b(x) = bytes per element of x):
      C * V * 4                       one chunk in fp32: its logits, then exp(z - max), then dL/dlogits
      + C * V * b(matmul)             a low-precision copy of that chunk, only for a bf16/fp16 matmul
      + M * H * b(hidden) + V * H * b(weight) (+ V * b(bias))   the gradients, held from forward to backward
    and, only with low-precision matmuls: (M + V) * H * b(matmul) for inputs that autocast must cast, the
    [V, H] matmul product of each chunk's grad_weight share, and an fp32 [V, H] accumulator for a bf16 weight.
    Default C = 512: 103 MB of fp32 logits at V = 50,257, 311 MB at V = 151,936. E.g. V = 50,257, H = 768,
    8 x 1024 tokens, fp32: 103 + 25 + 154 MB, where logits + sdce_loss need ~5 GB (bench/bench_loss.py).

    Precision follows sdce_loss: the matmuls run in the inputs' dtype, or in the autocast dtype under
    torch.autocast; everything over V runs in at least fp32; gradients come back in the inputs' dtypes.
    No host sync and static shapes only (the last chunk is shorter, not padded), so it runs on XLA.
    One backward per forward: the backward scales the stored gradients in place (a second one raises).
    Only for logits = hidden @ weight.T + bias: a model that soft-caps or rescales its logits
    (config.final_logit_softcapping, logit_scale) needs sdce_loss.

    Args:
        hidden: [B, T, H] the base model's last hidden state (after its final norm).
        weight: [V, H] the LM head (model.get_output_embeddings().weight; tied or not).
        labels, cand_ids, cand_logprobs, loss_type, surrogate_weight, num_labels, z_loss_multiplier,
            ignore_index: as for sdce_loss.
        bias: [V] the LM head's bias, if it has one.
        chunk_tokens: positions per chunk C; the memory/speed trade-off above.

    Returns:
        (loss 0-dim, parts): the same as sdce_loss of the logits, so either can stand in for the other.
    """
    _validate(hidden, labels, cand_ids, cand_logprobs, loss_type, "hidden [B, T, H]")
    _validate_head(hidden, weight, bias, chunk_tokens)
    matmul_dtype = _matmul_dtype(hidden, weight)
    spec = _FusedSpec(loss_type, float(z_loss_multiplier), chunk_tokens, matmul_dtype,
                      torch.promote_types(matmul_dtype, torch.float32))
    batch, count, guided = _fused_batch(labels, cand_ids, cand_logprobs, surrogate_weight, num_labels,
                                        ignore_index, spec)
    flat = hidden.reshape(-1, hidden.shape[-1])
    inputs = (flat, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        loss, sums = _FusedSDCE.apply(flat, weight, bias, batch, spec)
    else:
        with torch.autocast(hidden.device.type, enabled=False):
            loss, sums, _ = _fused_forward(flat, weight, bias, batch, spec, (False, False, False))
    ce, aux, z = (sums / batch.n).unbind()
    return loss, {"ce": ce, "aux": aux, "z_loss": z, "num_labels": count, "guided_positions": guided}


def _validate_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_tokens: int) -> None:
    """Raise ValueError for the LM head and chunk size of fused_sdce_loss that the caller must change."""
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected weight [V, H] with H = {hidden.shape[2]}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"expected bias [V] with V = {weight.shape[0]}, got {tuple(bias.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def _fused_batch(
    labels: Tensor, cand_ids: Tensor | None, cand_logprobs: Tensor | None, surrogate_weight: float | Tensor,
    num_labels: Tensor | int | None, ignore_index: int, spec: _FusedSpec,
) -> tuple[_FusedBatch, Tensor, Tensor]:
    """Flatten the data to M rows -> (batch, label count, guided-position count)."""
    labelled = (labels != ignore_index).reshape(-1)
    targets = torch.where(labelled, labels.reshape(-1), 0).long().unsqueeze(1)
    count = labelled.sum()
    n = _normaliser(num_labels, count, spec.softmax_dtype)
    if spec.loss_type == "standard":
        return _FusedBatch(labelled, targets, None, None, n, 0.0), count, count.new_zeros(())
    k = cand_ids.shape[-1]
    flat_ids = cand_ids.reshape(-1, k).long()
    valid = (flat_ids >= 0) & labelled.unsqueeze(1)
    ids = torch.cat([targets, flat_ids.clamp(min=0)], 1)
    cand_lp = cand_logprobs.detach().reshape(-1, k).to(spec.softmax_dtype)
    weight = surrogate_weight.detach().to(spec.softmax_dtype) if isinstance(surrogate_weight, Tensor) \
        else surrogate_weight
    return _FusedBatch(labelled, ids, cand_lp, valid, n, weight), count, valid.any(-1).sum()
