"""The compose lane: the CPU profile of deploy/docker-compose.yml under a real Docker engine.

    make compose-test                      # = python3 deploy/compose_test.py
    SDCE_BASE_IMAGE=python:3.11-slim-bookworm make compose-test   # a base image of your choice

1. A Docker engine: the running one, else dockerd started here (as root; Debian's docker.io
   and docker-compose are installed first if missing), stopped again at the end.
2. Images: sdce-surrogate-server:cpu and sdce-trainer:cpu, built on BASE_IMAGE. Without
   SDCE_BASE_IMAGE that is python:3.11-slim-bookworm when the registry answers, else a local
   base (deploy/local-base: a debootstrap'd Debian bookworm plus the pinned torch wheel).
   The Docker layer cache and the root filesystem tarball (SDCE_DOCKER_CACHE, default
   ~/.cache/sdce-training/docker) make a second run fast.
3. The stack on host networking, loopback only, auth on with a token generated for the run
   (a file mounted as a secret): demo assets, the surrogate, a trainer guided by it.
4. Mid-run the surrogate container is killed (SIGKILL) and started again; the trainer, with
   --surrogate_on_failure skip, must ride through: its metrics.jsonl shows guided steps, then
   skipped ones (CE alone), then guided ones again.
5. /readyz without the token, /metrics on the metrics port without it, /metrics on the HTTP
   port only with it.
6. Everything torn down (containers, network, volumes), whatever happened.

Only the standard library: it runs before any virtual environment exists.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
STATE = ROOT / ".cache" / "compose"  # token, dockerd log, the run's metrics.jsonl (git-ignored)
CACHE = Path(os.environ.get("SDCE_DOCKER_CACHE", Path.home() / ".cache" / "sdce-training" / "docker"))
PROJECT = os.environ.get("SDCE_COMPOSE_PROJECT", "sdce-compose-test")
PUBLIC_BASE = "python:3.11-slim-bookworm"
TORCH_VERSION = os.environ.get("SDCE_TORCH_VERSION", "2.13.0")  # the Makefile's pin
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
DEBIAN_MIRROR = os.environ.get("SDCE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOTFS_IMAGE = "sdce-rootfs:bookworm"
LOCAL_BASE = f"sdce-base:bookworm-torch{TORCH_VERSION}-cpu"
SERVER_IMAGE = os.environ.get("SDCE_SERVER_IMAGE", "sdce-surrogate-server:cpu")
TRAINER_IMAGE = os.environ.get("SDCE_TRAINER_IMAGE", "sdce-trainer:cpu")
CONTAINER_UID = 1000  # the images' user
STEPS = int(os.environ.get("SDCE_TRAIN_STEPS", "40"))
GUIDED_BEFORE_KILL = 5  # guided steps logged before the surrogate is killed


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*command: str, check: bool = True, capture: bool = False, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, text=True, capture_output=capture, **kwargs)


def ok(*command: str) -> bool:
    return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode == 0


def wait_for(what: str, predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- 1. the engine -------------------------------------------------------------------------------
def apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"{' '.join(packages)} missing: install them (or run as root on Debian/Ubuntu)")
    log(f"installing {' '.join(packages)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-q", env=env, stdout=subprocess.DEVNULL)
    run("apt-get", "install", "-y", "-q", *packages, env=env, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def docker_engine():
    """The running engine, or dockerd started for this run (host networking only) and stopped after it."""
    if ok("docker", "info"):
        yield
        return
    if not shutil.which("dockerd"):
        apt_install("docker.io")
    STATE.mkdir(parents=True, exist_ok=True)
    log("no Docker engine answers: starting dockerd (no bridge, no iptables: the stack uses host networking)")
    with open(STATE / "dockerd.log", "ab") as out:
        daemon = subprocess.Popen(["dockerd", "--iptables=false", "--ip-masq=false", "--bridge=none"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("dockerd", lambda: daemon.poll() is not None or ok("docker", "info"), 60)
        if daemon.poll() is not None:
            raise RuntimeError(f"dockerd exited ({daemon.returncode}); see {STATE / 'dockerd.log'}")
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


def compose_command() -> list[str]:
    if ok("docker", "compose", "version"):
        return ["docker", "compose"]
    if not shutil.which("docker-compose"):
        apt_install("docker-compose")
    return ["docker-compose"]


# -- 2. the images -------------------------------------------------------------------------------
def image_exists(name: str) -> bool:
    return ok("docker", "image", "inspect", name)


def base_image() -> str:
    if base := os.environ.get("SDCE_BASE_IMAGE"):
        return base
    if image_exists(PUBLIC_BASE) or ok("docker", "pull", "-q", PUBLIC_BASE):
        return PUBLIC_BASE
    log(f"{PUBLIC_BASE} cannot be pulled (no registry): using the local base {LOCAL_BASE}")
    if not image_exists(LOCAL_BASE):
        build_local_base()
    return LOCAL_BASE


def build_local_base() -> None:
    """Debian bookworm from the Debian mirror (debootstrap, cached as a tarball), python3, the torch wheel."""
    tarball = CACHE / "debian-bookworm-rootfs.tar"
    if not image_exists(ROOTFS_IMAGE):
        if not tarball.is_file():
            debootstrap(tarball)
        log(f"docker import {tarball}")
        run("docker", "import", str(tarball), ROOTFS_IMAGE, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="sdce-base-") as context:
        log(f"the torch=={TORCH_VERSION} wheel, through pip (the machine's own wheel where pip's config has one)")
        run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            f"torch=={TORCH_VERSION}", "-d", context)
        ca = Path(context) / "ca"
        ca.mkdir()
        for cert in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):  # a TLS-inspecting proxy's CA
            shutil.copy(cert, ca / cert.name)
        shutil.copy(ROOT / "deploy" / "local-base" / "Dockerfile", Path(context) / "Dockerfile")
        log(f"building {LOCAL_BASE}")
        run("docker", "build", "--network", "host", "-q", "--build-arg", f"ROOTFS={ROOTFS_IMAGE}",
            "-t", LOCAL_BASE, context, stdout=subprocess.DEVNULL)


def debootstrap(tarball: Path) -> None:
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdce-rootfs-", dir=CACHE) as target:
        log(f"debootstrap bookworm from {DEBIAN_MIRROR} (minutes; cached in {tarball})")
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            "bookworm", target, DEBIAN_MIRROR, stdout=subprocess.DEVNULL)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            run("find", f"{target}/{junk}", "-type", "f", "-delete")
        partial = tarball.with_suffix(".partial")
        run("tar", "-C", target, "--numeric-owner", "-cf", str(partial), ".")
        partial.rename(tarball)


def build_images(base: str) -> None:
    for image, dockerfile in ((SERVER_IMAGE, "Dockerfile.server"), (TRAINER_IMAGE, "Dockerfile.trainer")):
        log(f"docker build {image} (on {base})")
        started = time.monotonic()
        result = run("docker", "build", "--network", "host", "-f", f"deploy/{dockerfile}",
                     "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"TORCH_VERSION={TORCH_VERSION}",
                     "--build-arg", f"TORCH_INDEX_URL={CPU_TORCH_INDEX}", "-t", image, ".",
                     cwd=ROOT, check=False, capture=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {image} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
        log(f"  {image}: {time.monotonic() - started:.0f} s")


# -- 3. the stack --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_token() -> tuple[Path, str]:
    """A token for this run, readable by the containers' uid and no other account here."""
    STATE.mkdir(parents=True, exist_ok=True)
    STATE.chmod(0o700)
    path = STATE / "sdce_token"
    path.unlink(missing_ok=True)
    token = secrets.token_hex(32)
    path.write_text(token + "\n")
    if os.geteuid() == 0:
        os.chown(path, CONTAINER_UID, CONTAINER_UID)
        path.chmod(0o400)
    else:  # we cannot give it away: world-readable inside a directory only we can enter
        path.chmod(0o400 if os.geteuid() == CONTAINER_UID else 0o444)
    return path, token


