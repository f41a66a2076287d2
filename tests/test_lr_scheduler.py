import math

import pytest

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler


def test_sd_v1_schedule_warms_up_then_stays_constant() -> None:
    s = LambdaLinearScheduler(warm_up_steps=[100], f_min=[1.0], f_max=[1.0], f_start=[1e-6], cycle_lengths=[10**13])
    assert s(0) == pytest.approx(1e-6)
    assert s(50) == pytest.approx(0.5, rel=1e-4)
    assert s(100) == pytest.approx(1.0)
    assert s(10**6) == pytest.approx(1.0)


def test_linear_cycles_restart() -> None:
    s = LambdaLinearScheduler(warm_up_steps=[10, 10], f_min=[0.0, 0.0], f_max=[1.0, 2.0], f_start=[0.0, 0.0],
                              cycle_lengths=[100, 100])
    assert s(10) == pytest.approx(0.9)
    assert s(110) == pytest.approx(1.8)
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler([1], [0.0, 1.0], [1.0], [0.0], [10])


def test_cosine_schedule_endpoints() -> None:
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert s(1000) == pytest.approx(0.1)
