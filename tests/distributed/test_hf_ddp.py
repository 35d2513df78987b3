"""examples/hf_trainer.py offline on the demo's (quick) assets: one process, and torchrun with two ranks.

SDCETrainer normalises each micro-batch's loss by the label count of the whole step over all
ranks and scales it by the world size, and the Trainer's own scaling is off
(``loss_is_scaled_for_ga``), so two ranks with batch 1 take the steps of one process with
batch 2: accelerate hands rank r the batches r, r + 2, ... of the one sampler order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEYS = ("loss", "ce", "surrogate_term", "grad_norm", "guided_share")


def example(launcher: list[str], out: Path, workdir: Path, batch: int) -> list[dict]:
    flags = ["examples/hf_trainer.py", "--quick", "--demo_workdir", str(workdir), "--output_dir", str(out),
             "--block_size", "32", "--max_steps", "4", "--per_device_train_batch_size", str(batch),
             "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3", "--logging_steps", "1",
             "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
             "--surrogate_probability_threshold", "0"]  # the quick surrogate (6 steps) is near uniform: keep its top-k
    done = subprocess.run([*launcher, *flags], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "model.safetensors").is_file() and "eval_loss" in json.loads((out / "eval_results.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "ce" in h]


def test_example_trains_offline_and_two_ranks_match_one(tmp_path):
    workdir = tmp_path / "demo"  # made by the first run, reused by the second
    one = example([sys.executable], tmp_path / "one", workdir, batch=2)
    two = example([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                  tmp_path / "two", workdir, batch=1)
    assert [h["step"] for h in one] == [h["step"] for h in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert all(h["guided_share"] > 0 for h in one)
