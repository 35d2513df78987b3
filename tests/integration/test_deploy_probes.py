"""The Kubernetes manifests' probes, ports and trainer endpoints against a real server process.

No cluster here: the StatefulSet's container arguments start ``python -m surrogate_server``
(ServerProcess) with the test surrogate, its token file and free ports; then every probe is
made the way the kubelet makes it (no token), Prometheus's scrape follows the pod's
annotations, and the trainer Job's endpoint settings reach the server with one replica down.
"""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import httpx
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from surrogate_server.process import ServerProcess
from trainer.cli import parse_args
from trainer.models import connect_surrogate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "deploy-probe-secret"


def manifest(kind: str, name: str) -> dict:
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if (doc["kind"], doc["metadata"]["name"]) == (kind, name):
                return doc
    raise LookupError((kind, name))


SURROGATE = manifest("StatefulSet", "sdce-surrogate")["spec"]["template"]
CONTAINER = SURROGATE["spec"]["containers"][0]
PORT_NAMES = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}


@pytest.fixture(scope="module")
def server(surrogate_dir, tmp_path_factory):
    """The StatefulSet's server: its flags, with the test model, a token file and free ports."""
    mounts = {m["name"]: m["mountPath"] for m in CONTAINER["volumeMounts"]}
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "token").write_text(TOKEN + "\n")
    flags = [arg.replace(mounts["token"], str(secrets)) for arg in CONTAINER["args"] if not arg.startswith("--model=")]
    flags = [("--metrics_port=0" if arg.startswith("--metrics_port=") else arg) for arg in flags]
    process = ServerProcess(surrogate_dir, *flags, "--device", "cpu", "--dtype", "float32", cwd=ROOT,
                            env={"OMP_NUM_THREADS": "1", "SDCE_SURROGATE_TOKEN": None}).start()
    yield {"grpc": process.grpc, "http": process.http, "metrics": process.metrics}
    process.stop()


def address(server: dict, port: int | str) -> str:
    """The server's address for a probe's port, by name ('http') or by container port number (50051)."""
    number = PORT_NAMES.get(port, port)
    name = {value: key for key, value in PORT_NAMES.items()}[number]
    return server[name]


def http_probe(server: dict, probe: dict) -> int:
    get = probe["httpGet"]
    return httpx.get(f"http://{address(server, get['port'])}{get['path']}", timeout=probe.get("timeoutSeconds", 1) + 4
                     ).status_code


def test_startup_probe_grpc_health_answers_serving_without_the_token(server):
    probe = CONTAINER["startupProbe"]["grpc"]
    request = health_pb2.HealthCheckRequest(service=probe.get("service", ""))
    with grpc.insecure_channel(address(server, probe["port"])) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_liveness_and_readiness_probes_need_no_token(server):
    assert http_probe(server, CONTAINER["livenessProbe"]) == 200
    assert http_probe(server, CONTAINER["readinessProbe"]) == 200


def test_prometheus_scrapes_by_the_annotations_without_the_token_and_the_http_port_keeps_auth(server):
    annotations = SURROGATE["metadata"]["annotations"]
    assert PORT_NAMES["metrics"] == int(annotations["prometheus.io/port"])
    scrape = httpx.get(f"http://{server['metrics']}{annotations['prometheus.io/path']}", timeout=10)
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    assert any(line.startswith("# TYPE ") for line in scrape.text.splitlines())
    on_http = f"http://{server['http']}/metrics"
    assert httpx.get(on_http, timeout=10).status_code == 401
    assert httpx.get(on_http, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200


def test_the_trainer_jobs_endpoints_reach_a_replica_while_the_other_is_down(server, tmp_path):
    """The Job lists replica 0 and 1 by name; here replica 0 is this server and replica 1 a dead port."""
    job = manifest("Job", "sdce-train")["spec"]["template"]["spec"]["containers"][0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    replicas = parse_args(job["args"]).surrogate.endpoint.split(",")
    local = {replicas[0]: server["grpc"], replicas[1]: dead}
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    args = [arg.split("=", 1)[0] + "=" + ",".join(local[r] for r in replicas) if arg.startswith("--surrogate_endpoint=")
            else arg.replace("/secrets/token", str(token_file)) for arg in job["args"]]
    cfg = parse_args([*args, "--surrogate_timeout", "10"]).surrogate
    ids = torch.randint(3, 500, (2, 8))
    with connect_surrogate(cfg, torch.device("cpu")) as client:
        assert client.topk(ids, torch.ones_like(ids), 4).ids.shape == (2, 8, 4)