class Stack:
    def __init__(self, compose: list[str], env: dict[str, str]):
        self.compose = [*compose, "-p", PROJECT, "-f", str(COMPOSE_FILE), "--profile", "cpu"]
        self.env = env

    def __call__(self, *args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
        return run(*self.compose, *args, cwd=ROOT, env=self.env, check=check, capture=capture)

    def container(self, service: str) -> str:
        ids = run("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
                  "--filter", f"label=com.docker.compose.service={service}", capture=True).stdout.split()
        if len(ids) != 1:
            raise RuntimeError(f"expected one {service} container, found {ids}")
        return ids[0]

    def state(self, service: str, field: str = "Status") -> str:
        return run("docker", "inspect", "-f", f"{{{{.State.{field}}}}}", self.container(service),
                   capture=True).stdout.strip()

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "60", check=False, capture=True).stdout


def read_metrics(stack: Stack) -> list[dict]:
    """The trainer's metrics.jsonl (a copy out of its volume; works once it has exited too)."""
    target = STATE / "metrics.jsonl"
    copied = run("docker", "cp", f"{stack.container('trainer-cpu')}:/outputs/sdce-cpu/metrics.jsonl", str(target),
                 check=False, capture=True)
    if copied.returncode != 0:
        return []
    return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]


def steps(records: list[dict]) -> list[dict]:
    """The training records, keys without their "train/" namespace (trainer.tracking.read_metrics, without the import)."""
    return [{"step": r["step"], **{k.removeprefix("train/"): v for k, v in r.items() if k.startswith("train/")}}
            for r in records if "train/loss" in r]


