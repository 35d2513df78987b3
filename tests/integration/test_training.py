"""A few real training steps on tiny models: each loss type, accumulation, resume, the CLI."""

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.checkpoint import checkpoints
from trainer.tracking import read_metrics
from trainer.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("loss_type", ["standard", "surrogate", "kl"])
def test_loss_falls(make_config, loss_type):
    result = train(make_config({"training": {"loss_type": loss_type, "max_steps": 25, "logging_steps": 5}}))
    losses = [h["ce"] for h in result.history]
    # The tiny surrogate is untrained, so its pull is noise: CE still has to fall clearly.
    assert losses[-1] < losses[0] - 0.25 and losses == sorted(losses, reverse=True), losses
    assert result.eval_loss is not None and result.perplexity > 1
    guided = [h["guided_share"] for h in result.history]
    if loss_type == "standard":
        assert all(g == 0 for g in guided) and not any("lambda" in h for h in result.history)
    else:
        assert all(0 < g <= 1 for g in guided)
        assert any(h["surrogate_term"] > 0 for h in result.history)


def test_a_warning_names_the_setting_that_removed_every_candidate(make_config, caplog):
    """The untrained surrogate's probabilities (about 1/700) all lie under a 0.02 threshold: guidance vanishes."""
    starved = {"surrogate": {"probability_threshold": 0.02}, "training": {"max_steps": 4}}
    with caplog.at_level(logging.WARNING, logger="trainer"):
        result = train(make_config(starved))
    warnings = [r.getMessage() for r in caplog.records if "guidance has vanished" in r.getMessage()]
    assert len(warnings) == 1 and "probability_threshold=0.02 removed them" in warnings[0], warnings
    assert all(h["guided_share"] == 0 and h["candidates_permitted"] > 0.5 for h in result.history)
    assert all(h["candidates_above_threshold"] == 0 for h in result.history)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        healthy = train(make_config({"training": {"max_steps": 4}}))  # no threshold: every window guided
    assert not [r for r in caplog.records if "guidance has vanished" in r.getMessage()]
    assert all(h["guided_share"] > 0.5 for h in healthy.history)


