"""Training against real surrogate server processes on loopback (``python -m surrogate_server``).

One server (a tiny Llama surrogate with a SentencePiece-style tokenizer; the base is a
tiny GPT-2 with byte-level BPE) serves the whole module; tests that kill it start it
again on the same port before they end. Where a test waits for a deadline, it is kept
short with a small ``request_timeout``; outages themselves cost no waiting (the client's
circuit breaker).
"""

from __future__ import annotations

import logging
import math
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surrogate_server import codec
from surrogate_server.client import RemoteSurrogate
from surrogate_server.engine import SurrogateEngine
from surrogate_server.process import ServerProcess
from surrogate_server.source import SurrogateUnavailable
from trainer.alignment import align_vocabularies
from trainer.checkpoint import checkpoints
from surrogate_server.config_cli import merge
from trainer.config import build_config
from trainer.guidance import placeholder_id, surrogate_inputs
from trainer.tracking import read_metrics
from trainer.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
TIMEOUT = 3.0  # surrogate.request_timeout in these tests: an outage costs a batch this long
TOKEN = "integration-secret"


def start_server(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(model_dir, "--device", "cpu", "--dtype", "float32", *flags, cwd=ROOT,
                         env={"OMP_NUM_THREADS": "1", **(env or {})}).start()


@pytest.fixture(scope="module")
def server(surrogate_dir):
    process = start_server(surrogate_dir)
    yield process
    process.kill()


@pytest.fixture(scope="module")
def config_for(base_dir, surrogate_dir, train_file):
    """A tiny run's config: 10 steps of 4 x 32 tokens, per-step logs, in-process or remote surrogate.

    No probability threshold: the random-init surrogate is too flat to pass one, and
    guided_share > 0 must tell guided steps from skipped ones.
    """

    def make(output_dir: Path, surrogate: dict | None = None, training: dict | None = None, data: dict | None = None):
        defaults = {
            "model": {"name_or_path": str(base_dir)},
            "surrogate": {"name_or_path": str(surrogate_dir), "k": 8, "probability_threshold": 0.0,
                          "request_timeout": TIMEOUT},
            "data": {"train_file": str(train_file), "max_seq_length": SEQ_LEN, "max_eval_blocks": 4},
            "training": {"output_dir": str(output_dir), "max_steps": 10, "per_device_train_batch_size": 4,
                         "learning_rate": 3e-3, "logging_steps": 1, "save_steps": None, "progress_bar": False,
                         "device": "cpu"},
        }
        return build_config(merge(defaults, {"surrogate": surrogate or {}, "training": training or {}, "data": data or {}}))

    return make


def remote(server: ServerProcess, **extra) -> dict:
    return {"name_or_path": None, "endpoint": server.grpc, **extra}


@pytest.fixture(scope="module")
def in_process_run(config_for, tmp_path_factory):
    """The reference: the same run with the surrogate in the trainer's process."""
    return train(config_for(tmp_path_factory.mktemp("in_process")))


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        for key in ("loss", "ce", "surrogate_term", "guided_share"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key, x[key], y[key])


class KillSwitch:
    """Wraps RemoteSurrogate.topk: kills the server at call ``kill_at`` (once the calls before it have
    been answered, so batches 1 .. kill_at-1 are guided); at call ``restart_at`` (once the calls before
    it ended) starts it again and waits, inside that call, until the client sees it (``resumed_after``)."""

    def __init__(self, server: ServerProcess, kill_at: int, restart_at: int | None = None):
        self.server, self.kill_at, self.restart_at = server, kill_at, restart_at
        self.calls = 0
        self.answered = 0
        self.resumed_after: float | None = None  # seconds from the server's ready line to the client's circuit closing
        self.lock = threading.Lock()  # numbers the calls (from the prefetch threads) and holds them at a kill/restart
        self.done = threading.Condition()
        self.original = RemoteSurrogate.topk

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        switch = self

        def topk(client, *args, **kwargs):
            with switch.lock:
                switch.calls += 1
                if switch.calls in (switch.kill_at, switch.restart_at):
                    with switch.done:
                        assert switch.done.wait_for(lambda: switch.answered == switch.calls - 1, timeout=60)
                if switch.calls == switch.kill_at:
                    switch.server.kill()
                if switch.calls == switch.restart_at:
                    switch.server.start()
                    returned = time.monotonic()
                    while not client.healthy() and time.monotonic() - returned < 30:
                        time.sleep(0.005)
                    switch.resumed_after = time.monotonic() - returned
            try:
                return switch.original(client, *args, **kwargs)
            finally:
                with switch.done:
                    switch.answered += 1
                    switch.done.notify_all()

        monkeypatch.setattr(RemoteSurrogate, "topk", topk)


# -- (1) the wire answers what the engine answers ----------------------------------------------
def test_remote_topk_equals_the_in_process_engine(server, base_dir, surrogate_dir, texts):
    engine = SurrogateEngine.from_pretrained(str(surrogate_dir), device="cpu", dtype="float32")
    base_tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with RemoteSurrogate([server.grpc], timeout=10) as client:
        spec = client.vocabulary()
        assert spec == engine.vocabulary()
        text = "\n".join(texts[:3]) + " <s> literal specials </s>"
        assert client.tokenizer()(text)["input_ids"] == engine.tokenizer()(text)["input_ids"]  # sent by the server
        alignment = align_vocabularies(base_tokenizer, spec, sample_text=texts[0])
        base_ids = torch.tensor(base_tokenizer("\n".join(texts[:20]))["input_ids"][: 3 * SEQ_LEN]).view(3, SEQ_LEN)
        s_ids, s_mask = surrogate_inputs(base_ids, alignment, placeholder_id(spec))
        for k, floor in ((9, math.log(0.01)), (5, None)):
            got = client.topk(s_ids, s_mask, k, alignment.permitted, floor)
            top = engine.topk(s_ids, s_mask, k, alignment.permitted)  # the server leaves out what is below the floor
            want_logprobs, want_ids = codec.decode_topk(*codec.encode_topk(top.logprobs, top.ids, floor=floor), k)
            assert torch.equal(got.ids, want_ids)
            torch.testing.assert_close(got.logprobs, want_logprobs, rtol=0, atol=1e-5)
        stats = client.stats()
    assert stats["guidance_requests"] == 2 and stats["guidance_failures"] == 0
    assert 0 < stats["guidance_bytes_per_token"] < 9 * 8 + 8  # int32 id + float32 log-prob per kept slot


def test_remote_score_equals_a_slow_reference_and_a_bad_request_fails_alone(server, surrogate_dir):
    """Score (the teacher check's call): the full-vocabulary log-prob of each target, as model(...).logits gives it."""
    model = AutoModelForCausalLM.from_pretrained(surrogate_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids).index_fill_(1, torch.tensor([0, 5]), 0)  # masked keys; position 0 sees nothing
    targets = ids.roll(-1, dims=1).index_fill_(1, torch.tensor([3, 11]), -1)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    want = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1))[..., 0]
    want[:, [0, 3, 11]] = 0.0  # attends to nothing / no target
    with RemoteSurrogate([server.grpc], timeout=10) as client:
        torch.testing.assert_close(client.score(ids, mask, targets), want, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="targets must be \\[B, T\\] = \\[2, 12\\]"):
            client.score(ids, mask, targets[:, :5])
        engine = SurrogateEngine.from_pretrained(str(surrogate_dir), device="cpu", dtype="float32")
        torch.testing.assert_close(engine.score(ids, mask, targets), want, rtol=0, atol=1e-5)
        assert client.topk(ids, mask.where(mask > 0, 1), 3).ids.shape == (2, 12, 3)  # the server serves on