def last_step(stack: Stack) -> int:
    return max((r["step"] for r in steps(read_metrics(stack))), default=0)


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def check_http(ports: dict[str, int], token: str) -> None:
    http, metrics = f"http://127.0.0.1:{ports['http']}", f"http://127.0.0.1:{ports['metrics']}"
    checks = {
        "/readyz without a token": (http_get(f"{http}/readyz")[0], 200),
        "/metrics on the HTTP port without a token": (http_get(f"{http}/metrics")[0], 401),
        "/metrics on the HTTP port with the token": (http_get(f"{http}/metrics", token)[0], 200),
    }
    status, body = http_get(f"{metrics}/metrics")
    checks["/metrics on the metrics port without a token"] = (status, 200)
    for what, (got, want) in checks.items():
        if got != want:
            raise RuntimeError(f"{what}: HTTP {got}, expected {want}")
    samples = [line for line in body.splitlines() if line and not line.startswith("#")]
    if not samples:
        raise RuntimeError("the metrics port served no samples")
    log(f"HTTP checks passed: {', '.join(checks)} ({len(samples)} metric samples)")


def kill_and_restart(stack: Stack) -> dict[str, float]:
    """Guided steps, SIGKILL the surrogate, a skipped step, start it again; returns the timings."""
    wait_for(f"{GUIDED_BEFORE_KILL} guided steps",
             lambda: sum(r["guided_share"] > 0 for r in steps(read_metrics(stack))) >= GUIDED_BEFORE_KILL, 300)
    surrogate = stack.container("surrogate-cpu")
    run("docker", "kill", surrogate, stdout=subprocess.DEVNULL)
    killed = time.monotonic()
    log(f"surrogate killed (SIGKILL) after step {last_step(stack)}")
    def skipped() -> bool:
        return (any(r["guided_share"] == 0 for r in steps(read_metrics(stack)))
                or stack.state("trainer-cpu") != "running")

    wait_for("a step trained without guidance", skipped, 120, 0.5)
    run("docker", "start", surrogate, stdout=subprocess.DEVNULL)
    log("surrogate started again")
    wait_for("the restarted surrogate to be healthy",
             lambda: stack.state("surrogate-cpu", "Health.Status") == "healthy", 300)
    log(f"surrogate healthy again at step {last_step(stack)}, {time.monotonic() - killed:.0f} s after the kill")
    return {"outage_s": time.monotonic() - killed}


