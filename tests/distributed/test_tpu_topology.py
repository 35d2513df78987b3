"""What cannot run here (TPU hosts and pods) is decided by pure logic: environment and flags in,
a topology or a clear error out; the runtime's answers checked against it. No torch_xla needed."""

import logging

import pytest

from trainer.config import build_config
from trainer.xla import MAX_DATALOADER_WORKERS, TpuTopology, check_runtime, dataloader_workers, resolve_topology

POD = {"PJRT_DEVICE": "TPU", "TPU_PROCESS_COUNT": "4", "TPU_PROCESS_ID": "2"}


def tpu(**training):
    """The training section of a --device tpu config (validation only: nothing is loaded)."""
    config = {"training": {"device": "tpu", **training}, "data": {"train_file": "x.txt"}, "surrogate": {"endpoint": "localhost:1"}}
    return build_config(config).training


def test_single_host_readme_command():
    topology = resolve_topology(tpu(tpu_cores=8, mixed_precision="bf16"), {})
    assert topology == TpuTopology("TPU", num_hosts=1, host_index=0, cores_per_host=8)  # PJRT_DEVICE defaults to TPU
    assert not topology.single_process


def test_pod_readme_command_on_host_two_of_four():
    topology = resolve_topology(tpu(tpu_cores=8, tpu_num_hosts=4), POD)
    assert (topology.num_hosts, topology.host_index, topology.cores_per_host) == (4, 2, 8)


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({**POD, "TPU_PROCESS_COUNT": "2"}, {"tpu_num_hosts": 4}, "TPU_PROCESS_COUNT=2 but --tpu_num_hosts 4"),
        ({**POD, "TPU_PROCESS_ID": "4"}, {"tpu_num_hosts": 4}, "TPU_PROCESS_ID=4 is out of range for 4 hosts"),
        ({**POD, "TPU_PROCESS_ID": "two"}, {"tpu_num_hosts": 4}, "TPU_PROCESS_ID='two' is not an integer"),
        ({"PJRT_DEVICE": "TPU"}, {"tpu_num_hosts": 4}, "set TPU_PROCESS_COUNT=4 and TPU_PROCESS_ID=<0..3>"),
        (POD, {}, "TPU_PROCESS_COUNT=4 says this is a pod of 4 hosts: pass --tpu_num_hosts 4"),
        ({**POD, "PJRT_DEVICE": "CPU"}, {"tpu_num_hosts": 4}, "needs PJRT_DEVICE=TPU on every host"),
        ({"PJRT_DEVICE": "CUDA"}, {}, "use --device cuda for GPUs"),
        ({}, {"tpu_cores": 0}, "--tpu_cores must be at least 1"),
        ({}, {"tpu_num_hosts": 0}, "--tpu_num_hosts must be at least 1"),
    ],
)
def test_inconsistent_environment_is_a_clear_error(env, flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
        resolve_topology(tpu(**flags), env)


def test_cpu_lane_and_one_chip_run_in_one_process():
    assert resolve_topology(tpu(tpu_cores=8), {"PJRT_DEVICE": "CPU"}).single_process  # the XLA test lane
    assert resolve_topology(tpu(tpu_cores=1), {}).single_process


@pytest.mark.parametrize(
    "cores, local_devices, per_device",
    [(8, 8, 1), (None, 8, 1), (8, 4, 2), (4, 4, 2)],  # v3-8: 8 devices; v4-8: 4 megacore devices = 8 TensorCores
)
def test_runtime_matching_the_request_passes(cores, local_devices, per_device):
    topology = TpuTopology("TPU", 1, 0, cores)
    check_runtime(topology, world_size=local_devices, local_devices=local_devices, cores_per_device=per_device)


def test_pod_world_is_hosts_times_local_devices():
    topology = resolve_topology(tpu(tpu_cores=4, tpu_num_hosts=4), POD)
    check_runtime(topology, world_size=16, local_devices=4, cores_per_device=2)  # v4-32: 4 hosts x 4 chips
    with pytest.raises(ValueError, match="reports 4 devices in all, but 4 host\\(s\\) x 4 devices = 16"):
        check_runtime(topology, world_size=4, local_devices=4, cores_per_device=2)  # the other hosts never joined


def test_wrong_core_count_names_the_right_one():
    with pytest.raises(ValueError, match="--tpu_cores 8, but this host has 4 XLA devices: pass --tpu_cores 4"):
        check_runtime(TpuTopology("TPU", 1, 0, 8), world_size=4, local_devices=4, cores_per_device=1)  # v5e-4
    with pytest.raises(ValueError, match="one training process was planned"):
        check_runtime(TpuTopology("TPU", 1, 0, 1), world_size=4, local_devices=4)


def test_dataloader_workers_are_capped_with_a_warning(caplog):
    assert dataloader_workers(1) == 1
    with caplog.at_level(logging.WARNING, logger="trainer.xla"):
        assert dataloader_workers(8) == MAX_DATALOADER_WORKERS == 2
    assert "dataloader_num_workers=8" in caplog.text


def test_fp16_on_tpu_is_refused():
    with pytest.raises(ValueError, match="TPUs have no fp16"):
        tpu(mixed_precision="fp16")