# -- (2) a remote run trains exactly like an in-process one ------------------------------------
def test_remote_training_matches_in_process(server, config_for, in_process_run, tmp_path):
    result = train(config_for(tmp_path, remote(server)))
    assert result.steps == 10
    assert_same_losses(result.history, in_process_run.history)
    assert result.eval_loss == pytest.approx(in_process_run.eval_loss, rel=1e-5)
    last = read_metrics(tmp_path)[-1]  # the last step's record
    assert last["unguided_batches"] == 0 and all(h["guided_share"] > 0 for h in result.history)
    assert "guidance_requests" in last and "input_wait_share" in last
    # Latency and size come with the windows that made requests; prefetching may have made the last one's earlier.
    for key in ("guidance_latency_ms_p50", "guidance_bytes_per_token"):
        assert any(key in record for record in result.history), key


def test_precompute_through_the_server_then_train_with_the_surrogate_absent(server, config_for, in_process_run,
                                                                            tmp_path):
    """sdce-precompute asks the server; the run then needs no surrogate, and an in-process surrogate with the
    same weights finds the server's guidance (one namespace: the weights decide, not where they run)."""
    from trainer.cache import namespaces
    from trainer.precompute import precompute

    cache = str(tmp_path / "cache")
    summary = precompute(config_for(tmp_path / "precompute", remote(server, cache_dir=cache)))
    assert summary["computed"] == summary["blocks"] > 0 and summary["cached"] == 0
    absent = train(config_for(tmp_path / "absent", {"name_or_path": None, "cache_dir": cache}))
    assert_same_losses(absent.history, in_process_run.history)
    local = train(config_for(tmp_path / "local", {"cache_dir": cache}))
    assert_same_losses(local.history, in_process_run.history)
    assert all(h["guidance_requests"] == 0 and h["guidance_cache_misses"] == 0 for h in local.history)
    assert len(namespaces(cache)) == 1


