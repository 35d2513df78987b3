"""The PyTorch/XLA backend (Cloud TPU, and XLA:CPU for tests): the only module that imports torch_xla.

``--device tpu`` makes the trainer use this module's ``launch`` (start one process per
chip) and ``init_backend`` (in each of them) instead of ``trainer.device``'s.

Processes: PJRT runs one process per TPU chip (``torch_xla.launch``; on v2/v3 each
process drives the chip's two cores with two threads, on v4/v5p a chip is one
"megacore" device). ``--tpu_cores`` counts XLA devices per host, or TensorCores
on megacore chips, so the original ``--tpu_cores 8`` means all of a v3-8 (8
devices) and all of a v4-8 (4 devices, 8 TensorCores); leave it out for "all",
``--tpu_cores 1`` runs one process on one chip. A pod slice runs the same command
on every host with ``PJRT_DEVICE=TPU``, ``TPU_PROCESS_COUNT`` (= ``--tpu_num_hosts``)
and ``TPU_PROCESS_ID`` (this host's index); ``resolve_topology`` checks them and
``check_runtime`` checks what the runtime then reports (torch_xla itself learns the
worker layout from the TPU VM's metadata). With ``PJRT_DEVICE=CPU`` (the test lane)
everything runs in one process on the host CPU and ``--tpu_cores`` is ignored.

Inside a step nothing reads a value back to the host: counts, the grad norm and
the loss stay device tensors (``MetricWindow`` reads them at logging steps),
gradients are all-reduced with ``xm.reduce_gradients`` before clipping, and the
step ends with ``torch_xla.sync()``. Batches reach the device through
``ParallelLoader`` (host-to-device copies overlap the step). ``xla_compiles`` in
the logged metrics is torch_xla's CompileTime count: flat after warm-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from trainer.config import TrainingConfig
from trainer.device import Backend

log = logging.getLogger(__name__)

MAX_DATALOADER_WORKERS = 2  # more host processes starve the TPU host's CPU and memory
PJRT_DEVICES = ("TPU", "CPU")  # CPU: XLA on the host, for tests without a TPU


# -- topology: pure logic, tested without torch_xla ---------------------------------------
@dataclass(frozen=True)
class TpuTopology:
    """What the command line and the environment say the job should look like."""

    pjrt_device: str
    num_hosts: int
    host_index: int
    cores_per_host: int | None  # None: all the host has

    @property
    def single_process(self) -> bool:
        """One process: XLA on the CPU (tests), or --tpu_cores 1 on one host."""
        return self.pjrt_device == "CPU" or (self.num_hosts == 1 and self.cores_per_host == 1)


def resolve_topology(cfg: TrainingConfig, env: Mapping[str, str]) -> TpuTopology:
    """Check --tpu_cores / --tpu_num_hosts against PJRT_DEVICE, TPU_PROCESS_COUNT and TPU_PROCESS_ID."""
    pjrt = env.get("PJRT_DEVICE", "TPU").upper()
    if pjrt not in PJRT_DEVICES:
        raise ValueError(
            f"--device tpu runs on PJRT_DEVICE=TPU (or CPU for tests), but PJRT_DEVICE={pjrt}: "
            "unset it, or use --device cuda for GPUs"
        )
    if cfg.tpu_cores is not None and cfg.tpu_cores < 1:
        raise ValueError(f"--tpu_cores must be at least 1 (or left out for all of the host's), got {cfg.tpu_cores}")
    hosts = cfg.tpu_num_hosts
    if hosts < 1:
        raise ValueError(f"--tpu_num_hosts must be at least 1, got {hosts}")
    count, index = env.get("TPU_PROCESS_COUNT"), env.get("TPU_PROCESS_ID")
    if hosts == 1:
        if count not in (None, "", "1"):
            raise ValueError(f"TPU_PROCESS_COUNT={count} says this is a pod of {count} hosts: pass --tpu_num_hosts {count}")
        return TpuTopology(pjrt, 1, 0, cfg.tpu_cores)
    if pjrt != "TPU":
        raise ValueError(f"--tpu_num_hosts {hosts} needs PJRT_DEVICE=TPU on every host, not {pjrt}")
    if count is None or index is None:
        raise ValueError(
            f"--tpu_num_hosts {hosts}: set TPU_PROCESS_COUNT={hosts} and TPU_PROCESS_ID=<0..{hosts - 1}> "
            "(this host's index) on every host"
        )
    if _int(count, "TPU_PROCESS_COUNT") != hosts:
        raise ValueError(f"TPU_PROCESS_COUNT={count} but --tpu_num_hosts {hosts}: they must agree")
    host = _int(index, "TPU_PROCESS_ID")
    if not 0 <= host < hosts:
        raise ValueError(f"TPU_PROCESS_ID={index} is out of range for {hosts} hosts (0..{hosts - 1})")
    return TpuTopology(pjrt, hosts, host, cfg.tpu_cores)


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def check_runtime(topology: TpuTopology, *, world_size: int, local_devices: int, cores_per_device: int = 1) -> None:
    """Compare what the PJRT runtime reports in a training process with what was asked for."""
    if topology.single_process:
        if world_size != 1:
            raise ValueError(f"one training process was planned, but the XLA runtime reports {world_size} replicas")
        return
    wanted = topology.cores_per_host
    if wanted is not None and wanted not in (local_devices, local_devices * cores_per_device):
        per_device = f" ({cores_per_device} TensorCores each)" if cores_per_device > 1 else ""
        raise ValueError(
            f"--tpu_cores {wanted}, but this host has {local_devices} XLA devices{per_device}: "
            f"pass --tpu_cores {local_devices}, leave it out to use them all, or 1 for a single chip"
        )
    expected = topology.num_hosts * local_devices
    if world_size != expected:
        raise ValueError(
            f"the XLA runtime reports {world_size} devices in all, but {topology.num_hosts} host(s) x "
            f"{local_devices} devices = {expected}: start the same command on every host of the slice, "
            "with TPU_PROCESS_COUNT and --tpu_num_hosts equal to its host count"
        )


def dataloader_workers(requested: int) -> int:
    """At most MAX_DATALOADER_WORKERS worker processes per TPU process (clamped, with a warning)."""
    if requested > MAX_DATALOADER_WORKERS:
        log.warning(
            "dataloader_num_workers=%d is more than a TPU host can feed well; using %d",
            requested, MAX_DATALOADER_WORKERS,
        )
        return MAX_DATALOADER_WORKERS
    return requested


# -- processes -------------------------------------------------------------------------
def launch(cfg: TrainingConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in one process per local TPU chip (or in this process for one chip).

    Returns fn's result when it ran in this process, None after a multi-process run.
    """
    topology = resolve_topology(cfg, os.environ)
    os.environ["PJRT_DEVICE"] = topology.pjrt_device  # before torch_xla reads it
    if topology.single_process:
        if topology.pjrt_device == "TPU":
            for name, value in (("TPU_VISIBLE_CHIPS", "0"), ("TPU_CHIPS_PER_PROCESS_BOUNDS", "1,1,1"), ("TPU_PROCESS_BOUNDS", "1,1,1")):
                os.environ.setdefault(name, value)
        return fn(*args)
    import torch_xla

    torch_xla.launch(_process_main, args=(fn, *args))
    return None


