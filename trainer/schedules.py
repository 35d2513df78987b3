"""Schedules for the surrogate weight lambda (docs/method.md §5).

The learning-rate schedule is transformers.get_cosine_schedule_with_warmup; only
the lambda schedule lives here.
"""

from __future__ import annotations

import math


def surrogate_weight(step: int, total_steps: int, initial: float, final: float) -> float:
    """lambda(s) = final + (initial - final) * (1 + cos(pi * s / S)) / 2, cosine from `initial` to `final`.

    Args:
        step: s, the optimizer step (not the micro-batch); clamped to [0, total_steps],
            so steps past the end keep `final`.
        total_steps: S, the total number of optimizer steps. S <= 0 means there is no
            schedule to follow: the weight stays at `initial`.
        initial: lambda at step 0 (SDCE default 1.0).
        final: lambda at step S and after (SDCE default 0.0).
    """
    if total_steps <= 0:
        return float(initial)
    progress = min(max(step, 0), total_steps) / total_steps
    return final + 0.5 * (initial - final) * (1.0 + math.cos(math.pi * progress))