def verify_run(records: list[dict]) -> str:
    trained = steps(records)
    if [r["step"] for r in trained] != list(range(1, STEPS + 1)):
        raise RuntimeError(f"expected steps 1..{STEPS}, got {[r['step'] for r in trained]}")
    guided = [r["guided_share"] > 0 for r in trained]
    if all(guided):
        raise RuntimeError("no step was trained without guidance: the kill did not reach the trainer")
    first_skip = guided.index(False)
    before, skipped, after = sum(guided[:first_skip]), guided.count(False), sum(guided[first_skip:])
    if before < GUIDED_BEFORE_KILL or after < 3:
        raise RuntimeError(f"guided/skipped/guided = {before}/{skipped}/{after}: guidance did not resume after the "
                           f"restart (a slow restart outlasted the run? raise SDCE_TRAIN_STEPS)")
    unguided = int(trained[-1]["unguided_batches"])
    reregistered = sum(r.get("guidance_reregistrations", 0) for r in trained)
    if reregistered < 1:
        raise RuntimeError("the restarted server forgot the permitted set, yet the client never registered it again")
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    if not evals or not math.isfinite(evals[-1]):
        raise RuntimeError(f"the run logged no finite eval/loss (got {evals}): its final evaluation failed")
    return (f"{len(trained)} steps: {before} guided, then {skipped} without guidance (skipped), {after} guided after "
            f"the restart; "
            f"unguided_batches {unguided}, permitted set re-registered {reregistered}x, "
            f"eval loss {evals[-1]:.3f}")


def run_stack(compose: list[str]) -> str:
    token_file, token = write_token()
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    env = {**os.environ, "SDCE_TOKEN_FILE": str(token_file), "SDCE_GRPC_PORT": str(ports["grpc"]),
           "SDCE_HTTP_PORT": str(ports["http"]), "SDCE_METRICS_PORT": str(ports["metrics"]),
           "SDCE_TRAIN_STEPS": str(STEPS), "SDCE_SERVER_IMAGE": SERVER_IMAGE, "SDCE_TRAINER_IMAGE": TRAINER_IMAGE}
    stack = Stack(compose, env)
    stack("down", "--volumes", "--remove-orphans", capture=True)  # leftovers of an interrupted run
    try:
        log(f"compose up (ports {ports}): demo assets, then the surrogate, then the trainer")
        up = stack("up", "-d", "--no-build", check=False, capture=True)
        if up.returncode != 0:
            raise RuntimeError(f"compose up failed:\n{up.stdout}\n{up.stderr}\n{stack.logs()}")
        log("assets made, surrogate healthy, trainer started")
        timings = kill_and_restart(stack)
        check_http(ports, token)
        wait_for("the trainer to finish", lambda: stack.state("trainer-cpu") == "exited", 600)
        code = stack.state("trainer-cpu", "ExitCode")
        if code != "0":
            raise RuntimeError(f"the trainer exited with {code}:\n{stack.logs()}")
        summary = verify_run(read_metrics(stack))
        return f"{summary}; surrogate outage {timings['outage_s']:.0f} s (kill to healthy)"
    except Exception:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack("down", "--volumes", "--remove-orphans", check=False, capture=True)
        token_file.unlink(missing_ok=True)


def main() -> int:
    started = time.monotonic()
    try:
        with docker_engine():
            compose = compose_command()
            build_images(base_image())
            built = time.monotonic()
            summary = run_stack(compose)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        log(f"FAILED after {time.monotonic() - started:.0f} s: {err}")
        return 1
    log(f"passed: {summary}")
    log(f"wall time {time.monotonic() - started:.0f} s (engine and images {built - started:.0f} s, "
        f"stack {time.monotonic() - built:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
