"""Named schedules against their closed forms, stepped once per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from trainkit.errors import ConfigError
from trainkit.schedules import SCHEDULE_NAMES, build_scheduler


def lr_curve(name: str, total: int = 100, warmup: int = 0, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(name, optimizer, total_steps=total, warmup_steps=warmup)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_textbook_values():
    lrs = lr_curve("cosine")
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[25] == pytest.approx(8.536e-4, rel=1e-3)
    assert lrs[50] == pytest.approx(5e-4, rel=1e-6)
    assert lrs[75] == pytest.approx(1.464e-4, rel=1e-3)


def test_constant():
    assert set(lr_curve("constant")) == {1e-3}


def test_step_decays_by_ten_each_third():
    lrs = lr_curve("step", total=90)
    assert lrs[29] == pytest.approx(1e-3) and lrs[30] == pytest.approx(1e-4) and lrs[60] == pytest.approx(1e-5)


def test_warmup_then_cosine():
    lrs = lr_curve("warmup_cosine", total=110, warmup=10)
    assert lrs[0] == pytest.approx(1e-5)  # starts at 1% of peak
    assert lrs[5] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=1e-6)  # linear
    assert lrs[10] == pytest.approx(1e-3)  # peak at the end of warmup
    for step in (35, 60, 85):  # then textbook cosine over the remaining 100 steps
        expected = 0.5 * 1e-3 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert lrs[step] == pytest.approx(expected, rel=1e-6)
    assert max(range(110), key=lrs.__getitem__) == 10


def test_onecycle_peaks_at_pct_start():
    lrs = lr_curve("onecycle", total=100)
    assert max(range(100), key=lrs.__getitem__) == pytest.approx(30, abs=1)
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3)
    assert lrs[-1] < 1e-6


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_survives_a_state_dict_round_trip(name):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(name, optimizer, total_steps=50, warmup_steps=5)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler2 = build_scheduler(name, optimizer2, total_steps=50, warmup_steps=5)
    scheduler2.load_state_dict(state)
    optimizer2.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    for _ in range(10):
        optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="warmup_cosine"):
        lr_curve("triangular")
