"""Surrogate guidance: surrogate inputs and candidate selection (SDCE §2, §3).

Everything here is static-shape tensor code (no `.item()`, no boolean indexing,
no data-dependent shapes) so that it runs unchanged on CPU, CUDA and XLA.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor


class Alignment(Protocol):
    """The two lookup tables of a vocabulary alignment (SDCE §1); -1 means no match."""

    base_to_surrogate: Tensor  # [V_b] long
    surrogate_to_base: Tensor  # [V_s] long


def surrogate_inputs(
    input_ids: Tensor,
    alignment: Alignment,
    placeholder_id: int = 0,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Map base input ids to surrogate input ids position by position (SDCE §2).

    Args:
        input_ids: [B, T] base token ids. Negative ids count as unmapped.
        alignment: provides `base_to_surrogate` [V_b].
        placeholder_id: surrogate id written where a base token has no match.
        attention_mask: optional [B, T] base mask (nonzero = attend), AND-ed in.

    Returns:
        (surrogate_ids [B, T] long, attention_mask [B, T] long): unmapped positions
        hold `placeholder_id` and have mask 0, so no position attends to them.
    """
    b2s = alignment.base_to_surrogate.to(input_ids.device)
    mapped_ids = b2s[input_ids.long().clamp(min=0)]
    mapped = (input_ids >= 0) & (mapped_ids >= 0)
    if attention_mask is not None:
        mapped = mapped & (attention_mask != 0)
    surrogate_ids = torch.where(mapped, mapped_ids, torch.full_like(mapped_ids, placeholder_id))
    return surrogate_ids, mapped.long()


def _validate_selection(topk_ids: Tensor, topk_logprobs: Tensor, labels: Tensor, k: int, threshold: float) -> None:
    """Raise ValueError for arguments of select_candidates that the caller must change."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (number of candidates per position), got {k}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (a probability floor; 0 keeps all), got {threshold}")
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 3:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
            "must both be [B, T, K']"
        )
    if labels.shape != topk_ids.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] = {tuple(topk_ids.shape[:2])}")
    if topk_ids.shape[-1] < k:
        raise ValueError(
            f"the surrogate sent K'={topk_ids.shape[-1]} ids per position but k={k}: "
            f"request at least k (k+1 when the target is excluded) or lower k"
        )


def _compact(values: Tensor, keep: Tensor, k: int, fill: float) -> Tensor:
    """First k entries of `values` [..., K'] where `keep`, in order, padded with `fill` -> [..., k].

    Static shapes: each kept entry is scattered to its rank among kept entries;
    everything else (dropped, or rank >= k) goes to a spare slot k that is cut off.
    """
    rank = keep.long().cumsum(-1) - 1
    slot = torch.where(keep & (rank < k), rank, torch.full_like(rank, k))
    out = torch.full((*values.shape[:-1], k + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter(-1, slot, values)[..., :k]


def select_candidates(
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    labels: Tensor,
    alignment: Alignment,
    k: int,
    threshold: float,
    exclude_target: bool = True,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Pick the candidate set C_t of every position from the surrogate's top-K' (SDCE §3).

    Keeps, in the given order, surrogate ids that are permitted (map to a base id
    whose representative maps back to them), are not the target b2s[y_t] when
    `exclude_target`, and have p_s >= threshold; then takes the first k.
    Rows are empty where y_t == ignore_index, and, when `exclude_target`,
    where b2s[y_t] == -1. For `kl` call with exclude_target=False, threshold=0.

    Args:
        topk_ids: [B, T, K'] surrogate ids sorted by descending log-prob, -1 = empty slot.
        topk_logprobs: [B, T, K'] surrogate log-probs, -inf = empty slot.
        labels: [B, T] base target ids, ignore_index where there is none.
        alignment: provides `base_to_surrogate` [V_b] and `surrogate_to_base` [V_s].
        k: candidates per position, 1 <= k <= K'.
        threshold: probability floor in [0, 1); 0 keeps every permitted id.

    Returns:
        cand_ids [B, T, k] long base ids (-1 empty), cand_logprobs [B, T, k]
        float32 (-inf empty); empty slots are trailing and log-probs descend.
    """
    _validate_selection(topk_ids, topk_logprobs, labels, k, threshold)
    device = topk_ids.device
    b2s = alignment.base_to_surrogate.to(device)
    s2b = alignment.surrogate_to_base.to(device)
    ids = topk_ids.long()
    logprobs = topk_logprobs.float()

    base_ids = s2b[ids.clamp(min=0)]
    # Round trip: with duplicate tokens only the representative survives, so base ids stay distinct.
    permitted = (ids >= 0) & (base_ids >= 0) & (b2s[base_ids.clamp(min=0)] == ids)
    keep = permitted & (logprobs > -math.inf) & (labels != ignore_index).unsqueeze(-1)
    if threshold > 0.0:
        keep = keep & (logprobs >= math.log(threshold))
    if exclude_target:
        target = b2s[labels.long().clamp(min=0)].unsqueeze(-1)  # [B, T, 1]
        keep = keep & (target >= 0) & (ids != target)

    cand_ids = _compact(base_ids, keep, k, fill=-1)
    cand_logprobs = _compact(logprobs, keep, k, fill=-math.inf)
    return cand_ids, cand_logprobs
