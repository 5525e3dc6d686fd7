"""lr_at: linear warmup from 0, cosine to lr * min_lr_ratio at train.steps (values by hand)."""

import math

import pytest

from routelab.config import TrainConfig
from routelab.train.schedule import lr_at


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 110, "warmup_steps": 10, "lr": 1e-3, "min_lr_ratio": 0.1, **kw})


def test_warmup_is_linear_from_zero():
    c = cfg()
    assert lr_at(0, c) == 0.0
    assert lr_at(1, c) == pytest.approx(1e-4)
    assert lr_at(5, c) == pytest.approx(5e-4)
    assert lr_at(9, c) == pytest.approx(9e-4)


def test_peak_midpoint_and_end():
    c = cfg()
    assert lr_at(10, c) == pytest.approx(1e-3)  # peak at the end of warmup
    # halfway through the cosine (step 60 of 10..110): lr_min + (lr - lr_min) / 2 = 1e-4 + 4.5e-4
    assert lr_at(60, c) == pytest.approx(5.5e-4)
    # a quarter of the way: lr_min + (lr - lr_min) * (1 + cos(pi/4)) / 2
    assert lr_at(35, c) == pytest.approx(1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2)
    assert lr_at(110, c) == pytest.approx(1e-4)  # the last update runs at lr * min_lr_ratio
    assert lr_at(500, c) == pytest.approx(1e-4)  # past the end: stays at the floor


def test_no_warmup_and_monotone_decay():
    c = cfg(warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, c) == pytest.approx(1e-3)
    assert lr_at(110, c) == pytest.approx(0.0)
    values = [lr_at(s, c) for s in range(111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_longer_than_run_holds_peak():
    c = cfg(steps=5, warmup_steps=10)
    assert lr_at(5, c) == pytest.approx(5e-4)
    assert lr_at(10, c) == pytest.approx(1e-3)
