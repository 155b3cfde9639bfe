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