def step_seconds(record: dict) -> float:
    """Wall time of a logged step (logging_steps=1): its 4 x 32 tokens over its window's tokens/s."""
    return 4 * SEQ_LEN / record["tokens_per_s"]


# -- (3) outages: skip trains through at full speed, fail stops after a checkpoint --------------
def test_server_killed_mid_training_skip_costs_no_time_and_guidance_comes_back(server, config_for, tmp_path,
                                                                                monkeypatch, caplog):
    """SIGKILL before batch 12, back before batch 42: 30 batches on CE alone, none waiting for the 30 s timeout."""
    outage = KillSwitch(server, kill_at=12, restart_at=42)
    outage.install(monkeypatch)
    try:
        result = train(config_for(tmp_path, remote(server, on_failure="skip", request_timeout=30.0),
                                  {"max_steps": 48}))
    finally:
        if not server.running():
            server.start()
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    skipped = int(records[-1]["unguided_batches"])
    unguided = [r for r in records if r["guided_share"] == 0]
    assert result.steps == 48 and skipped == len(unguided) == 30, (skipped, [r["step"] for r in unguided])
    assert sum(r.get("guidance_failures", 0) for r in records) == skipped
    # The batches the prefetch threads numbered 12..41 went unguided: the steps between (±1 at the edges).
    assert 11 <= unguided[0]["step"] and unguided[-1]["step"] <= 42
    # Full speed while the server is down: the steps (leaving out the first, which saw the kill) take no
    # longer than the guided ones before (leaving out two warm-up steps), and nothing near the timeout.
    up = [step_seconds(r) for r in records[2:unguided[0]["step"] - 1]]
    down = [step_seconds(r) for r in unguided[1:]]
    print(f"step time: server up {statistics.median(up) * 1e3:.1f} ms (median of {len(up)}), "
          f"down {statistics.median(down) * 1e3:.1f} ms (median of {len(down)}, max {max(down) * 1e3:.1f} ms); "
          f"guidance back {outage.resumed_after:.2f}s after the server")
    assert statistics.median(down) <= 1.1 * statistics.median(up), (up, down)
    assert sum(down) < 30.0 / 4, down  # all 29 together: a fraction of the one timeout each used to wait
    # Guidance comes back by itself, soon after the server does; the restarted server learns the permitted set again.
    assert outage.resumed_after < 10
    assert all(r["guided_share"] > 0 for r in records if r["step"] > unguided[-1]["step"])
    assert sum(r.get("guidance_reregistrations", 0) for r in records) >= 1
    warned = [r for r in caplog.records if r.name == "trainer.guidance" and r.levelno == logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in warned]  # once per outage, not once per batch


def test_two_endpoints_killing_one_loses_no_guidance(server, surrogate_dir, config_for, tmp_path, monkeypatch):
    second = start_server(surrogate_dir)
    KillSwitch(second, kill_at=5).install(monkeypatch)
    try:
        result = train(config_for(tmp_path, remote(server, endpoint=f"{server.grpc},{second.grpc}"), {"max_steps": 12}))
    finally:
        second.kill()
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert result.steps == 12 and records[-1]["unguided_batches"] == 0
    assert all(r["guided_share"] > 0 for r in records)
    assert sum(r["guidance_failures"] for r in records) == 0
    assert not second.running()  # it did die mid-run: the live endpoint carried its load


