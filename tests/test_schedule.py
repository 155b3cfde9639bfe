"""The learning-rate schedule against its formula.

Tolerances: lr_at computes warm-up and cosine in float64 and the expected values are the same
formula's exact values; they differ by float64 rounding (~1e-16 relative, or ~1e-16 absolute at
the schedule's end where the value is 0), well inside pytest.approx's default (rel 1e-6, abs
1e-12).
"""

import math

import pytest

from fedsim.schedule import lr_at


def test_warmup_then_cosine_to_zero():
    total, base = 100, 2.0
    # W = floor(0.1 * 100) = 10 warm-up steps: base * (s+1)/10.
    assert lr_at(0, total, base, 0.1) == pytest.approx(0.2)
    assert lr_at(9, total, base, 0.1) == pytest.approx(2.0)
    # After warm-up: base * 0.5 * (1 + cos(pi * (s - 10) / 90)).
    assert lr_at(10, total, base, 0.1) == pytest.approx(2.0)
    assert lr_at(55, total, base, 0.1) == pytest.approx(
        2.0 * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    )
    assert lr_at(100, total, base, 0.1) == pytest.approx(0.0)


def test_constant_and_no_warmup():
    assert lr_at(0, 10, 1.0, 0.0, "constant") == 1.0
    assert lr_at(7, 10, 1.0, 0.0, "constant") == 1.0
    assert lr_at(0, 10, 1.0, 0.0) == pytest.approx(1.0)
