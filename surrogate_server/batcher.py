"""Dynamic batching for the surrogate server: many clients' requests, few forward passes.

A bounded queue of jobs, each holding an asyncio future. One loop task cuts forward
batches: it takes the oldest job's *bucket* (same permitted set, same sequence length
rounded up to ``length_bucket``) and waits until the bucket holds ``max_batch_tokens``
padded tokens or the oldest job has waited ``max_wait_ms``. It then runs one forward in a
worker thread (one forward at a time), padded to the longest job of the batch, with the
largest k of the batch, and splits the result back: each job gets its own rows, its own
length and its own first k slots. A batch that fails is retried job by
job, so an error lands only on the job that causes it. Requests that arrive during a
forward wait for the next one, so with ``max_wait_ms = 0`` batches still form under load.

    batcher = DynamicBatcher(engine.topk, BatcherConfig(max_batch_tokens=8192, max_wait_ms=5))
    result = await batcher.submit(Job.make(input_ids, attention_mask, k=31))
    result.logprobs, result.ids  # [B, T, k] on CPU, as engine.topk would return them
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from surrogate_server.config_cli import option
from surrogate_server.source import TopK

TopKFn = Callable[[Tensor, Tensor, int, "Tensor | None"], TopK]
"""engine.topk(input_ids [B, T], attention_mask [B, T], k, permitted) -> TopK."""


class QueueFull(Exception):
    """The batcher already holds ``max_queue`` waiting jobs (RESOURCE_EXHAUSTED at the edge)."""


class Closed(Exception):
    """The batcher is shutting down and takes no new jobs (UNAVAILABLE at the edge)."""


class BatchObserver(Protocol):
    """Receives batcher events (the server's Prometheus metrics)."""

    def observe_batch(self, requests: int, tokens: int, compute_s: float) -> None: ...

    def observe_queue_depth(self, depth: int) -> None: ...


@dataclass
class BatcherConfig:
    """How forward batches are cut (the options are also server CLI flags, section ``batcher``)."""

    max_batch_tokens: int = option(8192, "Padded tokens (rows x length) per forward; a larger request runs alone.")
    max_wait_ms: float = option(5.0, "How long the oldest waiting request may wait for others to join its forward.")
    max_queue: int = option(256, "Requests waiting for a forward; more are refused with RESOURCE_EXHAUSTED.")
    length_bucket: int = option(
        1, "Sequence lengths rounded up to a multiple of this share a forward (1: equal lengths only).")
    batching: bool = option(True, "Merge requests into shared forwards (off: one forward per request, a baseline).")

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_queue", "length_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass
class Result:
    """One job's answer: logprobs [B, T, k] float32 (-inf empty), ids [B, T, k] int64 (-1 empty), on CPU."""

    logprobs: Tensor
    ids: Tensor
    queue_ms: float
    compute_ms: float
    batch_requests: int
    batch_tokens: int


@dataclass
class Job:
    """One request waiting for its forward. Build with :meth:`make`."""

    input_ids: Tensor  # [B, T] int64, CPU
    attention_mask: Tensor  # [B, T] int64, CPU
    k: int
    permitted_key: str = ""  # the bucket key of `permitted`; "" = whole vocabulary
    permitted: Tensor | None = None  # bool [<= V]
    future: asyncio.Future[Result] | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    position_ids: Tensor | None = None  # [B, T] int64 (packed documents); None = 0..T-1

    @classmethod
    def make(cls, input_ids: Tensor, attention_mask: Tensor, k: int, permitted_key: str = "",
             permitted: Tensor | None = None, position_ids: Tensor | None = None) -> Job:
        positions = None if position_ids is None else position_ids.long()
        return cls(input_ids.long(), attention_mask.long(), k, permitted_key, permitted, position_ids=positions)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


class DynamicBatcher:
    """Merges concurrent jobs into forward batches; see the module docstring."""

    def __init__(self, topk: TopKFn, config: BatcherConfig | None = None,
                 observer: BatchObserver | None = None) -> None:
        self._topk = topk
        self.config = config or BatcherConfig()
        self._observer = observer
        self._pending: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdce-forward")

    async def submit(self, job: Job) -> Result:
        """Queue ``job`` and wait for its result; raises QueueFull, Closed or the forward's error."""
        if self._closing:
            raise Closed("the server is shutting down; send the request to another replica or retry later")
        if len(self._pending) >= self.config.max_queue:
            raise QueueFull(f"the request queue is full ({self.config.max_queue} requests waiting); "
                            "retry with backoff, or start the server with a larger --max_queue")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sdce-batcher")
        job.future = asyncio.get_running_loop().create_future()
        job.enqueued = time.perf_counter()
        self._pending.append(job)
        self._changed()
        return await job.future  # cancelling the caller cancels the future: the job is skipped

    async def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones (cut without waiting), stop the loop.

        Jobs still unfinished after ``timeout`` seconds fail with Closed.
        """
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
            for job in self._pending:
                if not job.future.done():
                    job.future.set_exception(Closed("the server shut down before this request ran"))
            self._pending.clear()
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._execute(batch)

    async def _next_batch(self) -> list[Job] | None:
        """Wait for the next batch to cut; None once closing and empty."""
        while True:
            while self._pending and self._pending[0].future.done():  # cancelled by its caller
                self._pending.popleft()
            if not self._pending:
                if self._closing:
                    return None
                await self._wait(None)
                continue
            oldest = self._pending[0]
            if not self.config.batching:
                return self._take([oldest])
            key = self._bucket(oldest)
            same = [job for job in self._pending if self._bucket(job) == key and not job.future.done()]
            remaining = oldest.enqueued + self.config.max_wait_ms / 1000 - time.perf_counter()
            tokens = sum(job.rows * self._padded_length(job) for job in same)
            if self._closing or remaining <= 0 or tokens >= self.config.max_batch_tokens:
                return self._take(self._fill(same))
            await self._wait(remaining)

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until a job arrives, close() is called, or ``timeout`` seconds pass."""
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass

    def _fill(self, candidates: list[Job]) -> list[Job]:
        """The longest prefix of ``candidates`` (oldest first) within max_batch_tokens; at least one job."""
        batch, tokens = [], 0
        for job in candidates:
            job_tokens = job.rows * self._padded_length(job)
            if batch and tokens + job_tokens > self.config.max_batch_tokens:
                break
            batch.append(job)
            tokens += job_tokens
        return batch

    def _take(self, batch: list[Job]) -> list[Job]:
        taken = {id(job) for job in batch}
        self._pending = deque(job for job in self._pending if id(job) not in taken)
        self._changed()
        return batch

    async def _execute(self, batch: list[Job]) -> None:
        """One forward for ``batch``; on failure, each job alone so only the failing one fails."""
        started = time.perf_counter()
        length = max(job.length for job in batch)  # the bucket bounds the padding; no more is needed
        k = max(job.k for job in batch)
        input_ids = torch.cat([F.pad(job.input_ids, (0, length - job.length)) for job in batch])
        attention_mask = torch.cat([F.pad(job.attention_mask, (0, length - job.length)) for job in batch])
        position_ids = None  # jobs without them get 0..T-1; the padding, masked anyway, counts on
        if any(job.position_ids is not None for job in batch):
            default = torch.arange(length)
            position_ids = torch.cat([default.expand(job.rows, -1) if job.position_ids is None
                                      else torch.cat([job.position_ids, default[job.length:].expand(job.rows, -1)], 1)
                                      for job in batch])
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._forward, input_ids, attention_mask, k, batch[0].permitted, position_ids)
        except Exception as err:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(err)
                return
            for job in batch:
                await self._execute([job])
            return
        compute_s = time.perf_counter() - started
        if self._observer is not None:
            self._observer.observe_batch(len(batch), input_ids.numel(), compute_s)
        row = 0
        for job in batch:
            logprobs = out.logprobs[row:row + job.rows, :job.length, :job.k]
            ids = out.ids[row:row + job.rows, :job.length, :job.k]
            row += job.rows
            if not job.future.done():
                job.future.set_result(Result(logprobs, ids, queue_ms=(started - job.enqueued) * 1000,
                                             compute_ms=compute_s * 1000, batch_requests=len(batch),
                                             batch_tokens=input_ids.numel()))

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, k: int, permitted: Tensor | None,
                 position_ids: Tensor | None = None) -> TopK:
        """In the worker thread: the engine call, results moved to CPU (synchronises the device)."""
        out = self._topk(input_ids, attention_mask, k, permitted, position_ids=position_ids)
        return TopK(logprobs=out.logprobs.cpu(), ids=out.ids.cpu())

    def _bucket(self, job: Job) -> tuple[str, int]:
        return job.permitted_key, self._padded_length(job)

    def _padded_length(self, job: Job) -> int:
        step = self.config.length_bucket
        return -(-job.length // step) * step

    def _changed(self) -> None:
        self._wakeup.set()
        if self._observer is not None:
            self._observer.observe_queue_depth(len(self._pending))