def test_server_killed_mid_training_fail_then_resume(server, config_for, in_process_run, tmp_path, monkeypatch):
    KillSwitch(server, kill_at=4).install(monkeypatch)
    try:
        with pytest.raises(SurrogateUnavailable, match="--resume_from_checkpoint latest"):
            train(config_for(tmp_path, remote(server, on_failure="fail")))
    finally:
        server.start()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-3"]  # the last complete step
    monkeypatch.undo()
    resumed = train(config_for(tmp_path, remote(server, on_failure="fail"), {"resume_from_checkpoint": "latest"}))
    assert resumed.steps == 10 and [h["step"] for h in resumed.history] == list(range(4, 11))
    assert_same_losses(resumed.history, in_process_run.history[3:])


# -- (4) re-registration, (5) failover, (6) auth ------------------------------------------------
def test_permitted_set_is_registered_again_after_a_restart(server):
    with RemoteSurrogate([server.grpc], timeout=30) as client:
        vocab = client.info().vocab_size
        ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        permitted = torch.rand(vocab, generator=torch.Generator().manual_seed(1)) < 0.5
        before = client.topk(ids, torch.ones_like(ids), 6, permitted)
        server.restart()
        after = client.topk(ids, torch.ones_like(ids), 6, permitted)
        stats = client.stats()
    assert stats["guidance_reregistrations"] == 1
    assert torch.equal(before.ids, after.ids) and bool(permitted[before.ids[before.ids >= 0]].all())


def test_two_endpoints_one_dead_requests_go_to_the_live_one(server, config_for, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    result = train(config_for(tmp_path, remote(server, endpoint=f"{dead},{server.grpc}"), {"max_steps": 4}))
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert result.steps == 4 and records[-1]["unguided_batches"] == 0
    assert all(r["guided_share"] > 0 for r in records)
    assert sum(r["guidance_failures"] for r in records) == 0


def test_auth_token(surrogate_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    secured = start_server(surrogate_dir, "--auth_token_file", str(token_file))
    try:
        with RemoteSurrogate([secured.grpc], timeout=5) as client:
            with pytest.raises(ValueError, match="auth_token_file"):
                client.info()
        with RemoteSurrogate([secured.grpc], token="wrong", timeout=5) as client:
            with pytest.raises(ValueError, match="refused"):
                client.info()
        with RemoteSurrogate([secured.grpc], token=TOKEN, timeout=5) as client:
            ids = torch.randint(3, 500, (1, 8))
            assert client.topk(ids, torch.ones_like(ids), 4).ids.shape == (1, 8, 4)
    finally:
        secured.kill()


def test_a_token_ending_in_a_newline_works_on_both_sides(surrogate_dir, tmp_path, monkeypatch):
    """`echo secret > file` and `export SDCE_SURROGATE_TOKEN=$(cat file)`-style values carry a newline."""
    from surrogate_server.auth import TOKEN_ENV
    from trainer.config import SurrogateConfig
    from trainer.models import connect_surrogate

    secured = start_server(surrogate_dir, env={TOKEN_ENV: TOKEN + "\n"})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    ids = torch.randint(3, 500, (1, 8))
    try:
        monkeypatch.setenv(TOKEN_ENV, TOKEN + "\r\n")
        for token_from in (str(token_file), None):  # the file, then the environment
            cfg = SurrogateConfig(endpoint=secured.grpc, auth_token_file=token_from, request_timeout=5)
            with connect_surrogate(cfg, torch.device("cpu")) as client:
                assert client.topk(ids, torch.ones_like(ids), 4).ids.shape == (1, 8, 4)
    finally:
        secured.kill()


@pytest.mark.parametrize("alignment", ["bytes", "tokens"])
def test_document_mask_trains_alike_in_process_and_remote(config_for, server, tmp_path, alignment):
    """data.document_mask: the base's positions and the surrogate's (sent as position_ids) restart per document."""
    common = {"data": {"document_mask": True}, "training": {"max_steps": 3}}
    surrogate = {"alignment": alignment}
    local = train(config_for(tmp_path / "local", surrogate=surrogate, **common))
    remote_run = train(config_for(tmp_path / "remote", surrogate=remote(server, **surrogate), **common))
    assert_same_losses(remote_run.history, local.history)
    unmasked = train(config_for(tmp_path / "unmasked", surrogate=surrogate, training={"max_steps": 3}))
    # Blocks holding a document boundary read differently: the base's and the surrogate's terms both move.
    assert any(a["ce"] != b["ce"] for a, b in zip(local.history, unmasked.history))
    assert any(a["surrogate_term"] != b["surrogate_term"] for a, b in zip(local.history, unmasked.history))
