"""deploy/: the TPU script, the images, the compose stack and the Kubernetes manifests, read as files.

What runs them for real: `make compose-test` (deploy/compose_test.py, a Docker engine) and
tests/integration/test_deploy_probes.py (the manifests' probes and ports against a server process).
"""

import fnmatch
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from surrogate_server.__main__ import parse_args as parse_server_args
from trainer.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPT = ROOT / "setup_tpu_training.sh"
TOKEN_IN_CONTAINER = "/run/secrets/sdce_token"
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())  # gRPC probes are GA from 1.27


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
    # A v4 chip is one XLA device (two TensorCores, megacore): --tpu_cores 8 is a host's 4 chips, a v4-32 16 devices.
    devices = cfg.training.tpu_cores // 2 * cfg.training.tpu_num_hosts
    assert devices == 16
    assert cfg.training.per_device_train_batch_size * devices * cfg.training.gradient_accumulation_steps == 1024
    assert "x 16 devices x 16 accumulation = 1024 sequences per step" in path.read_text()
    assert cfg.data.max_seq_length == 2048 and cfg.surrogate.name_or_path == "Qwen/Qwen2.5-1.5B"
    assert cfg.data.dataset_name == "cerebras/SlimPajama-627B" and cfg.data.streaming
    assert cfg.model.name_or_path.startswith("TinyLlama/TinyLlama-1.1B")
    assert cfg.training.max_steps * 1024 * 2048 == pytest.approx(627e9, rel=1e-3)  # one pass over the corpus


def test_setup_script_keeps_secrets_off_command_lines():
    """The W&B key travels in a 0600 file, never in an ssh command line (visible in ps on the workers)."""
    text = SCRIPT.read_text()
    remote_commands = [line for line in text.splitlines() if "tpu_ssh" in line or "--command" in line]
    assert remote_commands and not any("WANDB_API_KEY" in line for line in remote_commands)
    assert "umask 077" in text and ". ~/.sdce_secrets" in text


# -- images --------------------------------------------------------------------------------------
def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last matching pattern wins)."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_images_copy():
    for kept_out in (".venv/bin/python", ".venv-xla/x", ".cache/sdce-demo/a", ".git/HEAD", "outputs/run/x",
                     "tests/unit/test_deploy.py", "bench/bench_loss.py", "trainer/__pycache__/train.cpython-311.pyc",
                     "sdce_training.egg-info/PKG-INFO", "deploy/docker-compose.yml"):
        assert dockerignore_excludes(kept_out), kept_out
    for name in ("Dockerfile.server", "Dockerfile.trainer"):
        for instruction, args in dockerfile(name):
            if instruction == "COPY":
                *sources, _ = args.split()
                for source in sources:
                    assert (ROOT / source).exists() and not dockerignore_excludes(source), (name, source)


def makefile_torch_pin() -> str:
    return re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())[1]


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.trainer"])
def test_images_take_a_base_image_argument_and_run_as_a_user(name):
    steps = dockerfile(name)
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") and steps[1] == ("FROM", "${BASE_IMAGE}")
    args = dict(arg.split("=", 1) for instruction, arg in steps if instruction == "ARG")
    assert args["TORCH_VERSION"] == makefile_torch_pin()  # the version the tests run on
    users = [arg for instruction, arg in steps if instruction == "USER"]
    assert users == ["1000:1000"]
    assert any(instruction == "RUN" and "chown -R 1000:1000 /cache" in arg for instruction, arg in steps)


def test_server_image_needs_no_trainer_and_checks_readyz():
    steps = dockerfile("Dockerfile.server")
    copied = [arg.split()[0] for instruction, arg in steps if instruction == "COPY"]
    assert not any(source.startswith(("trainer", "train.py")) for source in copied)
    assert any('".[server]"' in arg for instruction, arg in steps if instruction == "RUN")
    (healthcheck,) = [arg for instruction, arg in steps if instruction == "HEALTHCHECK"]
    assert "/readyz" in healthcheck and "SDCE_HTTP_PORT" in healthcheck
    (cmd,) = [arg for instruction, arg in steps if instruction == "CMD"]
    assert '"--auth_token_file", "/run/secrets/sdce_token"' in cmd  # auth on unless a deployment says otherwise


def test_trainer_image_installs_only_the_client_extra():
    steps = dockerfile("Dockerfile.trainer")
    assert ("ARG", "EXTRAS=client") in steps
    assert any('".[${EXTRAS}]"' in arg for instruction, arg in steps if instruction == "RUN")


# -- compose -------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def substitute(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default."""
    return re.sub(r"\$\{\w+(?::-([^}]*))?\}", lambda m: m[1] or "", value)


def command(service: dict) -> list[str]:
    return [substitute(str(arg)) for arg in service["command"]]


