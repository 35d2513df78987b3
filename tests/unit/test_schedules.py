"""The cosine schedule of the surrogate weight (docs/method.md §5)."""

from __future__ import annotations

import math

import pytest

from trainer.schedules import surrogate_weight


@pytest.mark.parametrize("initial, final", [(1.0, 0.0), (0.3, 0.1), (0.0, 2.0)])
def test_endpoints_and_midpoint(initial: float, final: float) -> None:
    assert math.isclose(surrogate_weight(0, 100, initial, final), initial, abs_tol=1e-12)
    assert math.isclose(surrogate_weight(50, 100, initial, final), (initial + final) / 2, abs_tol=1e-12)
    assert surrogate_weight(100, 100, initial, final) == final


def test_formula_at_a_quarter() -> None:
    expected = 0.5 * (1 + math.cos(math.pi / 4))
    assert math.isclose(surrogate_weight(25, 100, 1.0, 0.0), expected, rel_tol=1e-12)


@pytest.mark.parametrize("initial, final", [(1.0, 0.0), (0.0, 2.0)])
def test_monotonic_towards_final(initial: float, final: float) -> None:
    values = [surrogate_weight(s, 37, initial, final) for s in range(38)]
    sign = 1 if final > initial else -1
    assert all(sign * (b - a) >= 0 for a, b in zip(values, values[1:]))


def test_steps_outside_the_schedule_are_clamped() -> None:
    assert surrogate_weight(150, 100, 1.0, 0.25) == 0.25
    assert math.isclose(surrogate_weight(-5, 100, 1.0, 0.25), 1.0)


@pytest.mark.parametrize("total_steps", [0, -3])
def test_no_schedule_keeps_initial(total_steps: int) -> None:
    assert surrogate_weight(0, total_steps, 0.7, 0.0) == 0.7
    assert surrogate_weight(10, total_steps, 0.7, 0.0) == 0.7
    assert isinstance(surrogate_weight(10, total_steps, 1, 0), float)
