"""Metric logging: console + ``metrics.jsonl`` + optional Weights & Biases, main process only.

Ranks other than 0 get a ``NullTracker``, so the trainer calls ``tracker.log``
everywhere without ``if rank == 0``. wandb is imported only when a project is set.
Keys are namespaced as the ecosystem does (``train/loss``, ``eval/loss``; the Hugging
Face Trainer's W&B callback writes the same), in W&B and in the JSONL file alike.
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

    run_id: str | None = None  # the W&B run's id: saved in checkpoints, so a resumed run continues it

    def log(self, metrics: dict[str, float], step: int, section: str = "train") -> None:
        pass

    def summary(self, sections: dict[str, dict[str, float]]) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """Writes every metrics record to the console, a JSONL file and (optionally) wandb."""

    def __init__(
        self,
        output_dir: Path,
        *,
        wandb_project: str | None,
        run_name: str | None,
        config: dict[str, Any],
        tags: str | None = None,
        run_id: str | None = None,
        resumed_at: int | None = None,
    ):
        """``tags``: comma-separated; ``run_id``: the W&B run to continue (a resumed job), else a new one.

        ``resumed_at``: the step a resumed job continues from: ``metrics.jsonl`` keeps the records up to
        it and drops what the interrupted job logged after it; None (a new job) starts the file afresh.
        """
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        kept = _records_up_to(path, resumed_at) if resumed_at is not None else []
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self._file = path.open("a")
        self._wandb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                tags=[tag.strip() for tag in tags.split(",") if tag.strip()] if tags else None,
                config=config,
                dir=str(output_dir),
                id=run_id,
                resume="allow" if run_id else None,
            )
            self.run_id = self._wandb.id

    def log(self, metrics: dict[str, float], step: int, section: str = "train") -> None:
        """Record ``metrics`` of ``step`` under ``section/`` (train, eval)."""
        named = {f"{section}/{key}": value for key, value in metrics.items()}
        self._file.write(json.dumps({"step": step, **named}) + "\n")
        self._file.flush()
        log.info("step %d | %s | %s", step, section, " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
        if self._wandb is not None:
            self._wandb.log(named, step=step)

    def summary(self, sections: dict[str, dict[str, float]]) -> None:
        """The run's final values, ``{section: {key: value}}`` (W&B's run summary)."""
        if self._wandb is not None:
            self._wandb.summary.update({f"{name}/{key}": v for name, values in sections.items() for key, v in values.items()})

    def finish(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _records_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """The records of an existing metrics file with step <= ``step`` (a torn last line, from a kill, dropped)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            records.append(record)
    return records


def read_metrics(output_dir: str | Path, section: str = "train") -> list[dict[str, float]]:
    """The records of ``section`` in a run's ``metrics.jsonl``, oldest first, keys without the section's prefix."""
    prefix = f"{section}/"
    records = []
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values = {key.removeprefix(prefix): value for key, value in record.items() if key.startswith(prefix)}
        if values:
            records.append({"step": record["step"], **values})
    return records


def _fmt(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e9):
        return str(int(value))
    if isinstance(value, float) and (abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)) and math.isfinite(value):
        return f"{value:.3e}"
    return f"{value:.4f}"
