"""deploy/: the TPU setup script is valid bash and writes a config train.py accepts."""

import subprocess
from pathlib import Path

import yaml

from trainer.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "setup_tpu_training.sh"


def test_setup_script_parses_and_prints_usage():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2
    for command in ("setup", "resume", "status", "monitor", "logs", "ssh", "stop", "cleanup"):
        assert f"setup_tpu_training.sh {command}" in usage.stdout


def test_setup_script_config_is_a_valid_tpu_v4_32_run(tmp_path):
    path = tmp_path / "config_tinyllama_tpuv4.yaml"
    subprocess.run(["bash", str(SCRIPT), "config"], env={"CONFIG_FILE": str(path), "PATH": "/usr/bin:/bin"}, check=True)
    cfg = parse_args(["--config", str(path)])
    assert cfg.training.device == "tpu" and cfg.training.mixed_precision == "bf16"
    assert (cfg.training.tpu_cores, cfg.training.tpu_num_hosts) == (8, 4)
    assert cfg.training.per_device_train_batch_size * 32 * cfg.training.gradient_accumulation_steps == 1024
    assert cfg.data.max_seq_length == 2048 and cfg.surrogate.name_or_path == "Qwen/Qwen2.5-1.5B"


def test_compose_and_kubernetes_files_are_valid_yaml():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert {"surrogate", "trainer"} <= set(compose["services"])
    assert "--surrogate_endpoint=surrogate:50051" in compose["services"]["trainer"]["command"]
    kinds = [doc["kind"] for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "surrogate-server.yaml").read_text())]
    assert kinds == ["Deployment", "Service"]
