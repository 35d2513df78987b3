"""Checkpoints: atomic step directories, pruning, 'latest', and what a crash leaves behind."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.checkpoint import Progress, checkpoints, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from trainer.device import Backend


class _Tokenizer:
    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


@pytest.fixture
def parts():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    backend = Backend(torch.device("cpu"))
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": backend.grad_scaler(), "backend": backend}


def _save(tmp_path, parts, step, keep=None):
    return save_checkpoint(
        tmp_path, Progress(step=step, epoch=1, micro_batch=3), tokenizer=_Tokenizer(), config_yaml="a: 1\n",
        save_total_limit=keep, **parts,
    )


def test_save_writes_a_complete_directory_and_load_restores_state(tmp_path, parts):
    path = _save(tmp_path, parts, 7)
    assert path.name == "checkpoint-7"
    assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml", "training_state.pt", "rng_state_0.pt"} <= {
        p.name for p in path.iterdir()
    }
    expected_rng = torch.get_rng_state()
    torch.rand(3)  # move the generator on; loading must bring it back
    fresh = torch.optim.AdamW(parts["model"].parameters(), lr=1e-3)
    progress = load_checkpoint(
        path, optimizer=fresh, scheduler=parts["scheduler"], scaler=parts["scaler"], backend=parts["backend"]
    )
    assert progress == Progress(step=7, epoch=1, micro_batch=3)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    saved = parts["optimizer"].state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], saved)


def test_prune_keeps_the_newest(tmp_path, parts):
    for step in (2, 4, 6):
        _save(tmp_path, parts, step, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_half_written_checkpoints_are_never_latest(tmp_path, parts):
    _save(tmp_path, parts, 2)
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # a crash while writing step 4
    (tmp_path / "checkpoint-6").mkdir()  # a directory without training state
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert resolve_resume("latest", tmp_path).name == "checkpoint-2"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)


def test_resume_latest_without_checkpoints_starts_afresh(tmp_path):
    assert resolve_resume("latest", tmp_path) is None and resolve_resume(None, tmp_path) is None
