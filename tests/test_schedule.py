"""The official onecycle schedule at its knots and between them, against hand-computed float64 values."""

from __future__ import annotations

import pytest

from convmixer_pt.train.schedule import lr_at_step, onecycle_knots, onecycle_lr


@pytest.mark.parametrize("epochs, up, down", [(150, 60, 120), (300, 120, 240), (7, 2, 5), (12, 4, 9)])
def test_knots_use_integer_division(epochs: int, up: int, down: int) -> None:
    xs, ys = onecycle_knots(epochs, 0.01)
    assert xs == [0, up, down, epochs]
    assert ys == [0.0, 0.01, 0.01 / 20, 0.0]
    assert onecycle_lr(0, epochs, 0.01) == 0.0
    assert onecycle_lr(up, epochs, 0.01) == 0.01
    assert onecycle_lr(down, epochs, 0.01) == 0.0005
    assert onecycle_lr(epochs, epochs, 0.01) == 0.0


def test_linear_between_knots_for_150_epochs() -> None:
    assert onecycle_lr(30, 150, 0.01) == pytest.approx(0.005, rel=1e-12)
    assert onecycle_lr(90, 150, 0.01) == pytest.approx((0.01 + 0.0005) / 2, rel=1e-12)
    assert onecycle_lr(135, 150, 0.01) == pytest.approx(0.00025, rel=1e-12)
    assert onecycle_lr(12.5, 150, 0.01) == pytest.approx(0.01 * 12.5 / 60, rel=1e-12)


def test_step_uses_the_fraction_after_the_step() -> None:
    # The fork calls step_frac(epoch + (batch_idx + 1) / len(loader)) before each update: no zero-lr step.
    assert lr_at_step(0, 0, 10, 5, 0.01) == pytest.approx(0.01 * 0.1 / 2, rel=1e-12)
    assert lr_at_step(1, 9, 10, 5, 0.01) == 0.01
    assert lr_at_step(4, 9, 10, 5, 0.01) == 0.0
