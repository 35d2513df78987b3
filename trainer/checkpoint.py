"""Step-numbered checkpoints, written atomically.

Layout of ``output_dir/checkpoint-{step}/``: the model and tokenizer in Hugging
Face format (``save_pretrained``, safetensors), ``config.yaml`` (the resolved run
config), ``training_state.pt`` (optimizer, LR scheduler, grad scaler, progress)
and ``rng_state_{rank}.pt`` (each rank's random generators). Everything is first
written to ``.checkpoint-{step}.tmp``, flushed to disk (every file and the directory
fsynced) and then renamed, so a crash or a power cut never leaves a half-written
directory under a name that ``checkpoints()`` accepts. A checkpoint is removed (pruned,
or replaced by a new save of its step) by renaming it aside to ``.checkpoint-{step}.old``
first: it disappears at once, whole, and only then is deleted; leftovers of a crash are
swept by the next save. The output directory is assumed to be shared by all ranks of a
multi-node run.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.device import Backend

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.pt"


@dataclass
class Progress:
    """Where the run is: enough to continue with the same batches in the same order."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch comes from
    micro_batch: int = 0  # micro-batches of that epoch already consumed (per rank)
    world_size: int = 1  # ranks that consumed them
    tokens_seen: int = 0  # training tokens over all ranks
    wandb_run_id: str | None = None  # the W&B run this job logs to: a resumed job continues it


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: a path, or 'latest' in output_dir; None to start afresh."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            log.warning("resume_from_checkpoint=latest but %s holds no checkpoint: starting afresh", output_dir)
        return path
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"{resume!r} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-N directory or 'latest'"
        )
    return path


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    progress: Progress,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    config_yaml: str,
    backend: Backend,
    save_total_limit: int | None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically (all ranks call this) and prune old ones."""
    root = Path(output_dir)
    final = root / f"checkpoint-{progress.step}"
    tmp = root / f".checkpoint-{progress.step}.tmp"
    if backend.is_main:
        _sweep(root)
        tmp.mkdir(parents=True)
    backend.barrier()
    torch.save(_rng_state(), tmp / f"rng_state_{backend.rank}.pt")
    _fsync(tmp / f"rng_state_{backend.rank}.pt")
    if backend.is_main:
        model.save_pretrained(tmp, state_dict=backend.host_state_dict(model))
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": asdict(progress),
        }
        backend.save(state, tmp / STATE_FILE)
    backend.barrier()
    if backend.is_main:
        _fsync_tree(tmp)
        aside = _aside(final) if final.exists() else None  # a new save of an existing step replaces it
        if aside is not None:
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync(root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # out of sight already; what is left, the next save sweeps
        for old in checkpoints(root)[:-save_total_limit] if save_total_limit is not None else []:
            remove_checkpoint(old)
        log.info("saved %s", final)
    backend.barrier()
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no crash can leave part of it under its name: rename it aside, then delete."""
    aside = _aside(path)
    os.rename(path, aside)
    _fsync(path.parent)
    shutil.rmtree(aside, ignore_errors=True)  # out of sight already; what is left, the next save sweeps


def _aside(path: Path) -> Path:
    """A name for ``path`` that ``checkpoints()`` ignores (and the next save sweeps), free to rename to."""
    aside = path.with_name(f".{path.name}.old")
    shutil.rmtree(aside, ignore_errors=True)  # a crash's leftover
    return aside


def _sweep(root: Path) -> None:
    """Remove what crashes left: unfinished saves (``.checkpoint-N.tmp``), unfinished removals (``.old``)."""
    for leftover in root.glob(".checkpoint-*"):
        if leftover.suffix in (".tmp", ".old") and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush one file or directory (its entries: creations, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then the directories that hold them, to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder, name))
        _fsync(Path(folder))


def load_checkpoint(
    path: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    backend: Backend,
) -> Progress:
    """Restore optimizer, scheduler, scaler and RNG; return where to continue.

    The weights are not touched here: the trainer builds the model from the
    checkpoint directory itself (``from_pretrained``), which handles shards and
    tied weights.
    """
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng_state_{backend.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d: dropout will differ from the original run", path, backend.rank)
    return Progress(**state["progress"])