def test_compose_profiles_cpu_and_gpu():
    services = compose()["services"]
    profiles = {name: service["profiles"] for name, service in services.items()}
    assert profiles == {"demo-assets": ["cpu"], "surrogate-cpu": ["cpu"], "trainer-cpu": ["cpu"],
                        "surrogate": ["gpu"], "trainer": ["gpu"]}
    for name in ("surrogate", "trainer"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "--surrogate_endpoint=surrogate:50051" in services["trainer"]["command"]
    args = services["demo-assets"]["build"]["args"]
    assert substitute(args["TORCH_INDEX_URL"]) == "https://download.pytorch.org/whl/cpu"
    assert substitute(args["TORCH_VERSION"]) == makefile_torch_pin()


def test_compose_is_loopback_only_auth_on_and_hardened():
    spec = compose()
    services = spec["services"]
    assert substitute(spec["secrets"]["sdce_token"]["file"]) == "../.cache/compose/sdce_token"  # git-ignored
    for name, service in services.items():
        assert service["user"] == "1000:1000" and service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        assert not any("TOKEN" in key for key in service.get("environment", {})), name  # never an env value
        if name == "demo-assets":
            assert service["network_mode"] == "none"  # offline: made from the stdlib, nothing downloaded
            continue
        assert service["secrets"] == ["sdce_token"], name
        assert f"={TOKEN_IN_CONTAINER}" in " ".join(service["command"]), name
    for name in ("surrogate-cpu", "trainer-cpu"):
        assert services[name]["network_mode"] == "host" and "ports" not in services[name]
    assert services["surrogate-cpu"]["environment"]["SDCE_HOST"] == "127.0.0.1"
    assert all(port.startswith("127.0.0.1:") for port in services["surrogate"]["ports"])


def test_compose_commands_are_valid_for_the_server_and_the_trainer(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    services = compose()["services"]
    for name in ("surrogate-cpu", "surrogate"):
        argv = [arg.replace(TOKEN_IN_CONTAINER, str(token)) for arg in command(services[name])]
        launch, config = parse_server_args(argv)
        assert launch.metrics_port == 9400 and config.auth_token == "secret", name
    env = services["surrogate-cpu"]["environment"]
    trainer = parse_args(command(services["trainer-cpu"]))
    assert trainer.surrogate.endpoint == f"127.0.0.1:{substitute(env['SDCE_GRPC_PORT'])}"
    assert trainer.surrogate.on_failure == "skip" and trainer.surrogate.auth_token_file == TOKEN_IN_CONTAINER
    assert trainer.data.train_file == "/data/demo/train.jsonl" and trainer.model.init_from_scratch
    assert parse_args(command(services["trainer"])).surrogate.auth_token_file == TOKEN_IN_CONTAINER
    assert services["surrogate-cpu"]["depends_on"] == {"demo-assets": {"condition": "service_completed_successfully"}}
    assert services["trainer-cpu"]["depends_on"] == {"surrogate-cpu": {"condition": "service_healthy"}}


# -- Kubernetes ----------------------------------------------------------------------------------
def manifests() -> dict[tuple[str, str], dict]:
    docs = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def pod_specs() -> dict[str, dict]:
    found = manifests()
    return {"surrogate": found[("StatefulSet", "sdce-surrogate")]["spec"]["template"]["spec"],
            "trainer": found[("Job", "sdce-train")]["spec"]["template"]["spec"]}


def test_kubernetes_manifests_validate_against_the_schemas():
    found = manifests()
    assert set(found) == {
        ("StatefulSet", "sdce-surrogate"), ("Service", "sdce-surrogate-headless"), ("Service", "sdce-surrogate"),
        ("PodDisruptionBudget", "sdce-surrogate"), ("NetworkPolicy", "sdce-surrogate"),
        ("PersistentVolumeClaim", "sdce-outputs"), ("PersistentVolumeClaim", "sdce-trainer-cache"),
        ("Job", "sdce-train"),
    }
    for doc in found.values():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_validator_rejects_a_misspelt_field():
    broken = yaml.safe_load(yaml.safe_dump(manifests()[("StatefulSet", "sdce-surrogate")]))
    broken["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_trainers_list_every_replica_under_the_headless_service():
    found = manifests()
    sts = found[("StatefulSet", "sdce-surrogate")]
    headless = found[("Service", sts["spec"]["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    (port,) = headless["ports"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports[port["targetPort"]] == port["port"] == int(env["SDCE_GRPC_PORT"])
    trainer = pod_specs()["trainer"]["containers"][0]
    cfg = parse_args(trainer["args"])
    want = [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{port['port']}"
            for i in range(sts["spec"]["replicas"])]
    assert cfg.surrogate.endpoint.split(",") == want
    assert cfg.surrogate.on_failure == "skip" and cfg.training.resume_from_checkpoint == "latest"
    policy = found[("NetworkPolicy", "sdce-surrogate")]["spec"]
    clients = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert clients.items() <= found[("Job", "sdce-train")]["spec"]["template"]["metadata"]["labels"].items()


def test_surrogate_pods_probes_metrics_and_cache():
    sts = manifests()[("StatefulSet", "sdce-surrogate")]
    template = sts["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    startup = container["startupProbe"]
    assert startup["grpc"]["port"] == ports["grpc"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a model download fits in it
    assert "initialDelaySeconds" not in container["livenessProbe"]  # the startup probe gates it
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert f"--metrics_port={annotations['prometheus.io/port']}" in container["args"]
    assert ports["metrics"] == int(annotations["prometheus.io/port"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["hf-cache"] == "/cache"  # HF_HOME=/cache/hf in the image
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["hf-cache"]
    assert "--auth_token_file=/secrets/token" in container["args"] and mounts["token"] == "/secrets"


@pytest.mark.parametrize("pod", ["surrogate", "trainer"])
def test_pods_are_unprivileged_and_scheduled_on_gpus(pod):
    spec = pod_specs()[pod]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    for container in spec["containers"]:
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}  # writable with a read-only root
