"""Checkpoints: committed step directories, pruning, 'latest', and what a crash leaves behind."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.checkpoint import (MANIFEST, STATE_FILE, UNCOMMITTED, Progress, checkpoints, latest_checkpoint, load_checkpoint,
                                resolve_resume, save_checkpoint)
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
    _save(tmp_path, parts, 5, keep=2)  # resumed from an older step: the save just written is never pruned
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-6"]


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


# -- crashes while removing or replacing a checkpoint ------------------------------------------
class _Killed(BaseException):
    """A SIGKILL at this point of the save: nothing after it runs (not even ``finally`` cleanup we own)."""


def _kill_at(monkeypatch, point: int) -> list[int]:
    """Make the ``point``-th change to a directory's entries raise _Killed; returns the call count.

    These are the moments the visible state can change: a kill anywhere else (while writing
    or flushing the files under the temporary name) leaves what a kill before the next one leaves."""
    calls = [0]
    for name in ("unlink", "rmdir", "rename", "replace"):
        original = getattr(os, name)

        def wrapped(*args, _original=original, **kwargs):
            calls[0] += 1
            if calls[0] == point:
                raise _Killed
            return _original(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapped)
    return calls


def _assert_every_checkpoint_loads(root, parts) -> None:
    """What a restart with --resume_from_checkpoint latest does with each checkpoint it could pick."""
    for path in checkpoints(root):
        GPT2LMHeadModel.from_pretrained(path)
        optimizer = torch.optim.AdamW(parts["model"].parameters(), lr=1e-3)
        load_checkpoint(path, optimizer=optimizer, scheduler=parts["scheduler"], scaler=parts["scaler"],
                        backend=parts["backend"])


@pytest.mark.parametrize("scenario", ["prune", "resave"])
def test_a_kill_at_any_point_of_a_save_leaves_only_loadable_checkpoints(tmp_path, parts, monkeypatch, scenario):
    """prune: steps 2 and 4 exist, saving 6 with save_total_limit=2 removes 2. resave: step 4 is saved again.

    The kill lands on each unlink/rmdir/rename/replace of the save in turn (deleting file by file
    in listing order, the old code left checkpoints with training_state.pt and no weights)."""
    template = tmp_path / "template"
    for step in (2, 4):
        _save(template, parts, step, keep=2)
    steps = (6, 2) if scenario == "prune" else (4, None)
    point = 0
    while True:
        point += 1
        root = tmp_path / f"kill-{point}"
        shutil.copytree(template, root)
        with monkeypatch.context() as patch:
            calls = _kill_at(patch, point)
            try:
                _save(root, parts, steps[0], keep=2)
                finished = True
            except _Killed:
                finished = False
        _assert_every_checkpoint_loads(root, parts)
        names = [p.name for p in checkpoints(root)]
        assert "checkpoint-4" in names or scenario == "resave", names  # only the one being replaced may vanish
        if finished:
            assert calls[0] < point  # every point before this one was hit
            break
    assert point > 8  # the kill met the renames and every unlink of the removed directory
    assert [p.name for p in checkpoints(root)] == (["checkpoint-4", "checkpoint-6"] if scenario == "prune"
                                                   else ["checkpoint-2", "checkpoint-4"])


def test_the_next_save_sweeps_what_a_crash_left(tmp_path, parts):
    _save(tmp_path, parts, 2)
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # an earlier release, killed while writing step 4
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / ".checkpoint-1.old")  # ... while removing step 1
    (tmp_path / "checkpoint-5").mkdir()  # this release, killed while writing step 5
    (tmp_path / "checkpoint-5" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-5" / UNCOMMITTED).touch()
    (tmp_path / "checkpoint-9").mkdir()  # another trainer's (HF Trainer names its checkpoints so too)
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text("{}")
    _save(tmp_path, parts, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-9"]
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-6"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsynced paths from /proc/self/fd")
def test_every_file_is_on_disk_before_the_checkpoint_is_committed(tmp_path, parts, monkeypatch):
    flushed: list[str] = []
    replaced: list[tuple[str, set[str]]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    def record_replace(src, dst):
        replaced.append((str(dst), set(flushed)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    final = _save(tmp_path, parts, 3)
    monkeypatch.undo()
    assert [Path(dst).name for dst, _ in replaced] == [STATE_FILE, MANIFEST]  # the manifest commits, last
    # A file flushed under its temporary name (.training_state.pt.partial) is the file it is renamed to.
    flushed_before_commit = {re.sub(r"/\.([^/]+)\.partial$", r"/\1", path) for path in replaced[-1][1]}
    files = {str(p) for p in final.rglob("*") if p.name != MANIFEST}
    assert files | {str(final)} <= flushed_before_commit  # every file, and the directory's entries
    assert flushed[-1] == str(final)  # the manifest's rename itself, flushed in the directory


def test_no_directory_is_ever_renamed(tmp_path, parts, monkeypatch):
    """Object-store mounts (Cloud Storage FUSE) refuse or tear directory renames: save, replace, prune and resume
    without one."""
    for name in ("rename", "replace"):
        original = getattr(os, name)

        def files_only(src, dst, _original=original):
            if Path(src).is_dir():
                raise OSError(95, "Operation not supported: directory rename", str(src))
            return _original(src, dst)

        monkeypatch.setattr(os, name, files_only)
    for step in (2, 4, 4, 6):  # 4 twice: a new save of a saved step replaces it
        _save(tmp_path, parts, step, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    path = resolve_resume("latest", tmp_path)
    progress = load_checkpoint(path, optimizer=parts["optimizer"], scheduler=parts["scheduler"],
                               scaler=parts["scaler"], backend=parts["backend"])
    assert progress.step == 6 and json.loads((path / MANIFEST).read_text())["step"] == 6


def test_a_crash_while_writing_leaves_nothing_committed(tmp_path, parts, monkeypatch):
    _save(tmp_path, parts, 2)

    def killed(*args, **kwargs):
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(parts["backend"], "save", killed)  # dies writing the training state of step 4
        with pytest.raises(_Killed):
            _save(tmp_path, parts, 4)
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()  # written, but not committed
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]
    _save(tmp_path, parts, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6"]  # swept


def test_a_torn_file_is_named_at_load(tmp_path, parts):
    path = _save(tmp_path, parts, 2)
    with open(path / "model.safetensors", "r+b") as weights:
        weights.truncate(100)
    with pytest.raises(ValueError, match=r"damaged \(model.safetensors"):
        load_checkpoint(path, optimizer=parts["optimizer"], scheduler=parts["scheduler"], scaler=parts["scaler"],
                        backend=parts["backend"])
