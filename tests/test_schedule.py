"""Learning-rate schedules against the reference formulas."""
import numpy as np
import pytest

from convmixer_dist.schedule import create_schedule


@pytest.mark.parametrize("step", [0, 1, 100, 399, 400, 401, 650, 799, 800, 950, 999, 1000, 1200])
def test_onecycle_equals_reference_interpolation(step):
    total, peak = 1000, 0.05
    expected = np.interp(step, [0, 0.4 * total, 0.8 * total, total], [0, peak, peak / 20, 0])
    assert float(create_schedule("onecycle", peak, total)(step)) == pytest.approx(expected, abs=1e-7)


def test_cosine_warms_up_then_decays_to_zero():
    schedule = create_schedule("cosine", 0.1, 100, warmup_steps=10)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(9)) == pytest.approx(0.1)
    assert float(schedule(55)) == pytest.approx(0.05, abs=1e-6)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_constant_is_constant_after_warmup():
    schedule = create_schedule("constant", 0.1, 100)
    assert [float(schedule(s)) for s in (0, 50, 99)] == pytest.approx([0.1] * 3)
