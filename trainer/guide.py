"""Guidance for training batches: surrogate top-k in, fixed-size base-id candidates out.

A *source* is anything with ``topk(input_ids, attention_mask, k, permitted,
logprob_floor) -> TopK``: the in-process ``SurrogateEngine`` or a remote client of
the surrogate server. ``Guide`` runs SDCE.md §2-§3 around it: map base ids to
surrogate ids, ask for the top k (+1 so the target can be dropped), select the
candidates. ``guided_batches`` attaches them to each micro-batch, optionally
requesting a few micro-batches ahead in a background thread.
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

from trainer.guidance import select_candidates, surrogate_inputs
from surrogate_server.vocabulary import VocabularySpec
from trainer.alignment import VocabAlignment

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class SurrogateUnavailable(RuntimeError):
    """The surrogate could not answer in time (a remote server down past its retry deadline)."""


class SurrogateSource(Protocol):
    def topk(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        k: int,
        permitted: torch.Tensor | None = None,
        logprob_floor: float | None = None,
    ) -> Any: ...


def placeholder_id(spec: VocabularySpec) -> int:
    """The surrogate id put where a base token has no surrogate match (it is masked anyway)."""
    for role in ("pad", "eos", "unk", "bos"):
        if role in spec.special_tokens:
            return spec.special_tokens[role]
    return 0


class Guide:
    """Computes ``(cand_ids, cand_logprobs)`` [B,T,k] for a micro-batch (SDCE.md §2-§3)."""

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
    ):
        self.source = source
        self.alignment = alignment
        self.k = k
        self.exclude_target = loss_type == "surrogate"
        # kl keeps the target and applies no threshold (SDCE.md §3).
        self.threshold = threshold if self.exclude_target else 0.0
        self.request_k = k + 1 if self.exclude_target else k
        self.logprob_floor = math.log(self.threshold) if self.threshold > 0 else None
        self.placeholder = placeholder
        self.on_failure = on_failure
        self.unguided_batches = 0  # batches trained on CE alone because the surrogate was unavailable
        self.wait_seconds = 0.0  # time guided_batches' caller blocked on guidance (not on data), cumulative
        self._count_lock = threading.Lock()
        self._on_device: dict[torch.device, VocabAlignment] = {}

    def _alignment_on(self, device: torch.device) -> VocabAlignment:
        if device not in self._on_device:
            self._on_device[device] = self.alignment.to(device)
        return self._on_device[device]

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, labels [B,T] -> cand_ids [B,T,k] long, cand_logprobs [B,T,k] float32 (on the source's device)."""
        here = self._alignment_on(input_ids.device)
        s_ids, s_mask = surrogate_inputs(input_ids, here, self.placeholder)
        top = self.source.topk(s_ids, s_mask, self.request_k, here.permitted, self.logprob_floor)
        alignment = self._alignment_on(top.ids.device)
        return select_candidates(
            top.ids,
            top.logprobs,
            labels.to(top.ids.device),
            alignment,
            self.k,
            self.threshold,
            exclude_target=self.exclude_target,
        )

    def attach(self, batch: Batch) -> Batch:
        """The batch with its candidates; empty candidates (CE alone) when the surrogate is down and on_failure is skip."""
        try:
            cand_ids, cand_logprobs = self(batch["input_ids"], batch["labels"])
        except SurrogateUnavailable as err:
            if self.on_failure != "skip":
                raise
            with self._count_lock:  # the prefetch threads attach concurrently
                self.unguided_batches += 1
                skipped = self.unguided_batches
            log.warning("surrogate unavailable: training this batch on cross-entropy alone (%d so far): %s",
                        skipped, err)
            shape = (*batch["labels"].shape, self.k)
            cand_ids = torch.full(shape, -1, dtype=torch.long)
            cand_logprobs = torch.full(shape, float("-inf"), dtype=torch.float32)
        return {**batch, "cand_ids": cand_ids, "cand_logprobs": cand_logprobs}


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
