"""Step-numbered checkpoints, committed by a marker written last (safe on object storage).

Layout of ``output_dir/checkpoint-{step}/``: the model and tokenizer in Hugging
Face format (``save_pretrained``, safetensors), ``config.yaml`` (the resolved run
config), ``rng_state_{rank}.pt`` (each rank's random generators), then
``training_state.pt`` (optimizer, LR scheduler, grad scaler, progress) and last
``checkpoint.json``, the manifest (every file and its size): the commit. A save marks
its directory ``.sdce-uncommitted`` first and removes the mark after the commit. Each file
is flushed to disk before the next is written, and the two last ones appear whole
(written under a temporary name, then ``os.replace``: a file rename, which Cloud
Storage FUSE and other object-store mounts support; directory renames they refuse
or do not make atomic, and none is used). ``checkpoints()`` lists only committed
directories, so a crash or a power cut never leaves a half-written checkpoint for
``latest`` to pick: what it leaves is swept by the next save (only directories with
that mark: another trainer's ``checkpoint-N`` in the same directory is left alone). A
checkpoint is removed (pruned, or replaced by a new save of its step) by marking it
and deleting its manifest first: it stops being a checkpoint at once, then its files go.
Directories of earlier releases (``training_state.pt``, no manifest: they were
committed by a directory rename) still count. The output directory is assumed to be
shared by all ranks of a multi-node run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.device import Backend

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.pt"
MANIFEST = "checkpoint.json"  # written last: its presence commits the checkpoint
UNCOMMITTED = ".sdce-uncommitted"  # written first by a save (and by a removal): ours, and not (or no longer) whole


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
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_committed(p)]
    return [p for _, p in sorted(found)]


def is_committed(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint: its manifest is there (or, from earlier releases, its training state)."""
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            return isinstance(json.loads(manifest.read_text()).get("files"), dict)
        except (ValueError, AttributeError):
            return False
    return (path / STATE_FILE).is_file() and not (path / UNCOMMITTED).exists()


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
    if not is_committed(path):
        raise ValueError(
            f"{resume!r} is not a complete checkpoint (no {MANIFEST} or {STATE_FILE}); pass a checkpoint-N "
            "directory or 'latest'"
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
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Write and commit ``checkpoint-{step}`` (all ranks call this), then prune old ones.

    ``rank_state``: more of this rank's state, ``{name: object}``, each saved as ``{name}_{rank}.pt``
    (the stream position of a streaming run; ``load_rank_state`` reads it back).
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{progress.step}"
    if backend.is_main:
        _sweep(root)
        if final.exists():  # a new save of a step already saved replaces it
            remove_checkpoint(final)
        final.mkdir(parents=True, exist_ok=True)
        (final / UNCOMMITTED).touch()  # until the manifest: the next save may sweep it
    backend.barrier()
    for name, value in {"rng_state": _rng_state(), **(rank_state or {})}.items():
        torch.save(value, final / f"{name}_{backend.rank}.pt")
        _fsync(final / f"{name}_{backend.rank}.pt")
    backend.barrier()  # every rank's generators are on disk before the training state says "complete"
    if backend.is_main:
        model.save_pretrained(final, state_dict=backend.host_state_dict(model))
        tokenizer.save_pretrained(final)
        (final / "config.yaml").write_text(config_yaml)
        _fsync_tree(final)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": asdict(progress),
        }
        _write_whole(final / STATE_FILE, lambda tmp: backend.save(state, tmp))
        files = {str(p.relative_to(final)): p.stat().st_size for p in sorted(final.rglob("*"))
                 if p.is_file() and p.name != UNCOMMITTED}
        expected = [STATE_FILE, "config.json", *(f"{name}_{rank}.pt" for name in ("rng_state", *(rank_state or {}))
                                                 for rank in range(backend.world_size))]
        if missing := [name for name in expected if name not in files]:
            raise RuntimeError(f"{final} lacks {missing} after every rank wrote it: is {root} shared by all nodes?")
        manifest = json.dumps({"step": progress.step, "files": files}, indent=1)
        _write_whole(final / MANIFEST, lambda tmp: tmp.write_text(manifest))  # the commit
        (final / UNCOMMITTED).unlink()
        # The oldest go first, never the one just written (a run resumed from an older step may have newer ones).
        older = [path for path in checkpoints(root) if path != final]
        for old in older[: max(len(older) - save_total_limit + 1, 0)] if save_total_limit is not None else []:
            remove_checkpoint(old)
        log.info("saved %s", final)
    backend.barrier()
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no crash can leave part of it looking whole: uncommit it first, then delete."""
    (path / UNCOMMITTED).touch()
    _fsync(path)
    for marker in (MANIFEST, STATE_FILE):  # with both gone no listing takes it for whole, marked or not
        (path / marker).unlink(missing_ok=True)
    _fsync(path)
    shutil.rmtree(path, ignore_errors=True)  # no longer a checkpoint; what a crash leaves, the next save sweeps


def _write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` the file under a temporary name, flush it, and give it its name in one step (a file rename)."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _sweep(root: Path) -> None:
    """Remove what crashes left: uncommitted ``checkpoint-N`` directories (and earlier releases' ``.tmp``/``.old``)."""
    if not root.is_dir():
        return
    for leftover in root.iterdir():
        # Only directories a save of ours left (its marker): never another trainer's checkpoint-N (HF Trainer's).
        partial = _NAME.match(leftover.name) and (leftover / UNCOMMITTED).exists() and not is_committed(leftover)
        legacy = leftover.name.startswith(".checkpoint-") and leftover.suffix in (".tmp", ".old")
        if (partial or legacy) and leftover.is_dir():
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
    _check_manifest(path)
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


def load_rank_state(path: Path, name: str, rank: int) -> Any:
    """What ``save_checkpoint(rank_state={name: ...})`` saved for ``rank``, or None if the checkpoint has none."""
    file = path / f"{name}_{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None


def _check_manifest(path: Path) -> None:
    """Raise ValueError if a file of the checkpoint is missing or not the size its manifest says (a torn upload)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return  # a checkpoint of an earlier release
    damaged = [name for name, size in json.loads(manifest.read_text())["files"].items()
               if not (path / name).is_file() or (path / name).stat().st_size != size]
    if damaged:
        raise ValueError(f"{path} is damaged ({', '.join(damaged)} missing or of the wrong size): resume from an "
                         "earlier checkpoint (pass its directory), or delete this one to make 'latest' skip it")
