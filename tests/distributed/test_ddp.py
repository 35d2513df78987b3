"""torchrun --nproc_per_node=2 on the CPU (gloo) against one process with the doubled batch.

Why the two runs see the same samples at every step: DistributedSampler draws one
permutation of the blocks (seeded by seed + epoch, whatever the world size) and gives
rank r the entries r, r + W, r + 2W, ... Rank r's i-th micro-batch of size b is
therefore permutation[2b*i + r + 2j] for j < b, and the two ranks together hold
permutation[2b*i : 2b*(i+1)], exactly the one-process batch of size 2b. With the loss
normalised by the global label count (docs/method.md §4), the per-rank loss is a share of the
big batch's loss, DDP averages the gradients of loss * world_size, and so the update is
the big batch's update up to float summation order.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surrogate_server.process import ServerProcess
from trainer.checkpoint import MANIFEST, STATE_FILE, checkpoints
from trainer.tracking import read_metrics
from trainer.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEYS = ("loss", "ce", "surrogate_term", "grad_norm", "guided_share")
STEPS = 4


def _flags(base_dir, surrogate_dir, train_file, out: Path, batch: int, extra: list[str] = ()) -> list[str]:
    """train.py flags equal to make_config's defaults (tests/integration/conftest.py)."""
    return [
        "train.py", "--base_model", str(base_dir), "--surrogate_model", str(surrogate_dir), "--surrogate_k", "8",
        "--probability_threshold", "0.0", "--train_file", str(train_file), "--max_seq_length", "32",
        "--max_eval_blocks", "8", "--batch_size", str(batch), "--max_steps", str(STEPS), "--learning_rate", "3e-3",
        "--logging_steps", "1", "--save_steps", "2", "--save_total_limit", "none", "--device", "cpu",
        "--no_progress_bar", "--output_dir", str(out), *extra,
    ]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def records(out: Path) -> list[dict]:
    """The training records of metrics.jsonl (evaluation records left out)."""
    return read_metrics(out, "train")


def assert_same_steps(got: list[dict], want: list[dict], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (key, a["step"], a[key], b[key])


def one_process(make_config, out: Path, batch: int, **surrogate) -> list[dict]:
    """The reference: one process, batch ``batch``, the same flags as the torchrun runs."""
    config = {"training": {"per_device_train_batch_size": batch, "max_steps": STEPS, "save_steps": 2, "save_total_limit": None}}
    if surrogate:
        config["surrogate"] = surrogate
    train(make_config(config, out))
    return records(out)


@pytest.fixture(scope="module")
def two_ranks(base_dir, surrogate_dir, train_file, tmp_path_factory):
    """2 ranks x batch 2, in-process surrogate, wandb on: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(_flags(base_dir, surrogate_dir, train_file, out, batch=2, extra=["--wandb_project", "sdce-ddp"]))
    return out, done


def test_two_ranks_train_like_one_process_with_twice_the_batch(two_ranks, make_config, tmp_path):
    out, _ = two_ranks
    assert_same_steps(records(out), one_process(make_config, tmp_path / "one", batch=4), rel=1e-4)
    evals, reference = read_metrics(out, "eval"), read_metrics(tmp_path / "one", "eval")
    assert evals[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=1e-4)


def test_two_ranks_precompute_then_a_run_trains_from_the_cache_alone(two_ranks, make_config, base_dir,
                                                                     surrogate_dir, train_file, tmp_path):
    """Each rank of sdce-precompute writes its share of the cache; a run with the surrogate absent then finds every
    block (both ranks' shares) and takes the steps of two ranks that asked the surrogate (two_ranks)."""
    cache = str(tmp_path / "cache")
    flags = _flags(base_dir, surrogate_dir, train_file, tmp_path / "precompute", batch=2)[1:]
    done = torchrun(["-m", "trainer.precompute", *flags, "--guidance_cache", cache])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["computed"] == summary["blocks"] > 0
    config = {"surrogate": {"name_or_path": None, "cache_dir": cache},
              "training": {"per_device_train_batch_size": 4, "max_steps": STEPS, "save_steps": 2,
                           "save_total_limit": None}}
    train(make_config(config, tmp_path / "one"))
    assert all(r["guidance_cache_misses"] == 0 and r["guidance_cache_hits"] == 4 for r in records(tmp_path / "one"))
    assert_same_steps(records(tmp_path / "one"), records(two_ranks[0]), rel=1e-4)


def test_rank_zero_alone_logs_and_writes(two_ranks):
    out, done = two_ranks
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))  # one record per step, not one per rank
    assert done.stderr.count("resolved config") == 1 and done.stderr.count("final model saved") == 1
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    assert (out / "model.safetensors").is_file()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # WANDB_MODE=offline (tests/conftest.py)
    assert records(out)[0]["tokens_per_s"] > 0


