"""The device seam: everything that differs between CPU, CUDA, MPS and XLA lives behind ``Backend``.

The trainer picks the platform module once at start-up (``trainer.train.platform``):
this one (CPU, CUDA, MPS, under torchrun or not) or ``trainer.xla`` (``--device tpu``).
Both offer ``launch(cfg, fn, *args)`` and ``init_backend(cfg) -> Backend``; after that the
trainer only talks to the Backend: where tensors go, how autocast is entered, how
counts are summed across ranks, how the optimizer steps. Backends know devices,
collectives and data placement, nothing of guidance. ``import torch_xla`` happens only
in ``trainer.xla``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from surrogate_server.source import TORCH_DTYPES
from trainer.config import MIXED_PRECISION_DTYPES, TrainingConfig

log = logging.getLogger(__name__)


@dataclass
class Backend:
    """Where this process trains and how it talks to its peers."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mixed_precision: str = "no"

    @property
    def kind(self) -> str:
        return self.device.type

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the forward pass, or nothing when mixed_precision is 'no'."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=TORCH_DTYPES[MIXED_PRECISION_DTYPES[self.mixed_precision]])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.mixed_precision == "fp16")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (in place; returns it). No host sync."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over ranks before clipping; DDP already did it during backward."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        scaler.step(optimizer)
        scaler.update()

    def mark_step(self) -> None:
        """End of a traced step (XLA); nothing elsewhere."""

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel when there are several ranks."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on every micro-batch but the last of a step."""
        if self.distributed and not last_micro_batch and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def host_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The state dict save_pretrained should write; None lets it take the model's own."""
        return None

    def save(self, obj: object, path: str | os.PathLike) -> None:
        """torch.save, from a device whose tensors may need moving to the host first."""
        torch.save(obj, path)

    def step_scalar(self, value: float) -> float | torch.Tensor:
        """A per-step value (the surrogate weight) as the step's graph should see it."""
        return value

    def dataloader_workers(self, requested: int) -> int:
        """DataLoader worker processes to use for ``requested`` (XLA caps them)."""
        return requested

    def device_loader(self, batches: Iterable[dict[str, torch.Tensor]]) -> Iterable[dict[str, torch.Tensor]]:
        """The batches, moved to the device ahead of use where the backend overlaps that (XLA)."""
        return batches

    def step_metrics(self) -> dict[str, float]:
        """Backend counters for the logged metrics (XLA: graph compilations)."""
        return {}

    def shutdown(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _torchrun_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when absent."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def launch(cfg: TrainingConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in this process (torchrun starts one per rank itself); returns its result."""
    return fn(*args)


def init_backend(cfg: TrainingConfig) -> Backend:
    """Pick the device, join the process group under torchrun, and return the Backend."""
    device = _auto_device() if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 mixed precision needs a CUDA GPU, not {device.type}: use --mixed_precision bf16 or no")
    rank, world_size, local_rank = _torchrun_env()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("backend: %s, rank %d of %d", device, rank, world_size)
    return Backend(device, rank, world_size, local_rank, cfg.mixed_precision)


@contextlib.contextmanager
def main_process_first(backend: Backend) -> Iterator[None]:
    """Let rank 0 do cached preparation (tokenisation, downloads) before the others reuse it."""
    if not backend.is_main:
        backend.barrier()
    yield
    if backend.is_main:
        backend.barrier()
