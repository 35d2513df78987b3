"""--streaming: local jsonl shards read as a stream, one process and two torchrun ranks, killed (SIGKILL) mid-run
and resumed: the continued losses equal the uninterrupted run's bit for bit, dropout on."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.checkpoint import checkpoints
from trainer.tracking import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 24, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory, texts) -> Path:
    """Four jsonl shards of distinct documents (each text once per shard, tagged with its place)."""
    root = tmp_path_factory.mktemp("shards")
    for shard in range(4):
        rows = [json.dumps({"text": f"{text} [{shard}.{i}]"}) for i, text in enumerate(texts * 2)]
        (root / f"part-{shard:05d}.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def dropout_base(tmp_path_factory, base_dir) -> Path:
    """The tiny base with GPT-2's dropout (0.1): resume must replay the same masks."""
    path = tmp_path_factory.mktemp("dropout-base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.config.update({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(path)
    return path


def flags(base: Path, surrogate: Path, shards: Path, out: Path, batch: int) -> list[str]:
    return [
        "train.py", "--base_model", str(base), "--surrogate_model", str(surrogate), "--surrogate_k", "8",
        "--probability_threshold", "0.0", "--train_file", str(shards / "*.jsonl"), "--streaming",
        "--stream_batch_documents", "16", "--max_seq_length", "32", "--max_eval_blocks", "8", "--batch_size", str(batch),
        "--max_steps", str(STEPS), "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", str(SAVE_EVERY),
        "--save_total_limit", "none", "--device", "cpu", "--no_progress_bar", "--dataloader_num_workers", "1",
        "--output_dir", str(out),
    ]


def launcher(ranks: int) -> list[str]:
    return [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={ranks}"]


def run(args: list[str], ranks: int) -> None:
    done = subprocess.run([*launcher(ranks), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]


def kill_after_checkpoint(args: list[str], ranks: int, out: Path, step: int) -> None:
    """Start the run, SIGKILL its whole process group as soon as checkpoint-{step} is committed."""
    process = subprocess.Popen([*launcher(ranks), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(p.name == f"checkpoint-{step}" for p in checkpoints(out)):
        assert process.poll() is None, process.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("ranks", [1, 2])
def test_killed_streaming_run_resumes_bit_for_bit(ranks, dropout_base, surrogate_dir, shards, tmp_path):
    batch = 4 // ranks
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(flags(dropout_base, surrogate_dir, shards, full, batch), ranks)
    kill_after_checkpoint(flags(dropout_base, surrogate_dir, shards, killed, batch), ranks, killed, 2 * SAVE_EVERY)
    resumed_from = checkpoints(killed)[-1]
    assert int(resumed_from.name.split("-")[1]) < STEPS, "the run finished before the kill"
    run([*flags(dropout_base, surrogate_dir, shards, killed, batch), "--resume_from_checkpoint", "latest"], ranks)

    want = {r["step"]: r for r in read_metrics(full)}
    got = {r["step"]: r for r in read_metrics(killed)}  # the killed run's steps, then the resumed run's (appended)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == want[step]["loss"], step  # bit for bit, also after the resume
    # The same blocks, none twice or skipped: the token count agrees at every step and the stream moved on
    # past the first epoch's blocks in the same places (the epoch column).
    assert [got[s]["tokens_seen"] for s in sorted(got)] == [want[s]["tokens_seen"] for s in sorted(want)]
    assert [got[s]["epoch"] for s in sorted(got)] == [want[s]["epoch"] for s in sorted(want)]
    assert read_metrics(killed, "eval")[-1]["loss"] == read_metrics(full, "eval")[-1]["loss"]