def test_resume_with_the_same_world_size_continues_exactly(two_ranks, base_dir, surrogate_dir, train_file, tmp_path):
    out, _ = two_ranks
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(_flags(base_dir, surrogate_dir, train_file, resumed, batch=2, extra=["--resume_from_checkpoint", "latest"]))
    assert_same_steps(records(resumed), records(out)[2:], rel=1e-6)


def test_resume_mid_epoch_with_another_world_size_is_refused(two_ranks, make_config, tmp_path):
    out, _ = two_ranks
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    config = make_config({"training": {"per_device_train_batch_size": 4, "max_steps": STEPS, "resume_from_checkpoint": "latest"}}, resumed)
    with pytest.raises(ValueError, match="stopped mid-epoch with 2 ranks; resuming with 1 would change"):
        train(config)


def test_resume_at_an_epoch_boundary_with_another_world_size(two_ranks, make_config, tmp_path):
    """At an epoch boundary no rank is half-way through its shard: any world size may continue."""
    out, _ = two_ranks
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    state_file = resumed / "checkpoint-2" / STATE_FILE
    state = torch.load(state_file, weights_only=False)
    state["progress"].update(epoch=1, micro_batch=0)  # as if saved on the last step of epoch 0
    torch.save(state, state_file)
    manifest = json.loads((resumed / "checkpoint-2" / MANIFEST).read_text())
    manifest["files"][STATE_FILE] = state_file.stat().st_size  # the edit is ours: record it, or the size check fails
    (resumed / "checkpoint-2" / MANIFEST).write_text(json.dumps(manifest))
    result = train(make_config(
        {"training": {"per_device_train_batch_size": 4, "max_steps": STEPS, "resume_from_checkpoint": "latest"}}, resumed
    ))
    assert [h["step"] for h in result.history] == [3, 4] and all(h["epoch"] >= 1 for h in result.history)


@pytest.fixture
def surrogate_server(surrogate_dir):
    """``python -m surrogate_server`` on loopback, free ports; yields its gRPC address."""
    with ServerProcess(surrogate_dir, "--device", "cpu", "--log_level", "WARNING", cwd=ROOT) as server:
        yield server.grpc


def test_two_ranks_with_the_grpc_server_train_like_one_process(surrogate_server, base_dir, surrogate_dir, train_file,
                                                              make_config, tmp_path):
    """Each rank streams its own guidance requests to one server; the server batches across ranks."""
    out = tmp_path / "ddp"
    torchrun(_flags(base_dir, surrogate_dir, train_file, out, batch=2, extra=["--surrogate_endpoint", surrogate_server]))
    reference = one_process(make_config, tmp_path / "one", batch=4, endpoint=surrogate_server, name_or_path=None)
    assert_same_steps(records(out), reference, rel=1e-4)
    assert all(r["guided_share"] > 0 and r["unguided_batches"] == 0 for r in records(out))
    assert sum(r["guidance_requests"] for r in records(out)) >= STEPS  # rank 0's requests went to the server