def _process_main(index: int, fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


def init_backend(cfg: TrainingConfig) -> "XlaBackend":
    """The backend of this training process (called inside each launched process)."""
    topology = resolve_topology(cfg, os.environ)
    import torch_xla
    import torch_xla.runtime as xr

    backend = XlaBackend(
        torch_xla.device(), xr.global_ordinal(), xr.world_size(), xr.local_ordinal(), cfg.mixed_precision
    )
    check_runtime(
        topology, world_size=backend.world_size, local_devices=xr.local_device_count(),
        cores_per_device=_tensorcores_per_device(topology),
    )
    log.info("backend: %s (PJRT %s), rank %d of %d", backend.device, topology.pjrt_device, backend.rank, backend.world_size)
    return backend


def _tensorcores_per_device(topology: TpuTopology) -> int:
    """2 on megacore TPUs (v4, v5p), where one XLA device is a chip's two TensorCores; else 1."""
    if topology.pjrt_device != "TPU":
        return 1
    from torch_xla._internal import tpu

    with contextlib.suppress(Exception):  # no metadata server: megacore core counts go unrecognised
        return 2 if tpu.get_tpu_type() in ("v4", "v5p") else 1
    return 1


# -- the backend -----------------------------------------------------------------------
class XlaBackend(Backend):
    """torch_xla's device, collectives and step boundary behind ``Backend``, whose autocast and grad scaler serve:
    bf16 only (config rejects fp16 with --device tpu), so the scaler is off and scale/step/update never sync."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch_xla.core.xla_model as xm

            xm.all_reduce(xm.REDUCE_SUM, [tensor])  # the list form reduces in place
        return tensor

    def barrier(self, tag: str = "sdce") -> None:
        if self.distributed:
            import torch_xla.core.xla_model as xm

            xm.rendezvous(tag)

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over replicas (what DDP does in backward), before clipping sees them."""
        if self.distributed:
            import torch_xla.core.xla_model as xm

            xm.reduce_gradients(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        optimizer.step()  # gradients are already reduced: xm.optimizer_step would reduce them twice

    def mark_step(self) -> None:
        import torch_xla

        torch_xla.sync()

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model itself (no DDP: reduce_gradients does its job), its tied weights tied again.

        Moving to an XLA device gives every module a new Parameter, so GPT-2's lm_head and
        token embedding (one tensor on the CPU) become two: gradients, updates and memory
        would then differ from the CPU run.
        """
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model

    def host_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """CPU copies of the weights; tied weights stay one tensor so save_pretrained can tell."""
        return to_host(model.state_dict())

    def save(self, obj: object, path: str | os.PathLike) -> None:
        torch.save(to_host(obj), path)

    def step_scalar(self, value: float) -> torch.Tensor:
        """The value as its own device data, so every step's graph is the same whatever the value.

        A Python float would be a graph constant when XLA deems it special (0, 1) and a
        scalar made on the device a scalar op. A copied scalar goes through torch_xla's
        device-data cache, which hands equal values the same buffer: when the cosine
        schedule passes 0.5, lambda would share GELU's 0.5 and the graph lose an input
        (a recompilation). So this one copy bypasses the cache.
        """
        import torch_xla

        cached = torch_xla._XLAC._get_xla_enable_device_data_cache()
        torch_xla._XLAC._set_xla_enable_device_data_cache(False)
        try:
            return torch.tensor(value, dtype=torch.float32).to(self.device)
        finally:
            torch_xla._XLAC._set_xla_enable_device_data_cache(cached)

    def dataloader_workers(self, requested: int) -> int:
        return dataloader_workers(requested)

    def device_loader(self, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """Batches on the device, copied by ParallelLoader's threads while earlier steps run.

        Read with ``next_item`` rather than ``per_device_loader``, which syncs before every
        batch that no step boundary preceded (each extra micro-batch of a step) and drops
        errors raised while producing batches; here they reach the trainer in order.
        """
        import torch_xla.distributed.parallel_loader as pl

        errors: list[BaseException] = []
        source = _capture_errors(batches, errors)
        loader = pl.ParallelLoader(source, [self.device], loader_prefetch_size=4, device_prefetch_size=2)
        try:
            while (batch := loader.next_item(self.device)) is not None:
                yield batch
            if not loader._exception_queue.empty():  # a failed host-to-device copy
                raise loader._exception_queue.get()
            if errors:
                raise errors[0]
        finally:
            loader.close()
            source.close()

    def step_metrics(self) -> dict[str, float]:
        """torch_xla's counts so far: graph compilations (flat after warm-up, else something
        recompiles) and device-to-host transfers (they grow only where metrics are read)."""
        import torch_xla.debug.metrics as met

        counts = {}
        for key, metric in (("xla_compiles", "CompileTime"), ("xla_transfers_to_host", "TransferFromDeviceTime")):
            data = met.metric_data(metric)
            counts[key] = float(data[0] if data else 0)
        return counts


def _capture_errors(batches: Iterable[Any], errors: list[BaseException]) -> Iterator[Any]:
    """``batches``, ending early with the error (kept in ``errors``) where producing one fails."""
    try:
        yield from batches
    except Exception as err:  # e.g. SurrogateUnavailable from remote guidance, raised in the loader thread
        errors.append(err)


def to_host(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU; a tensor reached twice gives one copy."""
    copies: dict[int, torch.Tensor] = {}

    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = t.detach().to("cpu")
        return copies[id(t)]

    return torch.utils._pytree.tree_map_only(torch.Tensor, copy, obj)
