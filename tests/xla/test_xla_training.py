"""The trainer's XLA path on XLA:CPU: each loss type, parity with the eager CPU path, no
recompilation or host reads inside steps, cross-device checkpoints, the surrogate check."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from surrogate_server.process import ServerProcess

torch_xla = pytest.importorskip(
    "torch_xla", reason="XLA lane only: bash scripts/setup_xla_env.sh && .venv-xla/bin/python -m pytest tests/xla"
)

import torch  # noqa: E402

# Start the PJRT client before any backward pass: autograd sizes its per-device queues at the
# first backward, and the CPU runs below would otherwise leave none for the XLA device.
torch_xla.device()

from trainer.train import train  # noqa: E402

pytestmark = [pytest.mark.requires_xla, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
KEYS = ("loss", "ce", "surrogate_term", "grad_norm")


def _close(a: dict, b: dict, rel: float = 2e-3) -> None:
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-5), (key, a, b)


@pytest.mark.parametrize("loss_type", ["standard", "surrogate", "kl"])
def test_xla_trains_like_the_cpu_without_recompiling(make_config, tmp_path, loss_type):
    common = {"loss_type": loss_type, "max_steps": 6, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}
    cpu = train(make_config({"training": {**common, "device": "cpu"}}, tmp_path / "cpu"))
    xla = train(make_config({"training": {**common, "device": "tpu", "tpu_cores": 1}}, tmp_path / "xla"))
    assert [h["step"] for h in xla.history] == list(range(1, 7))
    for a, b in zip(cpu.history, xla.history):
        _close(a, b)
    assert xla.eval_loss == pytest.approx(cpu.eval_loss, rel=2e-3)
    compiles = [h["xla_compiles"] for h in xla.history]
    # Step 1 compiles its graph (with the optimizer's state set-up) and step 2 the steady one; then nothing new.
    assert compiles[1:] == [compiles[1]] * 5, compiles



@pytest.mark.parametrize("loss_type", ["standard", "surrogate"])
def test_steps_do_not_read_device_values(make_config, tmp_path, loss_type):
    """Device-to-host transfers happen at logging steps only: 4 steps between logs cost what 1 step does."""
    common = {"device": "tpu", "loss_type": loss_type}
    every = train(make_config({"training": {**common, "max_steps": 4, "logging_steps": 1}}, tmp_path / "a"))
    sparse = train(make_config({"training": {**common, "max_steps": 8, "logging_steps": 4}}, tmp_path / "b"))

    def per_log(history: list[dict]) -> float:
        return history[-1]["xla_transfers_to_host"] - history[-2]["xla_transfers_to_host"]

    assert per_log(sparse.history) == per_log(every.history) <= 2, (every.history, sparse.history)


@pytest.fixture
def surrogate_server(surrogate_dir):
    """``python -m surrogate_server`` on loopback (CPU), free ports; yields its gRPC address."""
    # The server runs plain torch on the CPU, not XLA.
    with ServerProcess(surrogate_dir, "--device", "cpu", "--log_level", "WARNING", cwd=ROOT, env={"PJRT_DEVICE": None}) as server:
        yield server.grpc


def test_remote_guidance_arrives_through_the_device_loader(make_config, tmp_path, surrogate_server):
    """The recommended TPU set-up: guidance from a server, attached on the host, uploaded with its batch.
    Same losses as the CPU path, no recompilation, no device reads inside steps."""
    common = {"loss_type": "surrogate", "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}
    surrogate = {"endpoint": surrogate_server, "name_or_path": None}
    cpu = train(make_config({"training": {**common, "device": "cpu", "max_steps": 4}, "surrogate": surrogate}, tmp_path / "cpu"))
    every = train(make_config({"training": {**common, "device": "tpu", "max_steps": 4}, "surrogate": surrogate}, tmp_path / "a"))
    sparse = train(make_config(
        {"training": {**common, "device": "tpu", "max_steps": 8, "logging_steps": 4}, "surrogate": surrogate}, tmp_path / "b"
    ))
    for a, b in zip(cpu.history, every.history):
        _close(a, b)
    assert all(h["guided_share"] > 0 and h["unguided_batches"] == 0 for h in every.history)
    compiles = [h["xla_compiles"] for h in every.history]
    assert compiles[1:] == [compiles[1]] * 3, compiles
    assert sparse.history[-1]["xla_compiles"] == sparse.history[0]["xla_compiles"]  # steps 5-8: nothing new
    per_log = [h[-1]["xla_transfers_to_host"] - h[-2]["xla_transfers_to_host"] for h in (every.history, sparse.history)]
    assert per_log[0] == per_log[1] <= 2, per_log


def test_checkpoints_move_between_xla_and_cpu(make_config, tmp_path):
    common = {"loss_type": "surrogate", "max_steps": 4, "save_steps": 2, "save_total_limit": None}
    runs = {dev: train(make_config({"training": {**common, "device": dev}}, tmp_path / dev)) for dev in ("cpu", "tpu")}
    for saved_on, resumed_on in (("tpu", "cpu"), ("cpu", "tpu")):
        out = tmp_path / f"{saved_on}-to-{resumed_on}"
        shutil.copytree(tmp_path / saved_on / "checkpoint-2", out / "checkpoint-2")
        resumed = train(make_config(
            {"training": {**common, "device": resumed_on, "resume_from_checkpoint": "latest"}}, out
        ))
        assert [h["step"] for h in resumed.history] == [3, 4]
        for a, b in zip(runs[saved_on].history[2:], resumed.history):
            _close(a, b)


def test_local_surrogate_is_validated_before_it_moves(surrogate_dir):
    from surrogate_server.engine import SurrogateEngine

    device = torch_xla.device()
    moved = SurrogateEngine.from_pretrained(str(surrogate_dir), device=device)
    assert moved.device.type == "xla" and moved.lazy
    broken = SurrogateEngine.from_pretrained(str(surrogate_dir), device="cpu")
    with torch.no_grad():
        next(broken.model.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        broken.to(device)


def test_readme_single_host_command_runs(base_dir, surrogate_dir, train_file, tmp_path):
    """The original README's TPU command (bf16, --tpu_cores 8), on XLA:CPU, where one process stands in for the host."""
    out = tmp_path / "readme"
    cmd = [
        sys.executable, "train.py", "--device", "tpu", "--tpu_cores", "8", "--base_model", str(base_dir),
        "--surrogate_model", str(surrogate_dir), "--mixed_precision", "bf16", "--train_file", str(train_file),
        "--max_seq_length", "32", "--batch_size", "2", "--max_steps", "3", "--logging_steps", "1",
        "--surrogate_k", "4", "--dataloader_num_workers", "4", "--save_steps", "3", "--output_dir", str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using 2" in done.stderr  # the dataloader workers are capped on TPU
    assert "surrogate validated for xla" in done.stderr
    assert (out / "checkpoint-3" / "model.safetensors").is_file()


def test_xla_trains_from_a_stream(make_config, train_file, tmp_path):
    """--streaming on XLA: blocks tokenised in the loader, through the device loader; the same steps as on the CPU."""
    common = {"loss_type": "surrogate", "max_steps": 4, "per_device_train_batch_size": 2}
    data = {"streaming": True, "stream_batch_documents": 16}
    cpu = train(make_config({"data": data, "training": {**common, "device": "cpu"}}, tmp_path / "cpu"))
    xla = train(make_config({"data": data, "training": {**common, "device": "tpu", "tpu_cores": 1}}, tmp_path / "xla"))
    assert [h["step"] for h in xla.history] == [1, 2, 3, 4]
    for a, b in zip(cpu.history, xla.history):
        _close(a, b)
    assert xla.history[-1]["tokens_seen"] == 4 * 2 * 32
