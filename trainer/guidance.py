"""Surrogate guidance for training batches: surrogate inputs in, fixed-size base-id candidates out.

A ``Guide`` runs docs/method.md §2-§3 around a ``SurrogateSource`` (the in-process
engine or a client of the surrogate server): build the surrogate's input (with
``alignment: bytes`` the block's text in the surrogate's own tokenization, made in the
DataLoader by ``SurrogateInputs``; with ``tokens`` the base ids mapped one by one,
``surrogate_inputs``), ask for the top k (+1 so the target can be dropped), bring the
answers to the base positions (``at_base_positions``), and select the candidates (``select_candidates``, the one place that decides which
survive: permitted, not the target, above the threshold). ``guided_batches``
attaches them to each micro-batch, optionally requesting a few micro-batches ahead
in background threads.

The tensor functions are static-shape code (no ``.item()``, no boolean indexing, no
data-dependent shapes), so they run unchanged on CPU, CUDA and XLA.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import Tensor
from torch.utils.data import default_collate

from surrogate_server.source import SurrogateSource, SurrogateUnavailable
from surrogate_server.vocabulary import VocabularySpec
from trainer.alignment import ByteAligner, VocabAlignment
from trainer.data import document_positions
from trainer.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class Alignment(Protocol):
    """The two lookup tables of a vocabulary alignment (docs/method.md §1); -1 means no match."""

    base_to_surrogate: Tensor  # [V_b] long
    surrogate_to_base: Tensor  # [V_s] long


def surrogate_inputs(
    input_ids: Tensor,
    alignment: Alignment,
    placeholder_id: int = 0,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Map base input ids to surrogate input ids position by position (docs/method.md §2).

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
    ignore_index: int = IGNORE_INDEX,
    stages: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick the candidate set C_t of every position from the surrogate's top-K' (docs/method.md §3).

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
        stages: filled, when given, with how many labelled positions keep at least one id after each
            rule (0-dim tensors, no host sync): labelled, proposed (any entry), permitted, above_threshold,
            kept (what diagnostics read to say which setting removed the candidates).

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
    labelled = (labels != ignore_index).unsqueeze(-1)
    proposed = (ids >= 0) & (logprobs > -math.inf) & labelled
    keep = permitted & proposed
    after = {"labelled": labelled, "proposed": proposed, "permitted": keep}
    if threshold > 0.0:
        keep = keep & (logprobs >= math.log(threshold))
    after["above_threshold"] = keep
    if exclude_target:
        target = b2s[labels.long().clamp(min=0)].unsqueeze(-1)  # [B, T, 1]
        keep = keep & (target >= 0) & (ids != target)
    after["kept"] = keep
    if stages is not None:
        stages.update({name: mask.any(-1).sum().float() for name, mask in after.items()})

    cand_ids = _compact(base_ids, keep, k, fill=-1)
    cand_logprobs = _compact(logprobs, keep, k, fill=-math.inf)
    return cand_ids, cand_logprobs


def at_base_positions(topk_ids: Tensor, topk_logprobs: Tensor, guide_index: Tensor) -> tuple[Tensor, Tensor]:
    """Surrogate-position top-k [B, S, K'] -> base-position top-k [B, T, K'] (docs/method.md §2b).

    Base position t takes surrogate position guide_index[b, t]; rows with guide_index < 0 are empty
    (ids -1, log-probs -inf). A gather: static shapes.
    """
    index = guide_index.to(topk_ids.device).long()
    unguided = (index < 0).unsqueeze(-1)
    index = index.clamp(min=0).unsqueeze(-1).expand(-1, -1, topk_ids.shape[-1])
    ids = topk_ids.gather(1, index).masked_fill(unguided, -1)
    logprobs = topk_logprobs.gather(1, index).masked_fill(unguided, -math.inf)
    return ids, logprobs


class SurrogateInputs:
    """A DataLoader ``collate_fn`` adding the byte-aligned surrogate input to each batch (docs/method.md §2b).

    Adds ``surrogate_ids`` and ``surrogate_mask`` [B, S] and ``guide_index`` [B, T]; runs in the
    loader's workers, off the training step (and outside any compiled graph).
    """

    def __init__(self, aligner: ByteAligner):
        self.aligner = aligner

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        batch = default_collate(rows)
        return {**batch, **self.of(batch["input_ids"])}

    def of(self, input_ids: Tensor) -> Batch:
        """The surrogate input of blocks input_ids [B, T] (for a batch some other collate_fn made)."""
        surrogate_ids, surrogate_mask, guide_index = self.aligner(input_ids)
        return {"surrogate_ids": surrogate_ids, "surrogate_mask": surrogate_mask, "guide_index": guide_index}

    def measure(self, input_ids: Tensor, labels: Tensor) -> dict[str, float]:
        """Guided and truncated shares of the labelled positions of some blocks, and base tokens/s of the alignment."""
        started = time.perf_counter()
        counts = self.aligner.align(input_ids).counts(labels)
        seconds = time.perf_counter() - started
        return {"guided_share": counts.guided_share, "truncated_share": counts.truncated_share,
                "tokens_per_s": input_ids.numel() / max(seconds, 1e-9)}


# select_candidates' stages, in order: labelled positions keeping at least one id after each rule.
CANDIDATE_STAGES = ("labelled", "proposed", "permitted", "above_threshold", "kept")


def topk_request(k: int, threshold: float, loss_type: str) -> tuple[int, float | None]:
    """What a Guide asks the surrogate for: (slots per position, log-prob floor or None), docs/method.md §3.

    surrogate: k + 1 (the target may be among them and is dropped) at or above log(threshold);
    kl: k, with the target kept and no floor.
    """
    if loss_type != "surrogate":
        return k, None
    return k + 1, (math.log(threshold) if threshold > 0 else None)


def placeholder_id(spec: VocabularySpec) -> int:
    """The surrogate id put where a base token has no surrogate match (it is masked anyway)."""
    for role in ("pad", "eos", "unk", "bos"):
        if role in spec.special_tokens:
            return spec.special_tokens[role]
    return 0


class Guide:
    """Computes ``(cand_ids, cand_logprobs)`` [B,T,k] for a micro-batch (docs/method.md §2-§3)."""

    def __init__(
        self,
        source: SurrogateSource,
        alignment: VocabAlignment,
        *,
        k: int,
        threshold: float,
        loss_type: str,
        placeholder: int = 0,
        on_failure: str = "fail",
        inputs: SurrogateInputs | None = None,
        document_end: int | None = None,
    ):
        """``document_end``: the base id that ends a document (EOS) when attention stays within documents
        (data.document_mask): the surrogate then reads each document on its own too."""
        self.source = source
        self.alignment = alignment
        self.inputs = inputs  # the training loader's collate_fn with alignment: bytes; None for tokens
        self.k = k
        self.exclude_target = loss_type == "surrogate"
        # kl keeps the target and applies no threshold (docs/method.md §3).
        self.threshold = threshold if self.exclude_target else 0.0
        self.request_k, self.logprob_floor = topk_request(k, threshold, loss_type)
        self.placeholder = placeholder
        self.on_failure = on_failure
        self.unguided_batches = 0  # batches trained on CE alone because the surrogate was unavailable
        self._guided_since_skip = True
        self.wait_seconds = 0.0  # time guided_batches' caller blocked on guidance (not on data), cumulative
        self._count_lock = threading.Lock()
        self._on_device: dict[torch.device, VocabAlignment] = {}
        self.document_end = document_end
        # With byte alignment a base EOS reaches the surrogate as its partner token (align_vocabularies' pairing).
        self.surrogate_document_end = None
        if document_end is not None and inputs is not None:
            partner = int(alignment.base_to_surrogate[document_end])
            if partner < 0:
                raise ValueError("data.document_mask needs the base's EOS to have a surrogate counterpart (none "
                                 "maps): turn document_mask off, or use surrogate.alignment tokens")
            self.surrogate_document_end = partner

    def _alignment_on(self, device: torch.device) -> VocabAlignment:
        if device not in self._on_device:
            self._on_device[device] = self.alignment.to(device)
        return self._on_device[device]

    def __call__(self, batch: Batch, stages: dict[str, Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's candidates: cand_ids [B,T,k] long, cand_logprobs [B,T,k] float32 (on the source's device).

        Byte-aligned when the batch carries ``guide_index`` (from ``SurrogateInputs``), else id by id.
        ``stages``: filled as ``select_candidates`` fills it.
        """
        here = self._alignment_on(batch["input_ids"].device)
        if "guide_index" in batch:
            s_ids, s_mask = batch["surrogate_ids"], batch["surrogate_mask"]
        else:
            s_ids, s_mask = surrogate_inputs(batch["input_ids"], here, self.placeholder)
        positions = None
        if self.document_end is not None:  # the surrogate's positions restart with each document, as the base's
            if "guide_index" in batch:  # its own tokenization: documents end at the EOS's partner
                ends = s_ids == self.surrogate_document_end
            else:  # id by id: position for position
                ends = batch["input_ids"] == self.document_end
            positions = document_positions(s_ids, ends)
        top = self.source.topk(s_ids, s_mask, self.request_k, here.permitted, self.logprob_floor, position_ids=positions)
        top_ids, top_logprobs = top.ids, top.logprobs
        if "guide_index" in batch:
            top_ids, top_logprobs = at_base_positions(top_ids, top_logprobs, batch["guide_index"])
        alignment = self._alignment_on(top_ids.device)
        return select_candidates(
            top_ids,
            top_logprobs,
            batch["labels"].to(top_ids.device),
            alignment,
            self.k,
            self.threshold,
            exclude_target=self.exclude_target,
            stages=stages,
        )

    def attach(self, batch: Batch) -> Batch:
        """The batch with its candidates; empty candidates (CE alone) when the surrogate is down and on_failure is skip."""
        stages: dict[str, Tensor] = {}
        try:
            cand_ids, cand_logprobs = self(batch, stages)
            self._guided_since_skip = True
        except SurrogateUnavailable as err:
            if self.on_failure != "skip":
                raise
            with self._count_lock:  # the prefetch threads attach concurrently
                self.unguided_batches += 1
                skipped, first, self._guided_since_skip = self.unguided_batches, self._guided_since_skip, False
            # Once per outage (the first skip after a guided batch); the count is in every logged step.
            log.log(logging.WARNING if first else logging.DEBUG,
                    "surrogate unavailable: training on cross-entropy alone until it answers (%d batches so far): %s",
                    skipped, err)
            shape = (*batch["labels"].shape, self.k)
            cand_ids = torch.full(shape, -1, dtype=torch.long)
            cand_logprobs = torch.full(shape, float("-inf"), dtype=torch.float32)
            return {**batch, "cand_ids": cand_ids, "cand_logprobs": cand_logprobs}
        counts = torch.stack([stages[name] for name in CANDIDATE_STAGES])
        return {**batch, "cand_ids": cand_ids, "cand_logprobs": cand_logprobs, "candidate_stages": counts}


