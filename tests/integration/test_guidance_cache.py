"""The guidance cache end to end: later epochs and runs read it, a complete one stands in for the surrogate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.cache import namespaces
from trainer.tracking import read_metrics
from trainer.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_file(tmp_path, texts) -> Path:
    """A corpus of a few dozen blocks: three epochs in seconds."""
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:12]))
    return path


def _per_step(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history]


def _three_epochs(make_config, small_file: Path, output_dir: Path, cache: Path | None, epochs: int = 3) -> list[dict]:
    # Batch 1: an epoch drops no partial batch, so the first epoch sees every block the later ones do.
    overrides = {"data": {"train_file": str(small_file)}, "surrogate": {"cache_dir": str(cache) if cache else None},
                 "training": {"max_steps": -1, "num_epochs": epochs, "logging_steps": 1,
                              "per_device_train_batch_size": 1}}
    return train(make_config(overrides, output_dir)).history


def test_epochs_after_the_first_ask_the_surrogate_nothing_and_train_the_same(make_config, small_file, tmp_path):
    plain = _three_epochs(make_config, small_file, tmp_path / "plain", None)
    cached = _three_epochs(make_config, small_file, tmp_path / "cached", tmp_path / "cache")
    assert len(plain) == len(cached) and len(cached) >= 9
    for key in ("loss", "ce", "surrogate_term", "guided_share", "grad_norm"):
        assert _per_step(cached, key) == pytest.approx(_per_step(plain, key), rel=0, abs=1e-6), key
    first = [h for h in cached if h["epoch"] <= 1.0]
    later = [h for h in cached if h["epoch"] > 1.0]
    assert len(later) == 2 * len(first)
    assert sum(h["guidance_requests"] for h in later) == 0  # not one surrogate forward in epochs 2-3
    assert all(h["guidance_cache_hits"] == 1 and h["guidance_cache_misses"] == 0 for h in later)
    assert all(h["guidance_cache_misses"] == 1 and h["guidance_requests"] == 1 for h in first)
    # A second run on the same data (one epoch of it) asks the surrogate nothing at all.
    again = _three_epochs(make_config, small_file, tmp_path / "again", tmp_path / "cache", epochs=1)
    assert len(again) == len(first) and sum(h["guidance_requests"] for h in again) == 0
    assert all(h["guidance_cache_misses"] == 0 and h["guidance_cache_hits"] == 1 for h in again)


def test_precomputed_cache_trains_with_the_surrogate_absent(make_config, tmp_path, surrogate_dir):
    from trainer.precompute import precompute

    cache = tmp_path / "cache"
    config = make_config({"surrogate": {"cache_dir": str(cache)}, "training": {"max_steps": 8}}, tmp_path / "run")
    config.save(tmp_path / "config.yaml")
    command = [sys.executable, "-m", "trainer.precompute", "--config", str(tmp_path / "config.yaml")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["computed"] == summary["blocks"] > 0 and summary["bytes_per_token"] > 0
    # Interrupted and restarted (a shard lost): only the lost rows are computed again.
    (path, _), = namespaces(cache)
    shards = sorted(path.glob("shard-*.parquet"))
    lost = __import__("pyarrow.parquet").parquet.read_metadata(shards[-1]).num_rows
    shards[-1].unlink()
    again = precompute(config)  # in this process this time: the same code as the console script's
    assert again["computed"] == lost and again["blocks"] == summary["blocks"]

    reference = train(make_config({"training": {"max_steps": 8}}, tmp_path / "reference"))
    absent = make_config({"surrogate": {"name_or_path": None, "cache_dir": str(cache)},
                          "training": {"max_steps": 8}}, tmp_path / "absent")
    result = train(absent)
    assert _per_step(result.history, "loss") == pytest.approx(_per_step(reference.history, "loss"), abs=1e-6)
    assert all(h["guidance_cache_misses"] == 0 and "guidance_requests" not in h for h in result.history)
    assert result.eval_loss == pytest.approx(reference.eval_loss, abs=1e-6)

    # Other settings have no namespace there: a clear error, not other guidance.
    with pytest.raises(ValueError, match="holds no namespace for this run .*k=5"):
        train(make_config({"surrogate": {"name_or_path": None, "cache_dir": str(cache), "k": 4}}, tmp_path / "k4"))


def test_new_weights_under_the_same_path_never_read_the_old_guidance(make_config, tmp_path, surrogate_dir):
    """Retraining the surrogate in place (same path, same tokenizer) lands in a new namespace."""
    changed = tmp_path / "surrogate"
    model = AutoModelForCausalLM.from_pretrained(surrogate_dir)
    model.save_pretrained(changed)
    __import__("shutil").copytree(surrogate_dir, changed, dirs_exist_ok=True, ignore=lambda *_: ["model.safetensors"])
    cache = tmp_path / "cache"
    overrides = {"surrogate": {"name_or_path": str(changed), "cache_dir": str(cache)}, "training": {"max_steps": 2}}
    train(make_config(overrides, tmp_path / "first"))
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(changed)
    second = train(make_config(overrides, tmp_path / "second"))
    assert len(namespaces(cache)) == 2
    assert all(h["guidance_cache_hits"] == 0 and h["guidance_requests"] == 1 for h in second.history)


def test_precompute_reads_one_pass_of_a_stream_and_a_streaming_run_needs_no_surrogate(make_config, tmp_path):
    from trainer.precompute import precompute

    cache = str(tmp_path / "cache")
    stream = {"data": {"streaming": True, "document_mask": True}, "training": {"max_steps": 4}}
    summary = precompute(make_config({**stream, "surrogate": {"cache_dir": cache}}, tmp_path / "precompute"))
    assert summary["computed"] == summary["blocks"] > 16  # every block of the one pass
    reference = train(make_config(stream, tmp_path / "reference"))
    absent = train(make_config({**stream, "surrogate": {"name_or_path": None, "cache_dir": cache}}, tmp_path / "run"))
    assert _per_step(absent.history, "loss") == pytest.approx(_per_step(reference.history, "loss"), abs=1e-6)
    assert all(h["guidance_cache_misses"] == 0 for h in absent.history)
