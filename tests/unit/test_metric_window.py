"""MetricWindow: what rank 0 logs is the job's, guidance statistics included.

Two ranks are two threads of this process, each with its own gloo process group over one
store: real collectives, in milliseconds (torchrun runs are tests/distributed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

from trainer.device import Backend
from trainer.train import MetricWindow


@dataclass
class GlooRank(Backend):
    """A Backend whose sums go through its own gloo group (a rank that is a thread)."""

    group: Any = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.group.allreduce([tensor]).wait()
        return tensor


def on_two_ranks(fn: Callable[[Backend], Any]) -> list[Any]:
    """fn(backend) on ranks 0 and 1 at once; their results."""
    store = dist.HashStore()
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            group = dist.ProcessGroupGloo(store, rank, 2)
            results[rank] = fn(GlooRank(torch.device("cpu"), rank, 2, group=group))
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


# What Trainer._guide_stats returns on each rank: the client's keys, some only on one rank.
RANK_STATS = [
    {"unguided_batches": 1.0, "guidance_requests": 3.0, "guidance_retries": 0.0, "guidance_failures": 1.0,
     "guidance_latency_ms_mean": 10.0, "guidance_latency_ms_p50": 9.0, "guidance_bytes_per_token": 40.0,
     "guidance_server_queue_ms": 1.0, "guidance_server_compute_ms": 5.0},
    {"unguided_batches": 2.0, "guidance_requests": 1.0, "guidance_retries": 4.0, "guidance_failures": 2.0,
     "guidance_latency_ms_mean": 30.0, "guidance_latency_ms_p50": 21.0, "guidance_bytes_per_token": 80.0,
     "guidance_server_queue_ms": 5.0, "guidance_server_compute_ms": 9.0, "guidance_reregistrations": 1.0},
]


def one_step(backend: Backend, stats: dict[str, float], seconds: float = 10.0) -> dict[str, float]:
    """A window of one step, rank r waiting 0.2 (r + 1) s on input and 0.1 (r + 1) s on guidance, over ``seconds``."""
    window = MetricWindow(backend)
    r = backend.rank
    parts = {"ce": torch.tensor(2.0 + r), "aux": torch.tensor(0.5), "guided_positions": torch.tensor(3.0)}
    window.add(torch.tensor(1.0 + r), parts, tokens=8)
    window.waited(0.2 * (r + 1), 0.1 * (r + 1))
    window.end_step(torch.tensor(1.5), 0.5, torch.tensor(4))
    window.started = time.perf_counter() - seconds
    return window.flush(stats, lr=1e-3, epoch=0.5)


def test_two_ranks_log_the_jobs_guidance_statistics():
    records = on_two_ranks(lambda backend: one_step(backend, RANK_STATS[backend.rank]))
    assert records[0] == pytest.approx(records[1], rel=1e-3)  # every rank computes the job's record
    record = records[0]
    # Counts add (guidance_reregistrations: only rank 1 has any).
    assert {k: record[k] for k in MetricWindow.GUIDANCE_COUNTS if k in record} == {
        "unguided_batches": 3.0, "guidance_requests": 4.0, "guidance_retries": 4.0, "guidance_failures": 3.0,
        "guidance_reregistrations": 1.0}
    # Means are weighted by requests: rank 0 asked 3 times, rank 1 once.
    assert record["guidance_latency_ms_mean"] == pytest.approx((3 * 10 + 30) / 4)
    assert record["guidance_latency_ms_p50"] == pytest.approx((3 * 9 + 21) / 4)
    assert record["guidance_bytes_per_token"] == pytest.approx((3 * 40 + 80) / 4)
    assert record["guidance_server_queue_ms"] == pytest.approx(2.0)
    assert record["guidance_server_compute_ms"] == pytest.approx(6.0)
    # Waits: a rank's mean share of the window; the other metrics as before.
    assert record["input_wait_share"] == pytest.approx((0.2 + 0.4) / 2 / 10, rel=1e-2)
    assert record["guidance_wait_share"] == pytest.approx((0.1 + 0.2) / 2 / 10, rel=1e-2)
    assert (record["loss"], record["ce"], record["grad_norm"], record["lambda"]) == pytest.approx((3.0, 5.0, 1.5, 0.5))
    assert record["guided_share"] == pytest.approx(6 / 8) and (record["lr"], record["epoch"]) == (1e-3, 0.5)


def test_one_process_logs_its_own_statistics_unchanged():
    backend = Backend(torch.device("cpu"))
    record = one_step(backend, RANK_STATS[1])
    assert {k: record[k] for k in RANK_STATS[1]} == pytest.approx(RANK_STATS[1])
    engine_stats = {"unguided_batches": 0.0, "guidance_requests": 2.0, "guidance_latency_ms_mean": 3.0}  # in-process
    record = one_step(backend, engine_stats)
    assert {k for k in record if k.startswith(("guidance_", "unguided"))} == {*engine_stats, "guidance_wait_share"}
    assert "guidance_requests" not in one_step(backend, {})  # standard training: no guidance keys


def test_a_rank_without_requests_does_not_dilute_the_means():
    stats = [RANK_STATS[0], {"unguided_batches": 5.0, "guidance_requests": 0.0, "guidance_retries": 0.0,
                             "guidance_failures": 5.0}]  # rank 1's server was down all window
    record = on_two_ranks(lambda backend: one_step(backend, stats[backend.rank]))[0]
    assert record["guidance_latency_ms_mean"] == pytest.approx(10.0) and record["unguided_batches"] == 6.0
    assert "guidance_reregistrations" not in record


def test_a_statistic_without_a_reduction_rule_is_a_bug():
    with pytest.raises(AssertionError, match="GUIDANCE_COUNTS or GUIDANCE_MEANS"):
        one_step(Backend(torch.device("cpu")), {"guidance_new_thing": 1.0})