def guided_batches(batches: Iterable[Batch], guide: Guide | None, prefetch_depth: int = 0) -> Iterator[Batch]:
    """Yield the batches with guidance attached, computed up to ``prefetch_depth`` batches ahead.

    With ``prefetch_depth == 0`` guidance is computed inline, right before the
    batch is yielded; otherwise ``prefetch_depth`` background threads request the
    next batches' guidance concurrently (several servers, or one server's batcher,
    work on them at once) while the caller trains on the current one. Order is
    always preserved. Closing the generator (or an error) cancels what has not
    started; requests already in flight end on their own, within the source's timeout.
    """
    if guide is None:
        yield from batches
        return
    if prefetch_depth == 0:
        for batch in batches:
            started = time.perf_counter()
            guided = guide.attach(batch)
            guide.wait_seconds += time.perf_counter() - started
            yield guided
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=prefetch_depth, thread_name_prefix="guidance")
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        for batch in batches:
            pending.append(pool.submit(guide.attach, batch))
            if len(pending) > prefetch_depth:
                yield _result(pending.popleft(), guide)
        while pending:
            yield _result(pending.popleft(), guide)
    finally:
        # Not wait=True: after the last step the trainer must not wait for guidance it will never use.
        pool.shutdown(wait=False, cancel_futures=True)


def _result(future: concurrent.futures.Future, guide: Guide) -> Batch:
    """The future's batch, counting the time spent blocked on it in ``guide.wait_seconds``."""
    started = time.perf_counter()
    try:
        return future.result()
    finally:
        guide.wait_seconds += time.perf_counter() - started
