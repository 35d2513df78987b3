"""Metric logging: console + ``metrics.jsonl`` + optional Weights & Biases, main process only.

Ranks other than 0 get a ``NullTracker``, so the trainer calls ``tracker.log``
everywhere without ``if rank == 0``. wandb is imported only when a project is set.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer")


class NullTracker:
    """Does nothing: what non-main ranks log to."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, float]) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """Writes every metrics record to the console, a JSONL file and (optionally) wandb."""

    def __init__(self, output_dir: Path, *, wandb_project: str | None, run_name: str | None, config: dict[str, Any]):
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file = (output_dir / "metrics.jsonl").open("a")
        self._wandb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(
                project=wandb_project, name=run_name, config=config, dir=str(output_dir)
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        log.info("step %d | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def summary(self, metrics: dict[str, float]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(metrics)

    def finish(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _fmt(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e9):
        return str(int(value))
    if isinstance(value, float) and (abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)) and math.isfinite(value):
        return f"{value:.3e}"
    return f"{value:.4f}"