@pytest.mark.parametrize("loss_type", ["standard", "surrogate", "kl"])
def test_fused_loss_trains_like_the_logits_path(make_config, tmp_path, loss_type):
    """fused_sdce_loss (the default) against sdce_loss on full logits: the same run, step by step, to 1e-4."""
    common = {"loss_type": loss_type, "max_steps": 6, "logging_steps": 1, "gradient_accumulation_steps": 2,
              "z_loss_multiplier": 1e-3}
    fused = train(make_config({"training": common}, tmp_path / "fused"))
    logits = train(make_config({"training": {**common, "fused_loss": False}}, tmp_path / "logits"))
    for a, b in zip(fused.history, logits.history, strict=True):
        for key in ("loss", "ce", "surrogate_term", "z_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])
    assert fused.eval_loss == pytest.approx(logits.eval_loss, abs=1e-4)


def test_accumulation_equals_one_big_batch(make_config, tmp_path):
    common = {"loss_type": "surrogate", "max_steps": 2, "max_grad_norm": 0.0}
    big = train(make_config({"training": {**common, "per_device_train_batch_size": 4}}, tmp_path / "big"))
    acc = train(make_config(
        {"training": {**common, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}}, tmp_path / "acc"
    ))
    first_big, first_acc = big.history[0], acc.history[0]
    for key in ("loss", "ce", "surrogate_term", "grad_norm"):
        assert first_acc[key] == pytest.approx(first_big[key], rel=1e-5, abs=1e-6), key
    assert acc.history[1]["loss"] == pytest.approx(big.history[1]["loss"], rel=1e-4)


def test_resume_continues_exactly(make_config, tmp_path):
    """Stop after step 4 (a checkpoint), resume: steps 5-8 match the uninterrupted run."""
    overrides = {"training": {"loss_type": "surrogate", "max_steps": 8, "save_steps": 4, "save_total_limit": 2}}
    full = train(make_config(overrides, tmp_path / "full"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = train(make_config(
        {"training": {**overrides["training"], "resume_from_checkpoint": "latest"}}, resumed_dir
    ))
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    for a, b in zip(full.history[4:], resumed.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
    assert resumed.eval_loss == pytest.approx(full.eval_loss, rel=1e-6)
    assert [p.name for p in checkpoints(tmp_path / "full")] == ["checkpoint-4", "checkpoint-8"]


def test_resume_with_dropout_is_bit_identical(make_config, tmp_path):
    """Dropout on (GPT-2's default 0.1): the steps after a resume draw the same masks as the uninterrupted run's."""
    base = tmp_path / "dropout-base"
    model = AutoModelForCausalLM.from_pretrained(make_config().model.name_or_path)
    model.config.update({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(make_config().model.name_or_path).save_pretrained(base)
    overrides = {"model": {"name_or_path": str(base)},
                 "training": {"loss_type": "surrogate", "max_steps": 6, "save_steps": 3, "save_total_limit": None}}
    full = train(make_config(overrides, tmp_path / "full"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = train(make_config({**overrides, "training": {**overrides["training"], "resume_from_checkpoint": "latest"}},
                                resumed_dir))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]
    assert resumed.eval_loss == full.eval_loss


def test_resumed_run_continues_the_same_wandb_run(make_config, tmp_path, monkeypatch):
    """The W&B run id is saved in the checkpoint: the resumed job logs to the same (offline) run, with its name and tags."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    tracking = {"wandb_project": "sdce-test", "wandb_run_name": "resume-check", "wandb_tags": "ci, resume"}
    train(make_config({"training": {"loss_type": "standard", "max_steps": 2, "save_steps": 2, **tracking}}, out))
    train(make_config({"training": {"loss_type": "standard", "max_steps": 4, "save_steps": 2, **tracking,
                                    "resume_from_checkpoint": "latest"}}, out))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1, runs
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # logging_steps 1: one JSONL file, both jobs
    # A new run in the same directory (overwrite_output_dir) starts a new W&B run and a new metrics file.
    train(make_config({"training": {"loss_type": "standard", "max_steps": 1, **tracking, "overwrite_output_dir": True}},
                      out))
    assert len(list((out / "wandb").glob("offline-run-*"))) == 3 and [r["step"] for r in read_metrics(out)] == [1]


def test_existing_checkpoints_need_resume_or_overwrite(make_config, tmp_path):
    out = tmp_path / "run"
    train(make_config({"training": {"loss_type": "standard", "max_steps": 2, "save_steps": 2}}, out))
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest"):
        train(make_config({"training": {"loss_type": "standard", "max_steps": 2}}, out))
    train(make_config({"training": {"loss_type": "standard", "max_steps": 1, "overwrite_output_dir": True}}, out))
    assert checkpoints(out) == []  # the old run's checkpoint-2 is gone, so 'latest' cannot pick it up


def test_command_line_run_writes_model_config_metrics_and_wandb(base_dir, surrogate_dir, train_file, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable, "train.py", "--base_model", str(base_dir), "--surrogate_model", str(surrogate_dir),
        "--train_file", str(train_file), "--max_seq_length", "32", "--batch_size", "2", "--max_steps", "4",
        "--save_steps", "2", "--save_total_limit", "1", "--logging_steps", "2", "--output_dir", str(out),
        "--init_from_scratch", "--surrogate_k", "4", "--wandb_project", "sdce-test", "--device", "cpu",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "loss_type: surrogate" in (out / "config.yaml").read_text()
    records = read_metrics(out)
    assert {
        "loss", "ce", "surrogate_term", "lambda", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "guided_share",
        "input_wait_share", "guidance_wait_share", "unguided_batches",
    } <= set(records[0])
    assert [r["tokens_seen"] for r in records] == [2 * 2 * 32, 4 * 2 * 32]  # logging_steps 2, batch 2 x 32 tokens
    assert "z_loss" not in records[0]  # only logged when z_loss_multiplier > 0
    assert {"loss", "perplexity", "tokens"} <= set(read_metrics(out, "eval")[-1])
    lines = (out / "metrics.jsonl").read_text()
    assert '"train/loss"' in lines and '"eval/loss"' in lines  # the namespaces W&B and HF's Trainer use
    assert [p.name for p in checkpoints(out)] == ["checkpoint-4"]
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert "vocabulary alignment" in done.stderr
